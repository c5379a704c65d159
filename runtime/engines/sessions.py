"""ONNX Runtime sessions: which backend "auto" is and whether a provider runs here (a one-node probe), how a session
is planned and opened, that it runs on the provider asked for (nothing falls back silently: what is asked for and not
available is a one-line SegmenterError), and the TensorRT provider's caches.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ovseg.constants import BACKENDS, ovseg_home
from ovseg.environment import gpu_onnxruntime_fix, gpu_unused_warning, tensorrt_link
from ovseg.errors import SegmenterError, one_line
from ovseg.onnx_helpers import session_options

from .device import device_key

log = logging.getLogger("ovseg")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
BACKEND_OF = {provider: backend for backend, provider in PROVIDERS.items()}
# Session config keys, as ONNX Runtime's onnxruntime_session_options_config_keys.h spells them.
DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
INTRA_OP_SPINNING = "session.intra_op.allow_spinning"
IMAGE_INPUT, BATCH_AXIS = "pixel_values", "batch"  # the image encoders' one input and its symbolic axis (ovseg-export)
TRT_CACHE = "trt_cache"  # under ovseg_home(): the TensorRT execution provider's engine and timing caches


def resolve_backend(backend: str, available: list[str] | None = None) -> str:
    """ "auto" -> "cuda" when ONNX Runtime's CUDA provider opens a session here, else "cpu" with one line saying why;
    an explicit GPU backend must open one here (``provider_problem``), else a SegmenterError naming what is missing.
    ``available``: the providers this onnxruntime was built with (ort.get_available_providers())."""
    if backend not in BACKENDS:
        raise SegmenterError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    available = ort.get_available_providers() if available is None else available
    if backend == "auto":
        unused = gpu_unused_warning(available)
        if unused:
            log.warning(unused)
        if PROVIDERS["cuda"] not in available:
            return "cpu"
        problem = provider_problem(PROVIDERS["cuda"])
        if problem:
            log.warning("backend auto runs on the CPU: CUDA cannot run here (%s)", problem)
            return "cpu"
        return "cuda"
    if backend == "cpu":
        return backend
    if PROVIDERS[backend] not in available:
        raise SegmenterError(
            f"backend {backend!r} needs ONNX Runtime's {PROVIDERS[backend]}, which this onnxruntime {ort.__version__} "
            f"does not have (it has {', '.join(available)}): {gpu_onnxruntime_fix()}, or use backend='cpu'"
        )
    problem = provider_problem(PROVIDERS[backend])
    if problem:
        raise SegmenterError(f"backend {backend!r} cannot run here: {problem}; or use backend='cpu'")
    return backend


PROBE_MODEL = Path(__file__).with_name("probe.onnx")  # y = x + 1 on one float: the smallest session a provider opens


@functools.cache
def provider_problem(provider: str) -> str | None:
    """Why ``provider`` cannot run a session on this machine, in words that name the missing driver or library, with
    what to do; None when it opens and runs a one-node model. Asked once per process (about a second on a GPU)."""
    load_gpu_libraries(provider)
    if not _loads("libcuda.so.1"):
        return "no NVIDIA driver (libcuda.so.1 does not load): install the driver, check it with nvidia-smi"
    library = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{BACKEND_OF[provider]}.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return (
            f"ONNX Runtime's {library.name} does not load ({one_line(e)}): install the CUDA libraries this "
            f"onnxruntime-gpu {ort.__version__} was built for ({cuda_build_note()}; `python -m ovseg.environment` "
            "says which)"
        )
    options = session_options(1)
    options.add_session_config_entry(DISABLE_CPU_FALLBACK, "1")
    try:
        with quiet_native_output():
            session = ort.InferenceSession(str(PROBE_MODEL), options, providers=[provider], enable_fallback=0)
            session.run(None, {"x": np.zeros(1, np.float32)})
    except Exception as e:  # any failure means the provider cannot run here; the first error says why
        return f"ONNX Runtime's {provider} does not open a session ({one_line(original_error(e))})"
    return None


def cuda_build_note() -> str:
    """ "a CUDA 13.0 build" as onnxruntime-gpu records it, or what it leaves unsaid."""
    try:
        from onnxruntime.capi import build_and_package_info as info

        return f"a CUDA {info.cuda_version} build"
    except (ImportError, AttributeError):
        return "its CUDA version is not recorded"


@functools.cache
def load_gpu_libraries(provider: str) -> None:
    """Load what a GPU provider needs from where pip put it, before the first GPU session: the CUDA and cuDNN wheels'
    libraries (onnxruntime.preload_dlls, ONNX Runtime 1.21+), and for TensorRT the tensorrt package, whose import
    loads its libnvinfer. ONNX Runtime's providers have no RPATH to those folders. What is missing is said later."""
    with quiet_native_output():
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        if provider == PROVIDERS["tensorrt"]:
            with contextlib.suppress(Exception):
                import tensorrt  # noqa: F401


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def original_error(e: BaseException) -> BaseException:
    """The error ONNX Runtime met first: before 1.23 its Python wrapper ignores enable_fallback=0, retries a failed
    session on the CPU, and raises the retry's error (often "Conflicting session configuration") from the first."""
    return e.__cause__ if e.__cause__ is not None else e


# --- how a session is opened ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionPlan:
    """How one ONNX Runtime session is opened, decided before it is: the providers in ORT's order (names, or
    (name, options)), intra-op threads (None: ORT's default, every core), session config entries, and the symbolic
    input axes fixed to a size."""

    providers: list
    threads: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    fixed_axes: dict[str, int] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        """The provider asked for: the first."""
        first = self.providers[0]
        return first[0] if isinstance(first, tuple) else first

    def options(self) -> ort.SessionOptions:
        options = session_options(self.threads)
        for key, value in self.config.items():
            options.add_session_config_entry(key, value)
        for name, size in self.fixed_axes.items():
            options.add_free_dimension_override_by_name(name, size)
        return options


def session_plan(
    backend: str,
    precision: str = "fp32",
    threads: int | None = None,
    image_size: int | None = None,
    trt_cache: Path | None = None,
) -> SessionPlan:
    """The session of an image encoder at ``image_size``, or of the text encoder (``image_size=None``), on ``backend``
    (resolve_backend's).

    cpu: ONNX Runtime's defaults with ``threads``. cuda and tensorrt: ORT's CPU thread pool is one thread (``threads``
    overrides it) that does not spin, so it leaves the cores to the native post-processing. An image encoder runs
    whole on the GPU: CPU fallback is disabled (ORT then refuses the CPU provider in the list), and the batch axis is
    fixed to 1 so that no shape arithmetic is left for ORT to place on the CPU; its engine then takes one frame a run
    (``max_batch``), and ``Segmenter.batch`` runs the frames of a batch one by one. The text encoder's inputs stay
    dynamic and its shape arithmetic may run on the CPU; CUDA must still be its first provider (check_providers).
    ``trt_cache``: the TensorRT provider's cache directory (trt_cache_dir), for backend "tensorrt".
    """
    if backend == "cpu":
        return SessionPlan([PROVIDERS["cpu"]], threads)
    threads, config = threads or 1, {INTRA_OP_SPINNING: "0"}
    if image_size is None:
        return SessionPlan([PROVIDERS["cuda"], PROVIDERS["cpu"]], threads, config)
    config[DISABLE_CPU_FALLBACK] = "1"
    if backend == "cuda":
        return SessionPlan([PROVIDERS["cuda"]], threads, config, {BATCH_AXIS: 1})
    # engine and timing caches in trt_cache (user-writable, never the bundle), and one fixed profile for the one input,
    # so that the engine is built when the session is created, not inside a run
    shape = f"{IMAGE_INPUT}:1x3x{image_size}x{image_size}"
    trt: dict[str, str | bool] = {"trt_fp16_enable": precision == "fp16"}
    for kind in ("engine", "timing"):
        trt |= {f"trt_{kind}_cache_enable": True, f"trt_{kind}_cache_path": str(trt_cache)}
    for kind in ("min", "opt", "max"):
        trt[f"trt_profile_{kind}_shapes"] = shape
    return SessionPlan([(PROVIDERS["tensorrt"], trt), PROVIDERS["cuda"]], threads, config, {BATCH_AXIS: 1})


def trt_cache_dir(digest: str, precision: str) -> Path:
    """Where the TensorRT provider caches the engine of the ONNX file with sha256 ``digest`` at ``precision`` on this
    device: an engine holds to its file, precision, GPU, ONNX Runtime and TensorRT, and the provider does not tell
    those apart itself (it would load a stale engine after an upgrade)."""
    return ovseg_home() / TRT_CACHE / f"{digest[:16]}-{precision}" / device_key() / provider_versions()


