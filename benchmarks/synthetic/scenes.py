"""Scenes of the synthetic world, deterministic by seed: an RGB image, its per-pixel class map, one visible mask per
object and one for the floor (unlabelled masks, as SAM gives them), and a caption naming what is in it.

Objects are painted back to front, so later ones occlude earlier ones; an object that would keep less than
``MIN_VISIBLE`` of itself is placed again. Video clips move the objects of one scene along straight lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .world import CLASSES, COLOURS, OBJECTS, SHAPES, STUFF, colour_shape

MIN_VISIBLE = 0.4
# Shapes stand upright, tilted by at most 15 degrees: at any rotation a square is a diamond and a tiny ViT with 32-pixel
# patches learned colour in 250 steps but shape not in 1,750 (zero-shot 0.44 over 20 colour-shape objects).
MAX_TILT = np.pi / 12
COLOUR_JITTER = 18


@dataclass(frozen=True)
class Placement:
    name: str  # an entry of OBJECTS
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # pixels
    angle: float  # radians


@dataclass(frozen=True)
class Layout:
    floor: str  # an entry of STUFF
    objects: tuple[Placement, ...]  # back to front
    size: tuple[int, int]  # (height, width)
    seed: int  # textures and colour jitter


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8 indices into CLASSES
    masks: list[np.ndarray]  # (H, W) bool, visible part of each object (front last), then the floor
    caption: str
    names: tuple[str, ...]  # the objects in the caption's order, then the floor


def shape_polygon(shape: str, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray | None:
    """Vertices of a shape as an (N, 2) int32 array; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        unit = np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)], float) / np.sqrt(2)
    elif shape == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        unit = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif shape == "cross":
        t = 0.34
        unit = np.array(
            [(t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t), (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t)]
        )
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    c, s = np.cos(angle), np.sin(angle)
    points = unit @ np.array([[c, s], [-s, c]]) * radius + np.asarray(centre)
    return np.round(points * 16).astype(np.int32)  # 4 fractional bits for cv2.fillPoly's shift


