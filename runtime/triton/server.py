"""Runs tritonserver on a model repository: the binary the nvidia-pytriton wheel bundles (Triton with the Python
backend, CPU), or a ``tritonserver`` on PATH (an NGC container, a system install). Waits for readiness, stops cleanly.

The bundled binary's Python backend runs the model in a stub process built for this interpreter's Python version;
it loads this interpreter's libpython (LD_LIBRARY_PATH) and, with numpy 2.x in the environment, returns outputs with
no data and no error, so that combination is refused (docs/serving.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .protocol import ServingError

READY_TIMEOUT = 300.0  # seconds for the models to load (ONNX sessions, the vocabulary's HNSW index)
EXIT_TIMEOUT = 10  # seconds tritonserver waits for in-flight requests when stopped
STOP_TIMEOUT = 30.0  # then it is killed


@dataclass(frozen=True)
class Ports:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports nothing listens on now (for tests and side-by-side servers)."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(3)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in socks))


@dataclass(frozen=True)
class Tritonserver:
    binary: Path
    backends: Path | None  # the Python backend to stage with this interpreter's stub (bundled), or None (system's)
    libs: list[Path]  # on LD_LIBRARY_PATH
    bundled: bool


def find_tritonserver() -> Tritonserver:
    """The bundled binary (pip install 'ovseg[serve]'), else ``tritonserver`` on PATH; ServingError when neither."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).parent / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            libs = [Path(spec.origin).parent.parent / "nvidia_pytriton.libs", Path(sysconfig.get_config_var("LIBDIR"))]
            return Tritonserver(root / "bin" / "tritonserver", root / "backends", libs, True)
    found = shutil.which("tritonserver")
    if found:
        return Tritonserver(Path(found), None, [], False)
    raise ServingError(
        "no tritonserver: pip install 'ovseg[serve]' (the nvidia-pytriton wheel bundles one; `make serve-setup` makes "
        "that environment) or run in NVIDIA's Triton container (nvcr.io/nvidia/tritonserver)"
    )


def check_environment(server: Tritonserver) -> None:
    if server.bundled and int(np.__version__.split(".")[0]) >= 2:
        raise ServingError(
            f"the Triton Python backend that nvidia-pytriton bundles returns empty outputs with numpy {np.__version__}: "
            "run ovseg-serve from an environment with numpy < 2 (`make serve-setup`, then .venv-serve/bin/ovseg-serve)"
        )
    if server.bundled and not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServingError(
            f"{sys.executable} has no shared libpython, which Triton's Python backend stub loads: use a Python built "
            "with --enable-shared (Debian's, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )


class TritonServer:
    """tritonserver on ``repository``, started by ``start`` and stopped by ``stop`` (also as a context manager)."""

    def __init__(self, repository: Path, ports: Ports, host: str = "127.0.0.1", log: Path | None = None):
        self.repository, self.ports, self.host, self.log = Path(repository), ports, host, log
        self.server = find_tritonserver()
        self.process: subprocess.Popen | None = None
        self._staging: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.ports.grpc}"

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "grpc": self.grpc_url,
            "http": f"http://{self.host}:{self.ports.http}",
            "metrics": f"http://{self.host}:{self.ports.metrics}/metrics",
        }

    def start(self, timeout: float = READY_TIMEOUT) -> TritonServer:
        check_environment(self.server)
        if self.server.bundled and any(self.repository.glob("*/1/model.onnx")):
            raise ServingError(
                "the tritonserver nvidia-pytriton bundles has only the Python backend, and this repository puts the "
                "encoders on ONNX Runtime's: write it with --generate-only and serve it in NVIDIA's Triton container"
            )
        command = [
            str(self.server.binary),
            f"--model-repository={self.repository}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT}",
            "--strict-readiness=true",
        ]
        env = dict(os.environ)
        if self.server.bundled:
            assert self.server.backends is not None
            self._staging = Path(tempfile.mkdtemp(prefix="ovseg-triton-"))
            command.append(f"--backend-directory={stage_backends(self.server.backends, self._staging)}")
            command.append(f"--cache-directory={self.server.backends.parent / 'caches'}")
            libs = [str(p) for p in self.server.libs] + env.get("LD_LIBRARY_PATH", "").split(":")
            env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
            env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
            # The stub's numpy and ovseg come from this environment, ahead of the base interpreter's.
            paths = [sysconfig.get_paths()["purelib"], *env.get("PYTHONPATH", "").split(":")]
            env["PYTHONPATH"] = ":".join(p for p in paths if p)
        with open(self.log or os.devnull, "ab") as out:
            try:
                self.process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # stopped here, in order; not by the terminal's Ctrl-C
                    preexec_fn=_die_with_parent,
                )
            except OSError as e:
                raise ServingError(f"cannot start {self.server.binary}: {e.strerror}") from None
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ServingError(f"tritonserver exited ({code}) while loading the models; {self._log_hint()}")
            if ready(self.host, self.ports.http):
                return
            time.sleep(0.2)
        self.stop()
        raise ServingError(f"tritonserver was not ready after {timeout:.0f} s; {self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log or not self.log.exists():
            return "run ovseg-serve with --log FILE to see why"
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.startswith("E")]
        return f"its log ({self.log}) says: {lines[-1][:300] if lines else 'no error line'}"

    def stop(self) -> int | None:
        """SIGTERM (Triton unloads the models and ends its stubs), then SIGKILL to the group after STOP_TIMEOUT."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            code = self.process.returncode
            with contextlib.suppress(ProcessLookupError):  # stubs that outlived the server
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ready(host: str, http_port: int) -> bool:
    """Whether the tritonserver at ``host``:``http_port`` says it is ready (with --strict-readiness: every model)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:  # refused, not listening yet, or an HTTP error status
        return False


def _die_with_parent() -> None:
    """In the child: SIGKILL when ovseg-serve dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def stage_backends(bundled: Path, staging: Path) -> Path:
    """The bundled backends with the Python backend's stub for this interpreter's version (as pytriton does)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundled.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"nvidia-pytriton has no Python backend stub for Python {version}: use Python 3.8 to 3.13")
    backends = staging / "backends"
    shutil.copytree(bundled, backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends
