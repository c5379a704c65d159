"""The bundle: the directory that ``ovseg-export`` writes and the runtime reads.

A bundle holds ``manifest.json`` plus the files it lists (ONNX encoders per
precision, text embeddings, HNSW index, vocabulary, tokenizer). Every file is
listed with its sha256; the runtime refuses a bundle whose files do not match,
that names a file outside itself, or whose files are not whole (bundle.integrity).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovseg.errors import one_line
from ovseg.profiles import DEFAULT_PROFILE

from .integrity import BundleError, check_fields, check_files, confine
from .signing import SIGNATURE, configured_key_files, sign_dir, verify_bundle

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENCODER_NAMES = {"clip": "CLIP", "dinov2": "DINOv2"}  # the image encoders' Manifest attributes -> their names


@dataclass
class EncoderInfo:
    """One image encoder: how to feed it and what comes out."""

    model: str  # e.g. "ViT-B-16" or "facebook/dinov2-small"
    weights: str  # where the weights came from ("openai", a path, "random")
    image_size: int  # square input side S: (1, 3, S, S), a multiple of patch_size
    patch_size: int
    grid: tuple[int, int]  # tokens (rows, cols) at image_size
    embed_dim: int  # width of the output tokens
    mean: tuple[float, float, float]  # RGB, applied to pixels in [0, 1]
    std: tuple[float, float, float]
    files: dict[str, str] = field(default_factory=dict)  # precision -> file name
    plans: dict[str, PlanRecord] = field(default_factory=dict)  # "trt_<precision>" -> what its plan was built for


@dataclass(frozen=True)
class PlanRecord:
    """Where a TensorRT plan was built (a plan runs only there) and how it compared with fp32 ONNX on the CPU."""

    source: str  # the ONNX file it was built from
    tensorrt: str  # TensorRT version
    gpu: str  # GPU name
    compute_capability: str  # "8.7"
    min_cosine: float  # worst per-token cosine of every output against the fp32 ONNX on the CPU
    mean_cosine: float
    # segment-label agreement of the Segmenter on both encoders' plans of this precision against CPU fp32 (None: built
    # before ovseg-build measured it)
    label_agreement: float | None = None

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(self.tensorrt, self.gpu, self.compute_capability)

    def fits(self, device: DeviceInfo) -> bool:
        return self.device == device


@dataclass(frozen=True)
class DeviceInfo:
    """This machine as a plan sees it."""

    tensorrt: str
    gpu: str
    compute_capability: str

    def __str__(self) -> str:
        return f"{self.gpu} (compute {self.compute_capability}), TensorRT {self.tensorrt}"


@dataclass
class TextInfo:
    """The CLIP text encoder and the vocabulary embedded with it."""

    context_length: int
    embed_dim: int
    templates: list[str]  # prompt ensemble: averaged, then L2-normalised
    tokenizer: str  # tokenizers JSON file name
    files: dict[str, str] = field(default_factory=dict)  # precision -> ONNX file name
    logit_scale: float = 100.0


@dataclass
class VocabularyInfo:
    source: str  # preset name or file name it was read from
    size: int
    names: str  # text file, one name per line
    embeddings: dict[str, str] = field(default_factory=dict)  # "fp32"/"fp16" -> .npy
    hnsw: str = ""  # hnswlib index file ("" when not built)
    hnsw_params: dict[str, int] = field(default_factory=dict)  # space is always cosine


@dataclass
class Manifest:
    clip: EncoderInfo  # each image encoder at its own input size (EncoderInfo.image_size)
    dinov2: EncoderInfo
    text: TextInfo
    vocabulary: VocabularyInfo
    dense_method: str  # "pixelclip" | "gem" | "maskclip"
    random_weights: bool
    ovseg_version: str
    opset: int
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # file -> parity numbers
    # precision ("int8", "fp16") -> accuracy gate against fp32: {"passed": bool, numbers...} (ovseg-calib)
    gates: dict[str, dict] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hex digest
    profile: str = DEFAULT_PROFILE  # ovseg.profiles: what it was exported as, and the Segmenter's defaults
    schema_version: int = SCHEMA_VERSION

    @property
    def image_sizes(self) -> dict[str, int]:
        """Each image encoder's square input side: {"clip": S, "dinov2": S'}."""
        return {"clip": self.clip.image_size, "dinov2": self.dinov2.image_size}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version} is not {SCHEMA_VERSION}: re-export it with this ovseg (ovseg-export --force)"
            )

        d.pop("device_checks", None)  # per-GPU verdicts some manifests carry: nothing reads them
        shared = d.pop("image_size", None)  # manifests before per-encoder sizes: both encoders at this size

        def enc(e):
            sized = {"image_size": shared} if shared is not None else {}
            tuples = {key: tuple(e[key]) for key in ("grid", "mean", "std")}
            plans = {key: PlanRecord(**r) for key, r in e.get("plans", {}).items()}
            return EncoderInfo(**{**sized, **e, **tuples, "plans": plans})

        d["clip"] = enc(d["clip"])
        d["dinov2"] = enc(d["dinov2"])
        d["text"] = TextInfo(**d["text"])
        d["vocabulary"] = VocabularyInfo(**d["vocabulary"])
        return cls(**d)


def common_size(sizes: dict[str, int]) -> int | None:
    """The input size every encoder in ``sizes`` (encoder -> size) shares; None when they differ."""
    distinct = set(sizes.values())
    return distinct.pop() if len(distinct) == 1 else None


def describe_sizes(sizes: dict[str, int]) -> str:
    """Input sizes for people: "448x448" when both encoders share it, else "CLIP 448x448, DINOv2 224x224"."""
    s = common_size(sizes)
    if s is not None:
        return f"{s}x{s}"
    return ", ".join(f"{ENCODER_NAMES.get(e, e)} {s}x{s}" for e, s in sizes.items())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle_dir: str | Path, verify: bool = True, trusted: Sequence[Path] | None = None) -> Manifest:
    """Read a bundle's manifest, refuse one naming files outside the bundle or not pinned by it, and (by default)
    verify every file's sha256 and that each named file is whole; every failure is a one-line
    BundleError. With ``verify``, a manifest not signed by one of the ``trusted`` public key files (None: those
    configured, bundle.signing; none configured: no signature needed) is refused before it is parsed."""
    bundle_dir = Path(bundle_dir).expanduser()
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"no bundle at {bundle_dir}: run `ovseg-export --out {bundle_dir}` first")
    if verify:
        keys = configured_key_files() if trusted is None else list(trusted)
        if keys:
            verify_bundle(bundle_dir, keys)
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:  # BundleError is none of them
        raise BundleError(
            f"{path} is not a valid ovseg manifest ({one_line(e)}): re-export with `ovseg-export --force`"
        ) from None
    check_fields(manifest)
    files = confine(bundle_dir, manifest)
    if verify:
        for name, digest in manifest.sha256.items():
            f = bundle_dir / name
            if not f.is_file():
                raise BundleError(f"bundle file {f} is missing: re-export with `ovseg-export --force`")
            if sha256_file(f) != digest:
                raise BundleError(
                    f"bundle file {f} does not match its sha256 in the manifest: re-export with `ovseg-export --force`"
                )
        check_files(bundle_dir, manifest, files)
    return manifest


@contextlib.contextmanager
def atomic_bundle_dir(final: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` in one step.

    On any exception the temporary directory is removed and ``final`` is untouched. A writer killed outright (SIGKILL,
    power loss) leaves ``final`` whole too: the old and the new bundle trade places in one atomic exchange on Linux
    (two renames elsewhere), and the temporary directories such a writer left are removed by the next one.
    """
    final = Path(final).expanduser().resolve()
    if final.exists() and not force:
        raise BundleError(f"{final} already exists: pass --force to replace it, or --out another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if not (final.exists() and exchange(tmp, final)):  # exchanged: tmp holds the old bundle, removed below
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or a C library without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # a file system or kernel without exchange
        return False
    raise OSError(err, f"cannot replace {b}: {os.strerror(err)}")


def _remove_abandoned(final: Path) -> None:
    """Temporary directories of ``final`` whose writer is gone (killed while writing)."""
    for path in final.parent.glob(f".{glob.escape(final.name)}.*-*"):
        kind, _, rest = path.name[len(final.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def write_manifest(d: Path, manifest: Manifest, key=None) -> None:
    """sha256 of every file, then manifest.json last, replaced in one rename; signed with the Ed25519 private ``key``
    when one is given (bundle.signing)."""
    manifest.sha256 = {
        p.name: sha256_file(p)
        for p in sorted(d.iterdir())
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE) and not p.name.startswith(".")
    }
    (d / SIGNATURE).unlink(missing_ok=True)  # it signed the manifest being replaced
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, d / MANIFEST)
    if key is not None:
        sign_dir(d, key)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) every file of ``src`` into ``dst`` except the manifest, which is always written anew, and
    its signature.

    Replace a linked file by writing a new file and renaming it over the link, never by writing into it."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_dir() or rel in (Path(MANIFEST), Path(SIGNATURE)):  # a new manifest needs a new signature
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
