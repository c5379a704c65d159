"""Inference engines: one ONNX Runtime session per encoder, the native TensorRT runner, and how both are chosen.

Every engine is created once and owns its input buffer: the preprocessor writes the next frame into
``engine.input`` and ``engine.run()`` returns the outputs by name (arrays the caller may keep).
What is asked for and not available (a provider, a precision file) is a one-line SegmenterError, and so is a session
that ONNX Runtime opened on another provider than the one asked for: nothing falls back silently. ``engine.backend``
is the backend the engine runs on, as ONNX Runtime reports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from ovseg.constants import BACKENDS, ovseg_home
from ovseg.environment import gpu_onnxruntime_fix, gpu_unused_warning, is_jetson
from ovseg.errors import OvsegError
from ovseg.onnx_helpers import session_options

from .bundle import DeviceInfo, EncoderInfo, Manifest, sha256_file
from .precision import GPU_DEVICES, pick_precision

log = logging.getLogger("ovseg")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
BACKEND_OF = {provider: backend for backend, provider in PROVIDERS.items()}
# Session config keys, as ONNX Runtime's onnxruntime_session_options_config_keys.h spells them.
DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
INTRA_OP_SPINNING = "session.intra_op.allow_spinning"
IMAGE_INPUT, BATCH_AXIS = "pixel_values", "batch"  # the image encoders' one input and its symbolic axis (ovseg-export)
TRT_CACHE = "trt_cache"  # under ovseg_home(): the TensorRT execution provider's engine and timing caches


class SegmenterError(OvsegError, RuntimeError):
    """The Segmenter cannot do what was asked; the message is one line saying what is missing."""


class Engine(Protocol):
    input: np.ndarray  # preallocated (1, 3, S, S) float32, written by the preprocessor
    backend: str  # what it runs on

    def run(self) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BatchEngine(Engine, Protocol):
    """An Engine whose ``run(x)`` also takes a batch of inputs (N, 3, S, S); ``batched`` is True."""

    batched: bool

    def run(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]: ...


def resolve_backend(backend: str, available: list[str] | None = None) -> str:
    """ "auto" -> "cuda" when ONNX Runtime has CUDA, else "cpu"; an explicit backend must be available."""
    if backend not in BACKENDS:
        raise SegmenterError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    available = ort.get_available_providers() if available is None else available
    if backend == "auto":
        unused = gpu_unused_warning(available)
        if unused:
            log.warning(unused)
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if PROVIDERS[backend] not in available:
        raise SegmenterError(
            f"backend {backend!r} needs ONNX Runtime's {PROVIDERS[backend]}, which this onnxruntime {ort.__version__} "
            f"does not have (it has {', '.join(available)}): {gpu_onnxruntime_fix()}, or use backend='cpu'"
        )
    return backend


def choose_precision(manifest: Manifest, backend: str, requested: str) -> str:
    """The image encoders' precision (runtime.precision.pick_precision: gated, never a silent fallback); on a GPU,
    "auto" looks up what ovseg-check recorded for this device (``gpu_key``)."""
    refuse_cuda_int8(backend, requested)
    key = gpu_key() if backend in GPU_DEVICES and requested == "auto" else None
    try:
        return pick_precision(manifest, backend, requested, key)
    except ValueError as e:
        raise SegmenterError(str(e)) from None


def refuse_cuda_int8(backend: str, precision: str) -> None:
    """The bundle's int8 ONNX files are ovseg-calib's CPU models: they are not for ONNX Runtime's CUDA provider."""
    if backend == "cuda" and precision == "int8":
        raise SegmenterError(
            "precision int8 on backend 'cuda' would run ovseg-calib's CPU model (uint8 activations, int8 weights, made "
            "for the CPU's integer kernels) on the GPU: use precision='fp16' on CUDA or on backend='tensorrt' (plans from "
            "`ovseg-build --fp16`), or backend='cpu' for int8"
        )


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


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
    """The session of an image encoder at ``image_size``, or of the text encoder (``image_size=None``), on ``backend``.

    cpu: ONNX Runtime's defaults with ``threads``. cuda and tensorrt: ORT's CPU thread pool is one thread (``threads``
    overrides it) that does not spin, so it leaves the cores to the native post-processing. An image encoder runs
    whole on the GPU: CPU fallback is disabled (ORT then refuses the CPU provider in the list), and on CUDA the batch
    axis is fixed to 1 so that no shape arithmetic is left for ORT to place on the CPU. The text encoder's inputs stay
    dynamic and its shape arithmetic may run on the CPU; CUDA must still be its first provider (check_providers).
    ``trt_cache``: the TensorRT provider's cache directory (trt_cache_dir), needed for backend "tensorrt".
    """
    if backend == "cpu":
        return SessionPlan([PROVIDERS["cpu"]], threads)
    if backend not in PROVIDERS:
        raise SegmenterError(f"unknown backend {backend!r}: choose one of {', '.join(PROVIDERS)}")
    threads, config = threads or 1, {INTRA_OP_SPINNING: "0"}
    if image_size is None:
        return SessionPlan([PROVIDERS["cuda"], PROVIDERS["cpu"]], threads, config)
    config[DISABLE_CPU_FALLBACK] = "1"
    if backend == "cuda":
        return SessionPlan([PROVIDERS["cuda"]], threads, config, {BATCH_AXIS: 1})
    if trt_cache is None:
        raise ValueError("backend 'tensorrt' needs the TensorRT provider's cache directory (trt_cache_dir)")
    trt = (PROVIDERS["tensorrt"], tensorrt_options(precision, image_size, trt_cache))
    return SessionPlan([trt, PROVIDERS["cuda"]], threads, config)