def shape_mask(
    shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    polygon = shape_polygon(shape, centre, radius, angle)
    if polygon is None:
        cx, cy = (int(round(v * 16)) for v in centre)
        cv2.circle(mask, (cx, cy), int(round(radius * 16)), 1, -1, cv2.LINE_8, 4)
    else:
        cv2.fillPoly(mask, [polygon], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def floor_texture(floor: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A grey texture (H, W) float in 0-255: no floor has a colour of the objects."""
    h, w = size
    lo, hi = sorted(rng.uniform(70, 185, size=2))
    if hi - lo < 35:
        hi = min(lo + 35 + rng.uniform(0, 20), 230)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if floor == "striped floor":
        period = rng.uniform(0.06, 0.12) * max(h, w)
        a = rng.uniform(0, np.pi)
        phase = np.cos(a) * xx + np.sin(a) * yy + rng.uniform(0, period)
        pattern = (phase % period) < period / 2
    elif floor == "checkered floor":
        cell = rng.uniform(0.06, 0.12) * max(h, w)
        ox, oy = rng.uniform(0, cell, size=2)
        pattern = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(bool)
    elif floor == "gravel":
        grain = max(2, int(rng.integers(3, 7)))
        noise = rng.random((h // grain + 1, w // grain + 1)).astype(np.float32)
        pattern = cv2.resize(noise, (w, h), interpolation=cv2.INTER_NEAREST)
        return lo + (hi - lo) * pattern + rng.normal(0, 4, size).astype(np.float32)
    else:
        raise ValueError(f"unknown floor {floor!r}: one of {', '.join(STUFF)}")
    return np.where(pattern, hi, lo).astype(np.float32) + rng.normal(0, 4, size).astype(np.float32)


def sample_layout(
    rng: np.random.Generator,
    size: tuple[int, int] = (224, 224),
    objects: tuple[int, int] = (1, 3),
    allowed: tuple[str, ...] = OBJECTS,
    radius: tuple[float, float] = (0.12, 0.3),
) -> Layout:
    """A random floor and ``objects[0]..objects[1]`` distinct objects from ``allowed``; ``radius`` as a fraction of
    the shorter side."""
    n = int(rng.integers(objects[0], objects[1] + 1))
    names = rng.choice(len(allowed), size=min(n, len(allowed)), replace=False)
    h, w = size
    side = min(h, w)
    floor = STUFF[int(rng.integers(len(STUFF)))]
    placed: list[Placement] = []
    for i in names:
        for _ in range(50):
            r = float(rng.uniform(*radius)) * side * (1.0 if n == 1 else 0.8)
            centre = (float(rng.uniform(r * 0.7, w - r * 0.7)), float(rng.uniform(r * 0.7, h - r * 0.7)))
            candidate = Placement(allowed[int(i)], centre, r, float(rng.uniform(-MAX_TILT, MAX_TILT)))
            if visible_enough((*placed, candidate), size):
                placed.append(candidate)
                break
    return Layout(floor, tuple(placed), size, int(rng.integers(2**31)))


def object_masks(objects: tuple[Placement, ...], size: tuple[int, int]) -> list[np.ndarray]:
    """The full mask of each placement (before occlusion)."""
    return [shape_mask(colour_shape(p.name)[1], size, p.centre, p.radius, p.angle) for p in objects]


def visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    covered = np.zeros(full[0].shape, bool) if full else None
    visible = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def visible_enough(objects: tuple[Placement, ...], size: tuple[int, int]) -> bool:
    full = object_masks(objects, size)
    return all(f.sum() > 0 and v.sum() >= MIN_VISIBLE * f.sum() for f, v in zip(full, visible_masks(full)))


def caption(names: list[str], floor: str) -> str:
    listed = [f"a {n}" for n in names]
    things = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    ground = f"a {floor}" if floor.endswith("floor") else floor
    return f"a photo of {things} on {ground}."


def render(layout: Layout, caption_order: np.random.Generator | None = None) -> Scene:
    """Paint ``layout``; the caption lists the objects in a random order when ``caption_order`` is given."""
    rng = np.random.default_rng(layout.seed)
    size = layout.size
    image = np.repeat(floor_texture(layout.floor, size, rng)[..., None], 3, axis=2)
    labels = np.full(size, CLASSES.index(layout.floor), np.uint8)
    full = object_masks(layout.objects, size)
    for p, mask in zip(layout.objects, full):
        colour = np.asarray(COLOURS[colour_shape(p.name)[0]], np.float32) + rng.uniform(-1, 1, 3) * COLOUR_JITTER
        image[mask] = colour + rng.normal(0, 3, (int(mask.sum()), 3))
        labels[mask] = CLASSES.index(p.name)
    visible = visible_masks(full)
    floor = labels == CLASSES.index(layout.floor)
    names = [p.name for p in layout.objects]
    if caption_order is not None:
        names = [names[i] for i in caption_order.permutation(len(names))]
    return Scene(
        image=image.clip(0, 255).astype(np.uint8),
        labels=labels,
        masks=[*visible, floor],
        caption=caption(names, layout.floor),
        names=(*names, layout.floor),
    )


def clip_layouts(layout: Layout, frames: int, rng: np.random.Generator, speed: float = 0.02) -> list[Layout]:
    """``frames`` layouts of one scene whose objects move along straight lines (``speed``: fraction of the shorter
    side per frame) and bounce off the borders; the floor and its texture stay."""
    h, w = layout.size
    step = speed * min(h, w)
    velocity = [rng.normal(size=2) for _ in layout.objects]
    velocity = [v / (np.linalg.norm(v) + 1e-9) * step for v in velocity]
    out, objects = [], list(layout.objects)
    for _ in range(frames):
        out.append(Layout(layout.floor, tuple(objects), layout.size, layout.seed))
        moved = []
        for i, p in enumerate(objects):
            x, y = p.centre[0] + velocity[i][0], p.centre[1] + velocity[i][1]
            if not p.radius * 0.7 <= x <= w - p.radius * 0.7:
                velocity[i][0] *= -1
            if not p.radius * 0.7 <= y <= h - p.radius * 0.7:
                velocity[i][1] *= -1
            moved.append(Placement(p.name, (x, y), p.radius, p.angle))
        objects = moved
    return out
