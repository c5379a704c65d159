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

from ovseg.cli import add_bundle_argument, add_segmenter_arguments, log_lines, positive_int, run_cli, say

from ..bundle.signing import add_trusted_key_argument
from .repository import RepositoryConfig, write_repository
from .server import Ports, TritonServer

PROG = "ovseg-serve"
DEFAULTS = RepositoryConfig()


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
    p.add_argument("--grpc-port", type=positive_int, default=8001, metavar="N")
    p.add_argument("--http-port", type=positive_int, default=8000, metavar="N")
    p.add_argument("--metrics-port", type=positive_int, default=8002, metavar="N")
    p.add_argument(
        "--instances",
        type=positive_int,
        default=DEFAULTS.instances,
        metavar="N",
        help=f"model instances, each with its own encoder sessions (default {DEFAULTS.instances})",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULTS.max_batch,
        metavar="N",
        help=f"most frames of different streams per encoder run (default {DEFAULTS.max_batch})",
    )
    p.add_argument(
        "--max-streams",
        type=positive_int,
        default=DEFAULTS.max_streams,
        metavar="N",
        help=f"streams served at once per instance (default {DEFAULTS.max_streams})",
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=DEFAULTS.queue_delay_us,
        metavar="US",
        help=f"how long a frame waits for others to batch with (default {DEFAULTS.queue_delay_us})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULTS.idle_seconds,
        metavar="S",
        help=f"drop a stream after S seconds without frames (default {DEFAULTS.idle_seconds:g})",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULTS.max_pixels,
        metavar="N",
        help=f"refuse frames of more pixels (default {DEFAULTS.max_pixels}, 4096 x 4096)",
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
        args.instances,
        args.max_batch,
        args.max_streams,
        args.queue_delay_us,
        args.idle_timeout,
        args.max_pixels,
        {k: v for k, v in settings.items() if v is not None},
        "onnxruntime" if args.gpu_encoders else "python",
        args.encoder_precision,
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
            say(PROG, f"starting tritonserver ({server.server.binary}) on {args.bundle}")
            started = time.perf_counter()
            server.start()
            say(
                PROG,
                f"ready in {time.perf_counter() - started:.1f} s: "
                + ", ".join(f"{k} {v}" for k, v in server.endpoints.items()),
            )
            say(PROG, f"clients: ovseg-run --server {server.grpc_url} --camera 0; stop with Ctrl-C")
            assert server.process is not None
            while server.process.poll() is None:
                time.sleep(0.5)
            say(PROG, f"error: tritonserver exited ({server.process.returncode}) on its own; see --log FILE")
            return 1

    return run_cli(PROG, body, "the server is stopped")


if __name__ == "__main__":
    sys.exit(main())
