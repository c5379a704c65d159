"""ovseg-serve: run a bundle's Segmenter on Triton Inference Server, for many cameras (docs/serving.md).

Writes a model repository from the bundle, starts tritonserver on it, waits until the model is ready, prints the
endpoints and serves until SIGINT/SIGTERM, when it stops the server and its model processes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from ovseg.cli import (
    add_bundle_argument,
    add_segmenter_arguments,
    log_lines,
    non_negative_int,
    positive_int,
    run_cli,
    say,
)

from ..bundle.signing import add_trusted_key_argument
from .repository import RepositoryConfig, write_repository
from .server import Ports, TritonServer

PROG = "ovseg-serve"
# The repository's settings as flags: (flag, RepositoryConfig field, type, metavar, help).
TUNING = (
    ("--instances", "instances", positive_int, "N", "model instances, each with its own encoder sessions"),
    ("--max-batch", "max_batch", positive_int, "N", "most frames of different streams per encoder run"),
    ("--max-streams", "max_streams", positive_int, "N", "streams served at once per instance"),
    ("--queue-delay-us", "queue_delay_us", non_negative_int, "US", "how long a frame waits for others to batch with"),
    ("--idle-timeout", "idle_seconds", float, "S", "drop a stream after S seconds without frames"),
    ("--max-pixels", "max_pixels", positive_int, "N", "refuse frames of more pixels"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_bundle_argument(p, "bundle written by ovseg-export")
    add_segmenter_arguments(p, per="frame")
    p.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        help="write the model repository here and keep it (default: a temporary one)",
    )
    p.add_argument(
        "--generate-only",
        action="store_true",
        help="write the repository (needs --repository) and exit, for a tritonserver started elsewhere",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the endpoints bind (default 127.0.0.1; 0.0.0.0 opens them to the network)",
    )
    for kind, port in vars(Ports()).items():
        p.add_argument(f"--{kind}-port", type=positive_int, default=port, metavar="N")
    for flag, name, parse, metavar, text in TUNING:
        default = getattr(RepositoryConfig, name)
        p.add_argument(
            flag, dest=name, type=parse, default=default, metavar=metavar, help=f"{text} (default {default})"
        )
    p.add_argument(
        "--gpu-encoders",
        action="store_true",
        help="put the image encoders on Triton's ONNX Runtime backend (GPU, TensorRT accelerated, batched by Triton) "
        "and keep k-means, pooling and lookup in the Python model; needs NVIDIA's Triton container (with --generate-only)",
    )
    p.add_argument(
        "--encoder-precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="with --gpu-encoders: the bundle's ONNX files of this precision, and TensorRT's mode (default fp32)",
    )
    add_trusted_key_argument(p, "serve the bundle only if one of these Ed25519 public keys signed it")
    p.add_argument("--log", type=Path, metavar="FILE", help="append tritonserver's log here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate_only and args.repository is None:
        parser.error("--generate-only needs --repository DIR")
    given = {"precision": args.precision, "num_segments": args.segments}
    settings = {
        "backend": args.backend,
        "config": {k: v for k, v in given.items() if v is not None},
        "threads": args.threads,
        "trusted_keys": [str(k.expanduser().resolve()) for k in args.trusted_key] if args.trusted_key else None,
    }
    config = RepositoryConfig(
        **{name: getattr(args, name) for _, name, *_ in TUNING},
        segmenter={k: v for k, v in settings.items() if v is not None},
        encoders="onnxruntime" if args.gpu_encoders else "python",
        encoder_precision=args.encoder_precision,
    )

    def body() -> int:
        with log_lines(PROG), contextlib.ExitStack() as stack:
            repository = args.repository or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="ovseg-repository-"))
            )
            model = write_repository(args.bundle, repository, config)
            if args.generate_only:
                say(PROG, f"wrote {model}; serve it with: tritonserver --model-repository={repository}")
                return 0
            server = TritonServer(
                repository, Ports(args.grpc_port, args.http_port, args.metrics_port), args.host, args.log
            )
            stack.callback(server.stop)
            say(PROG, f"starting tritonserver ({server.binary}) on {args.bundle}")
            started = time.perf_counter()
            server.start()
            grpc, http = f"grpc://{args.host}:{args.grpc_port}", f"http://{args.host}:{args.http_port}"
            metrics = f"http://{args.host}:{args.metrics_port}/metrics"
            say(PROG, f"ready in {time.perf_counter() - started:.1f} s: grpc {grpc}, http {http}, metrics {metrics}")
            say(PROG, f"clients: ovseg-run --server {grpc} --camera 0; stop with Ctrl-C")
            assert server.process is not None
            say(PROG, f"error: tritonserver exited ({server.process.wait()}) on its own; see --log FILE")
            return 1

    return run_cli(PROG, body, "the server is stopped")


if __name__ == "__main__":
    sys.exit(main())
