"""Calibration frames: sampled evenly from a folder of images or a video, preprocessed exactly as the runtime does.

Every frame goes through the runtime's own ``Preprocessors`` (resize to each encoder's own S x S, once per distinct
size, then per-encoder mean/std), so the calibrated ranges are those of the tensors the runtime will feed. A held-out
part (interleaved across the source) is kept for the accuracy gate and never calibrated on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ovseg.errors import SegmenterError
from ovseg.export.errors import ExportError
from ovseg.runtime.io.sources import IMAGE_SUFFIXES, evenly_spaced
from ovseg.runtime.pipeline.preprocess import Preprocessors

log = logging.getLogger("ovseg.calib")

DEFAULT_FRAMES = 40  # 32 to calibrate on + 8 held out: enough for stable MinMax/percentile ranges of a ViT
DEFAULT_HOLDOUT = 0.2
MIN_HOLDOUT = 2  # one held-out frame says little about agreement
MIN_CALIB = 2


@dataclass
class Norm:
    """How one encoder takes its input (from the bundle manifest): square side and normalisation."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int


@dataclass
class CalibrationData:
    source: str
    calib: dict[str, np.ndarray]  # role -> (N, 3, S, S) float32 at the role's S, exactly the runtime's encoder input
    holdout: dict[str, np.ndarray]  # role -> (M, 3, S, S) float32
    holdout_frames: list[np.ndarray]  # the held-out frames as decoded, for the pipeline gate
    digest: str  # sha256 of the calibration frames at each input size: part of the calibration cache key

    @property
    def n_calib(self) -> int:
        return len(next(iter(self.calib.values())))

    @property
    def n_holdout(self) -> int:
        return len(self.holdout_frames)


def split_sizes(n: int, holdout: float) -> tuple[int, int]:
    """(calibration, held-out) frame counts; ExportError when ``n`` frames cannot make both."""
    if not 0.0 < holdout < 1.0:
        raise ExportError(f"--holdout must be a fraction between 0 and 1, got {holdout}")
    n_hold = max(MIN_HOLDOUT, round(n * holdout))
    if n - n_hold < MIN_CALIB:
        raise ExportError(
            f"{n} frame(s) are too few to hold out {n_hold} for the gate and calibrate on at least {MIN_CALIB}: "
            f"give at least {MIN_HOLDOUT + MIN_CALIB} readable images (or a longer video)"
        )
    return n - n_hold, n_hold


def holdout_indices(n: int, n_hold: int) -> list[int]:
    """Evenly interleaved positions, so both parts span the whole source."""
    return sorted({int((i + 0.5) * n / n_hold) for i in range(n_hold)})


def _image_frames(folder: Path, n: int) -> list[np.ndarray]:
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ExportError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    frames = []
    for i in tqdm(evenly_spaced(len(paths), n), desc="reading images", unit="img", leave=False):
        image = cv2.imread(str(paths[i]), cv2.IMREAD_UNCHANGED)
        if image is None or image.size == 0:
            log.warning("calibration image %s cannot be read, skipping", paths[i])
            continue
        frames.append(image)
    if not frames:
        raise ExportError(f"none of the {len(paths)} image(s) in {folder} could be read")
    return frames


def _video_frames(path: Path, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ExportError(f"cannot open {path} as a video (not a video file, or OpenCV lacks its codec)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:  # no frame count in the header: count by decoding once
            count = 0
            while cap.grab():
                count += 1
            cap.release()
            cap.open(str(path))
        wanted = set(evenly_spaced(count, n)) if count > 0 else set()
        frames = []
        for index in tqdm(range(max(wanted, default=-1) + 1), desc="reading video", unit="frame", leave=False):
            if not cap.grab():
                break
            if index in wanted:
                ok, image = cap.retrieve()
                if ok and image is not None:
                    frames.append(image)
        if not frames:
            raise ExportError(f"no frame of {path} could be decoded")
        return frames
    finally:
        cap.release()


def read_frames(source: str | Path, n: int) -> list[np.ndarray]:
    """Up to ``n`` frames sampled evenly from a folder of images or a video file, as decoded."""
    path = Path(source).expanduser()
    if n < MIN_HOLDOUT + MIN_CALIB:
        raise ExportError(f"--frames must be at least {MIN_HOLDOUT + MIN_CALIB}, got {n}")
    if path.is_dir():
        return _image_frames(path, n)
    if path.is_file():
        return _video_frames(path, n)
    raise ExportError(f"{source} does not exist: give a folder of images or a video file")


def load_calibration(
    source: str | Path,
    norms: dict[str, Norm],
    frames: int = DEFAULT_FRAMES,
    holdout: float = DEFAULT_HOLDOUT,
) -> CalibrationData:
    """Read, split and preprocess (each role at its ``Norm.size``); raises ExportError (one line) for every bad
    input."""
    decoded = read_frames(source, frames)
    pre = Preprocessors({role: norm.size for role, norm in norms.items()})
    rgbs: list[dict[int, np.ndarray]] = []  # per kept frame: size -> its RGB at that size
    kept = []
    for frame in tqdm(decoded, desc="preprocessing", unit="frame", leave=False):
        try:
            pre(frame)
        except SegmenterError as e:  # a frame the runtime could not read either
            log.warning("skipping a calibration frame: %s", e)
            continue
        rgbs.append({p.size: p.rgb.copy() for p in pre.distinct})
        kept.append(frame)
    held = holdout_indices(len(kept), split_sizes(len(kept), holdout)[1])
    rest = [i for i in range(len(kept)) if i not in held]
    calib, hold = {}, {}
    for role, norm in norms.items():
        p = pre[role]
        batch = np.empty((len(kept), 3, norm.size, norm.size), np.float32)
        for i, frame_rgbs in enumerate(rgbs):
            p.rgb[...] = frame_rgbs[norm.size]
            p.normalise(batch[i : i + 1], norm.mean, norm.std)
        hold[role], calib[role] = batch[held], batch[rest]
    # the frames at every size; at one size the digest (and so the cache key) is what it was before sizes per encoder
    digest = hashlib.sha256()
    for i in rest:
        for rgb in rgbs[i].values():
            digest.update(rgb.tobytes())
    return CalibrationData(str(source), calib, hold, [kept[i] for i in held], digest.hexdigest())