def provider_versions() -> str:
    """ONNX Runtime's version and that of the TensorRT its TensorRT provider loads, as a path component
    ("ort-1.31.1_trt-10.16.1"): the libnvinfer the provider links (libnvinfer.so.10), as the loader finds it here once
    the tensorrt package has loaded pip's (which may be another major: its version would name the wrong engines);
    "trt-unknown" where none loads, so the directory still changes with ONNX Runtime."""
    load_gpu_libraries(PROVIDERS["tensorrt"])
    soname = tensorrt_link()
    try:
        version = int(ctypes.CDLL(soname).getInferLibVersion()) if soname else None
    except (OSError, AttributeError):
        version = None
    trt = f"{version // 10000}.{version // 100 % 100}.{version % 100}" if version else "unknown"  # 10.16.1: 101601
    return f"ort-{ort.__version__}_trt-{trt}"


def open_trt_cache(cache: Path, name: str) -> None:
    """Create ``cache``, and say so when the TensorRT provider is about to build ``name``'s engine there."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegmenterError(
            f"cannot create the TensorRT engine cache {cache} ({e.strerror}): set OVSEG_HOME to a writable directory"
        ) from None
    if not any(cache.glob("*.engine")):
        log.warning(
            "TensorRT builds the engine of %s now, before the first frame: this takes minutes on a Jetson, once per "
            "device and precision; it is cached in %s",
            name,
            cache,
        )


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """What is written to stdout inside goes to stderr, from Python and from native code (file descriptor 1, so
    process-wide while it lasts): ONNX Runtime prints fallbacks and provider errors to stdout, which
    ``ovseg-run --json`` keeps for results."""
    with _descriptors_to(2, (1,)), contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Nothing written inside reaches stdout or stderr, from Python or native code: for probes whose failures ovseg
    says in its own words (ONNX Runtime logs a provider it cannot load, and preload_dlls prints each library)."""
    with open(os.devnull, "w") as null, _descriptors_to(null.fileno(), (1, 2)):
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield


@contextlib.contextmanager
def _descriptors_to(target: int, descriptors: tuple[int, ...]) -> Iterator[None]:
    """File descriptors ``descriptors`` point at ``target`` inside, and back after; one missing is left alone."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: dict[int, int] = {}
    for fd in descriptors:
        with contextlib.suppress(OSError):  # no such descriptor: nothing to keep clean
            saved[fd] = os.dup(fd)
            os.dup2(target, fd)
    try:
        yield
    finally:
        # C's stdout buffer (and C++'s std::cout, synced with it) reaches descriptor 1 when flushed; no C library to
        # reach: not Linux or macOS
        with contextlib.suppress(OSError, AttributeError, TypeError):
            ctypes.CDLL(None).fflush(None)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def check_providers(session, plan: SessionPlan, path: Path, nodes: Mapping[str, int] | None = None) -> str:
    """The backend ``session`` runs on: the providers that ran ``nodes`` (nodes per provider in one profiled run) where
    given ("tensorrt", or "tensorrt+cuda" when TensorRT left nodes to CUDA; said once), else its first registered one.
    A SegmenterError unless the provider ``plan`` asked for is the first registered and runs nodes."""
    asked, got = plan.provider, list(session.get_providers())
    if not got or got[0] != asked or (nodes is not None and not nodes.get(asked)):
        where = ", ".join(f"{p} ({n} nodes)" for p, n in nodes.items()) if nodes else ", ".join(got) or "no provider"
        raise SegmenterError(
            f"ONNX Runtime {ort.__version__} was asked for {asked} to run {path.name} and ran it on {where}: "
            f"{provider_fix(asked)}"
        )
    if nodes is None:
        return BACKEND_OF.get(asked, asked)
    ran = [p for p in got if nodes.get(p)]
    if ran != [asked]:
        log.warning(
            "%s: %s runs %d of its %d nodes, %s the rest",
            path.name,
            asked,
            nodes[asked],
            sum(nodes.values()),
            " and ".join(p for p in ran if p != asked),
        )
    return "+".join(BACKEND_OF.get(p, p) for p in ran)


def provider_fix(provider: str) -> str:
    """What to do when ``provider`` is asked for and ONNX Runtime does not run on it."""
    if provider not in ort.get_available_providers():
        return f"this onnxruntime has no {provider}: {gpu_onnxruntime_fix()}, or use backend='cpu'"
    problem = provider_problem(provider)
    other = "backend='cuda' or " if provider == PROVIDERS["tensorrt"] else ""
    return f"{problem or 'ONNX Runtime warned why on stderr'}; or use {other}backend='cpu'"


def placement(session, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """How many nodes each provider ran in one run of ``session`` on ``feed``, from ONNX Runtime's profile of it (the
    session must be opened with profiling on; this run ends it and deletes its file)."""
    session.run(None, feed)
    path = Path(session.end_profiling())
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    nodes: dict[str, int] = {}
    for event in events:
        provider = event.get("args", {}).get("provider") if event.get("cat") == "Node" else None
        if provider and event.get("name", "").endswith("_kernel_time"):
            nodes[provider] = nodes.get(provider, 0) + 1
    return nodes


class OnnxEncoder:
    """One ONNX Runtime session, created once on the provider asked for (checked), with a preallocated input and IO
    binding on a GPU. ``plan``: a SessionPlan, or a providers list opened with ORT's defaults.
    An image encoder on a GPU (``input_shape`` given) runs once at opening, profiled, to learn where its nodes ran."""

    def __init__(
        self,
        path: Path,
        plan: SessionPlan | list,
        input_shape: tuple[int, ...] | None = None,
        io_binding: bool | None = None,
        outputs: Sequence[str] | None = None,
    ):
        self.path = Path(path)
        plan = plan if isinstance(plan, SessionPlan) else SessionPlan(list(plan))
        self.max_batch = plan.fixed_axes.get(BATCH_AXIS)  # frames a run takes (None: any number)
        options, profiled = plan.options(), plan.provider != PROVIDERS["cpu"] and input_shape is not None
        if profiled:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"ovseg_{self.path.stem}_{id(self)}")
        if plan.provider != PROVIDERS["cpu"]:
            load_gpu_libraries(plan.provider)
        try:
            with stdout_to_stderr():
                # enable_fallback=0: on a failure ORT's Python wrapper would print and retry on the CPU (ORT 1.23+)
                self.session = ort.InferenceSession(str(path), options, providers=plan.providers, enable_fallback=0)
        except Exception as e:  # ORT raises several unrelated types; all mean "this file cannot run here"
            fix = "" if plan.provider == PROVIDERS["cpu"] else f"; {provider_fix(plan.provider)}"
            raise SegmenterError(
                f"ONNX Runtime cannot load {self.path.name} on {plan.provider}: "
                f"{one_line(original_error(e)).rstrip('.')}{fix}"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise SegmenterError(
                f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one: re-export the bundle"
            )
        self.input_name = inputs[0].name
        self.input = np.zeros(input_shape or 0, np.float32)
        if input_shape:
            _check_shape(self.path.name, inputs[0], input_shape)
        self.output_names = _pick_outputs(self.path.name, [o.name for o in self.session.get_outputs()], outputs)
        self.session.disable_fallback()  # nor move the session to the CPU when a run fails (every ORT version)
        nodes = None
        if profiled:
            try:
                with stdout_to_stderr():
                    nodes = placement(self.session, {self.input_name: self.input})
            except Exception as e:  # a first run that fails on the provider fails the opening, in one line
                raise SegmenterError(
                    f"ONNX Runtime cannot run {self.path.name} on {plan.provider}: {one_line(e)}"
                ) from None
        self.backend = check_providers(self.session, plan, self.path, nodes)
        self.io_binding = self.backend != "cpu" if io_binding is None else io_binding
        self._binding = None
        if self.io_binding and input_shape:
            self._binding = self.session.io_binding()
            for name in self.output_names:
                self._binding.bind_output(name, "cpu")

    def run(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run on ``x``, or on the preallocated ``self.input`` when ``x`` is None."""
        if self.session is None:
            raise SegmenterError(f"the session of {self.path.name} is closed: open the Segmenter again")
        try:
            if x is None and self._binding is not None:
                self._binding.bind_cpu_input(self.input_name, self.input)  # ORT copies it to the device inside the run
                self.session.run_with_iobinding(self._binding)
                outputs = self._binding.copy_outputs_to_cpu()
            else:
                outputs = self.session.run(self.output_names, {self.input_name: self.input if x is None else x})
        except Exception as e:  # ORT's exception types share no base below Exception
            raise SegmenterError(
                f"ONNX Runtime failed to run {self.path.name} on {self.backend}: {one_line(e)}"
            ) from None
        return dict(zip(self.output_names, outputs))

    def close(self) -> None:
        self._binding = None
        self.session = None


def _pick_outputs(file: str, have: list[str], wanted: Sequence[str] | None) -> list[str]:
    missing = [n for n in wanted or () if n not in have]
    if missing:
        raise SegmenterError(
            f"{file} has no output {', '.join(missing)} (it has {', '.join(have)}): re-export the bundle"
        )
    return list(wanted) if wanted else have


def _check_shape(name: str, node, shape: tuple[int, ...]) -> None:
    declared = node.shape
    fits = len(declared) == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(declared, shape))
    if not fits or node.type != "tensor(float)":
        raise SegmenterError(
            f"{name} takes {node.name} {node.type} {list(declared)}, the runtime feeds float {list(shape)}: "
            "the file does not fit the manifest; re-export with `ovseg-export --force`"
        )
