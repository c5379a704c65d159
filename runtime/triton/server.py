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
import re
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


def find_tritonserver() -> tuple[Path, Path | None]:
    """The binary the nvidia-pytriton wheel bundles (pip install 'ovseg[serve]') and its folder, else ``tritonserver``
    on PATH and None; ServingError when neither."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).parent / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return root / "bin" / "tritonserver", root
    found = shutil.which("tritonserver")
    if found:
        return Path(found), None
    raise ServingError(
        "no tritonserver: pip install 'ovseg[serve]' (the nvidia-pytriton wheel bundles one; `make serve-setup` makes "
        "that environment) or run in NVIDIA's Triton container (nvcr.io/nvidia/tritonserver)"
    )


class TritonServer:
    """tritonserver on ``repository``, started by ``start`` and stopped by ``stop``."""

    def __init__(self, repository: Path, ports: Ports, host: str = "127.0.0.1", log: Path | None = None):
        self.repository, self.ports, self.host, self.log = Path(repository), ports, host, log
        self.binary, self.bundled = find_tritonserver()  # bundled: the wheel's tritonserver folder, or None
        self.process: subprocess.Popen | None = None
        self._staging: Path | None = None

    def start(self, timeout: float = READY_TIMEOUT) -> TritonServer:
        command = [str(self.binary), f"--model-repository={self.repository}", "--exit-on-error=true"]
        command += [f"--exit-timeout-secs={EXIT_TIMEOUT}", "--strict-readiness=true"]
        for kind in ("grpc", "http", "metrics"):
            command += [f"--{kind}-address={self.host}", f"--{kind}-port={getattr(self.ports, kind)}"]
        env = dict(os.environ)
        if self.bundled is not None:
            command += self._stage(self.bundled, env)
        try:
            with open(self.log or os.devnull, "ab") as out:
                self.process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # stopped here, in order; not by the terminal's Ctrl-C
                    preexec_fn=_die_with_parent,
                )
        except OSError as e:  # an unwritable --log, or a binary that cannot run here
            raise ServingError(f"cannot start {self.binary} (log {self.log or 'off'}): {e.strerror or e}") from None
        try:
            wait_ready(self.process, self.host, self.ports.http, timeout)
        except ServingError as e:
            self.stop()
            raise ServingError(f"tritonserver {e}; {self._log_hint()}") from None
        return self

    def _stage(self, root: Path, env: dict[str, str]) -> list[str]:
        """The bundled tritonserver's checks, its backends with the Python backend's stub for this interpreter's
        version (as pytriton stages them), and its environment; its extra flags."""
        if int(np.__version__.split(".")[0]) >= 2:
            raise ServingError(
                f"the Triton Python backend that nvidia-pytriton bundles returns empty outputs with numpy "
                f"{np.__version__}: run ovseg-serve from an environment with numpy < 2 (`make serve-setup`, then "
                ".venv-serve/bin/ovseg-serve)"
            )
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise ServingError(
                f"{sys.executable} has no shared libpython, which Triton's Python backend stub loads: use a Python "
                "built with --enable-shared (Debian's, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)"
            )
        if any(self.repository.glob("*/1/model.onnx")):
            raise ServingError(
                "the tritonserver nvidia-pytriton bundles has only the Python backend, and this repository puts the "
                "encoders on ONNX Runtime's: write it with --generate-only and serve it in NVIDIA's Triton container"
            )
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServingError(
                f"nvidia-pytriton has no Python backend stub for Python {version}: use Python 3.8 to 3.13"
            )
        self._staging = Path(tempfile.mkdtemp(prefix="ovseg-triton-"))
        backends = shutil.copytree(root / "backends", self._staging / "backends")
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, *env.get("LD_LIBRARY_PATH", "").split(":")] if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        # The stub's numpy and ovseg come from this environment, ahead of the base interpreter's.
        paths = [sysconfig.get_paths()["purelib"], *env.get("PYTHONPATH", "").split(":")]
        env["PYTHONPATH"] = ":".join(p for p in paths if p)
        return [f"--backend-directory={backends}", f"--cache-directory={root / 'caches'}"]

    def _log_hint(self) -> str:
        if not self.log or not self.log.exists():
            return "run ovseg-serve with --log FILE to see why"
        text = self.log.read_text(errors="replace")
        lines = [ln.split("] ", 1)[-1] for ln in text.splitlines() if re.match(r"E\d{4} ", ln)]  # glog's error lines
        return f"its log ({self.log}) says: {lines[-1][:300] if lines else 'no error line'}"

    def stop(self) -> None:
        """SIGTERM (Triton unloads the models and ends its stubs), then SIGKILL to the group after STOP_TIMEOUT."""
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):  # a server that did not stop, stubs that outlived it
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def wait_ready(process: subprocess.Popen, host: str, http_port: int, timeout: float) -> None:
    """Until the tritonserver at ``host``:``http_port`` says it is ready (with --strict-readiness: every model);
    ServingError when ``process`` (the server, or what runs it) exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):  # refused, not listening yet, or an HTTP error status
            with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        if process.poll() is not None:
            raise ServingError(f"exited ({process.returncode}) while loading the models")
        if time.monotonic() > deadline:
            raise ServingError(f"was not ready after {timeout:.0f} s")
        time.sleep(0.2)


def _die_with_parent() -> None:
    """In the child: SIGKILL when ovseg-serve dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