def tensorrt_options(precision: str, image_size: int, cache: Path) -> dict[str, str | bool]:
    """The TensorRT provider's options: engine and timing caches in ``cache`` (user-writable, never the bundle), and
    one fixed profile for the one input, so the engine is built when the session is created, not inside a run."""
    shape = f"{IMAGE_INPUT}:1x3x{image_size}x{image_size}"
    return {
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": shape,
        "trt_profile_opt_shapes": shape,
        "trt_profile_max_shapes": shape,
    }


def trt_cache_dir(digest: str, precision: str) -> Path:
    """Where the TensorRT provider caches the engine of the ONNX file with sha256 ``digest`` at ``precision`` on this
    device: an engine holds to its file, precision, GPU, ONNX Runtime and TensorRT, and the provider does not tell
    those apart itself (it would load a stale engine after an upgrade)."""
    return ovseg_home() / TRT_CACHE / f"{digest[:16]}-{precision}" / device_key() / provider_versions()


def provider_versions() -> str:
    """ONNX Runtime's and TensorRT's versions as a path component ("ort-1.20.1_trt-10.3.0"). TensorRT's is the
    tensorrt package's (the libraries a pip-installed provider loads, JetPack's on a Jetson); "trt-unknown" where it
    does not import, so the directory still changes with ONNX Runtime."""
    try:
        import tensorrt

        trt = str(tensorrt.__version__)
    except ImportError:
        trt = "unknown"
    return f"ort-{ort.__version__}_trt-{trt}"


def device_key() -> str:
    """The GPU's name as a path component ("nvidia-geforce-rtx-4090"), or "gpu0" when nothing here tells it."""
    name = gpu_name()
    key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else ""
    return key or "gpu0"


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The name of the GPU that CUDA calls device 0 (ONNX Runtime's and TensorRT's): a Jetson's model from the device
    tree, else cuda-python's, else nvidia-smi's; None when none tells."""
    model = Path("/proc/device-tree/model")
    if is_jetson() and model.is_file():
        return model.read_text(errors="replace").strip("\0 \n") or None
    prop = _device_0_properties()
    if prop is not None:
        return _device_name(prop) or None
    return _nvidia_smi("name")


@functools.lru_cache(maxsize=1)
def gpu_compute_capability() -> str | None:
    """Device 0's compute capability ("8.7"): cuda-python's when it imports, else nvidia-smi's; None when neither tells."""
    prop = _device_0_properties()
    if prop is not None:
        return f"{prop.major}.{prop.minor}"
    capability = _nvidia_smi("compute_cap")
    return capability if capability and re.fullmatch(r"\d+\.\d+", capability) else None


def _device_0_properties():
    """cuda-python's properties of CUDA's device 0; None without cuda-python, a driver or a device."""
    try:
        err, prop = _cudart().cudaGetDeviceProperties(0)
        return prop if int(err) == 0 else None
    except Exception:  # whatever cuda-python raises without a driver or device: the caller asks nvidia-smi
        return None


def _device_name(prop) -> str:
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.strip("\0 ")


def cuda_device_0() -> str | None:
    """nvidia-smi's --id of the GPU CUDA calls device 0: the first entry of CUDA_VISIBLE_DEVICES (an index or a
    UUID), else 0; None when it hides every GPU. An index names the same GPU for both only in PCI bus order
    (CUDA_DEVICE_ORDER=PCI_BUS_ID, or GPUs all alike); a UUID always does."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return None if not first or first.startswith("-") else first


def _nvidia_smi(field: str) -> str | None:
    """nvidia-smi's ``field`` of CUDA's device 0; None without nvidia-smi, a visible GPU or an answer."""
    smi, device = shutil.which("nvidia-smi"), cuda_device_0()
    if smi is None or device is None:
        return None
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={field}", "--format=csv,noheader", f"--id={device}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0].strip() if lines else None


def gpu_key() -> str | None:
    """This GPU as ovseg-check records its verdicts and precision="auto" looks them up: its name and compute
    capability ("NVIDIA H200, compute 9.0"; the TensorRT version is not part of it); None when no GPU is seen."""
    name = gpu_name()
    if not name:
        return None
    capability = gpu_compute_capability()
    return f"{name}, compute {capability}" if capability else name


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
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
    except OSError:  # no stdout descriptor: nothing to keep clean
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            _flush_c_stdout()
            os.dup2(saved, 1)
            os.close(saved)


def _flush_c_stdout() -> None:
    """C's stdout buffer (and C++'s std::cout, synced with it) is written to descriptor 1 when flushed."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to reach (not Linux or macOS)
        ctypes.CDLL(None).fflush(None)


def check_providers(session, plan: SessionPlan, path: Path) -> str:
    """The backend ``session`` runs on; a SegmenterError unless its first provider is the one ``plan`` asked for."""
    asked, got = plan.provider, list(session.get_providers())
    if got and got[0] == asked:
        return BACKEND_OF.get(asked, asked)
    raise SegmenterError(
        f"ONNX Runtime {ort.__version__} was asked for {asked} to run {path.name} and opened it on "
        f"{', '.join(got) or 'no provider'}: {provider_fix(asked)}"
    )


def provider_fix(provider: str) -> str:
    """What to do when ``provider`` is asked for and ONNX Runtime does not run on it."""
    if provider not in ort.get_available_providers():
        return f"this onnxruntime has no {provider}: {gpu_onnxruntime_fix()}, or use backend='cpu'"
    libraries, other = (
        ("TensorRT", "backend='cuda' or ") if provider == PROVIDERS["tensorrt"] else ("CUDA and cuDNN", "")
    )
    return (
        f"ONNX Runtime's warnings on stderr say why (a {libraries} library it could not load: install the one this "
        f"onnxruntime-gpu was built for), or use {other}backend='cpu'"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --- engines -------------------------------------------------------------------------------------------------------


def open_engine(
    bundle_dir: Path,
    info: EncoderInfo,
    role: str,
    backend: str,
    precision: str,
    threads: int | None,
    *,
    outputs: Sequence[str] | None = None,
    digests: Mapping[str, str] | None = None,
) -> OnnxEncoder | TensorRTEngine:
    """The engine for one image encoder at its input size: a native TensorRT plan when there is one and TensorRT
    imports, else ONNX Runtime.

    ``outputs``: the outputs the caller reads (None: all); ``digests``: the manifest's sha256 per file, for the
    TensorRT provider's cache key (else the file is hashed here)."""
    image_size = info.image_size
    shape = (1, 3, image_size, image_size)
    refuse_cuda_int8(backend, precision)
    plan = info.files.get(f"trt_{precision}")
    if backend == "tensorrt" and plan and tensorrt_importable():
        foreign = foreign_plan(info, f"trt_{precision}")
        if foreign is None:
            with stdout_to_stderr():
                return TensorRTEngine(bundle_dir / plan, shape, outputs)
        log.warning(
            "%s: skipped, so TensorRT's execution provider runs instead; `ovseg-build` here builds one", foreign
        )
        plan = None
    if backend == "tensorrt" and precision == "int8":  # the EP cannot take the CPU's uint8 Q/DQ model, nor calibrate
        raise SegmenterError(
            f"int8 on TensorRT runs the {role} encoder's int8 plan, and "
            + (
                "the bundle has none for this device: `ovseg-calib --tensorrt` makes their model, `ovseg-build --int8` "
                "here builds them; or use precision='fp16'"
                if not plan
                else "the tensorrt package does not import here: pip install 'ovseg[tensorrt]'"
            )
        )
    onnx_file = info.files.get(precision)
    if backend == "tensorrt":
        onnx_file = info.files.get("fp32")  # the EP builds its own fp16 engine from the fp32 graph
    if onnx_file is None:
        raise SegmenterError(
            f"the bundle has only {', '.join(sorted(info.files))} for the {role} encoder, not an ONNX {precision} file: "
            f"re-export with `ovseg-export --{precision}`"
        )
    path = bundle_dir / onnx_file
    cache = None
    if backend == "tensorrt":
        cache = trt_cache_dir((digests or {}).get(onnx_file) or sha256_file(path), precision)
        open_trt_cache(cache, f"the {role} encoder ({precision})")
    return OnnxEncoder(path, session_plan(backend, precision, threads, image_size, cache), None, shape, outputs=outputs)


def foreign_plan(info: EncoderInfo, key: str) -> str | None:
    """Why the plan ``info.files[key]`` was built for another device, or None (a plan without a record is tried)."""
    record = info.plans.get(key)
    if record is None:
        return None
    device = this_device()
    if record.fits(device):
        return None
    return (
        f"{info.files[key]} was built for {record.gpu} (compute {record.compute_capability}), TensorRT "
        f"{record.tensorrt}; this is {device}"
    )


@functools.lru_cache(maxsize=1)
def this_device() -> DeviceInfo:
    """TensorRT's version and GPU 0's name and compute capability (cuda-python), as a plan's record has them."""
    import tensorrt as trt

    err, prop = _cudart().cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise SegmenterError(f"CUDA cannot read the GPU's properties ({err}): check the driver with nvidia-smi")
    return DeviceInfo(str(trt.__version__), _device_name(prop), f"{prop.major}.{prop.minor}")


class OnnxEncoder:
    """One ONNX Runtime session, created once on the provider asked for (checked), with a preallocated input and IO
    binding on a GPU. ``plan``: a SessionPlan, or a providers list opened with ``threads`` and nothing else."""

    batched = True  # run(x) takes a batch of inputs (the exported encoders have a dynamic batch axis)

    def __init__(
        self,
        path: Path,
        plan: SessionPlan | list,
        threads: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        io_binding: bool | None = None,
        outputs: Sequence[str] | None = None,
    ):
        self.path = Path(path)
        plan = plan if isinstance(plan, SessionPlan) else SessionPlan(list(plan), threads)
        try:
            with stdout_to_stderr():
                # enable_fallback=0: on a failure ORT's Python wrapper would print and retry on the CPU
                self.session = ort.InferenceSession(
                    str(path), plan.options(), providers=plan.providers, enable_fallback=0
                )
        except Exception as e:  # ORT raises several unrelated types; all mean "this file cannot run here"
            fix = "" if plan.provider == PROVIDERS["cpu"] else f"; {provider_fix(plan.provider)}"
            raise SegmenterError(
                f"ONNX Runtime cannot load {self.path.name} on {plan.provider}: {_one_line(e).rstrip('.')}{fix}"
            ) from None
        self.backend = check_providers(self.session, plan, self.path)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise SegmenterError(
                f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one: re-export the bundle"
            )
        self.input_name = inputs[0].name
        self.input = np.zeros(input_shape, np.float32) if input_shape else np.zeros(0, np.float32)
        if input_shape:
            _check_shape(self.path.name, inputs[0], input_shape)
        self.output_names = _pick_outputs(self.path.name, [o.name for o in self.session.get_outputs()], outputs)
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
                f"ONNX Runtime failed to run {self.path.name} on {self.backend}: {_one_line(e)}"
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


class TensorRTEngine:
    """A TensorRT 10 plan: deserialised once; a device buffer per tensor, pinned host buffers for the input and the
    outputs read, allocated once; run with execute_async_v3 on one stream. Never run on a GPU yet (README)."""

    backend = "tensorrt"

    def __init__(self, plan: Path, input_shape: tuple[int, ...], outputs: Sequence[str] | None = None):
        import tensorrt as trt

        self._cudart = _cudart()
        self.path = Path(plan)
        self.stream = None
        self.device: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        except TypeError:  # the bindings' NULL runtime: no usable GPU or driver (TensorRT logged why)
            raise SegmenterError(
                f"TensorRT cannot create a runtime here for {self.path.name} (no usable CUDA GPU or driver: TensorRT's "
                "message above says which): check it with nvidia-smi, or use backend='cpu'"
            ) from None
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SegmenterError(
                f"TensorRT cannot load {self.path.name} (plans are per device and TensorRT version): rebuild it here"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise SegmenterError(
                f"TensorRT cannot create an execution context for {self.path.name} (out of GPU memory?)"
            )
        try:
            self._allocate(trt, tuple(input_shape), outputs)
        except BaseException:
            self.close()
            raise

    def _allocate(self, trt, input_shape: tuple[int, ...], outputs: Sequence[str] | None) -> None:
        rt = self._cudart
        self.stream = self._cuda(rt.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        if len(inputs) != 1:
            raise SegmenterError(f"{self.path.name} has {len(inputs)} inputs, the runtime feeds one")
        self.input_name = inputs[0]
        if not self.context.set_input_shape(self.input_name, input_shape):
            raise SegmenterError(
                f"{self.path.name} does not take {self.input_name} of shape {input_shape} (outside its optimisation "
                "profile): rebuild the plan from this bundle"
            )
        self.output_names = _pick_outputs(self.path.name, [n for n in names if not is_input[n]], outputs)
        for n in names:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise SegmenterError(f"{self.path.name} leaves the shape of {n} open ({shape}) at input {input_shape}")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.device[n] = self._cuda(rt.cudaMalloc(nbytes))
            self.context.set_tensor_address(n, self.device[n])
            if n == self.input_name or n in self.output_names:
                self.pinned[n] = self._cuda(rt.cudaMallocHost(nbytes))
                buffer = (ctypes.c_byte * nbytes).from_address(self.pinned[n])
                self.host[n] = np.frombuffer(buffer, dtype).reshape(shape)
        self.input = self.host[self.input_name]
        if self.input.shape != input_shape or self.input.dtype != np.float32:
            raise SegmenterError(
                f"{self.path.name} takes {self.input.dtype} {self.input.shape}, the runtime feeds float32 {input_shape}"
            )

    def _cuda(self, result):
        err, *values = result
        if int(err) != 0:
            raise SegmenterError(f"CUDA call failed with {err} while running {self.path.name}")
        return values[0] if values else None

    def run(self) -> dict[str, np.ndarray]:
        rt = self._cudart
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        x = self.host[self.input_name]
        self._cuda(rt.cudaMemcpyAsync(self.device[self.input_name], x.ctypes.data, x.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise SegmenterError(f"TensorRT failed to run {self.path.name}")
        for n in self.output_names:
            out = self.host[n]
            self._cuda(rt.cudaMemcpyAsync(out.ctypes.data, self.device[n], out.nbytes, d2h, self.stream))
        self._cuda(rt.cudaStreamSynchronize(self.stream))
        # The next run overwrites the pinned buffers, and callers keep outputs (keyframes, per thread): one host copy.
        return {n: self.host[n].copy() for n in self.output_names}

    def close(self) -> None:
        rt = self._cudart
        for ptr in self.device.values():
            rt.cudaFree(ptr)
        for ptr in self.pinned.values():
            rt.cudaFreeHost(ptr)
        self.device.clear()
        self.pinned.clear()
        self.host.clear()
        self.input = np.zeros(0, np.float32)  # the pinned buffer it viewed is freed
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise SegmenterError(
                "the TensorRT runner needs NVIDIA's cuda-python for device memory: pip install cuda-python"
            ) from None
    return runtime
