"""The world's classes: coloured shapes (things) on grey textured floors (stuff), and which combinations training
never sees together."""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 200),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
STUFF = ("striped floor", "checkered floor", "gravel")
# Never in a training image or caption: one per colour-or-shape, so each colour and each shape is still seen.
HELD_OUT = frozenset({("red", "triangle"), ("green", "cross"), ("blue", "square"), ("yellow", "circle")})

OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
CLASSES = OBJECTS + STUFF  # label map values index this tuple
SEEN_OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
HELD_OUT_OBJECTS = tuple(f"{c} {s}" for c, s in sorted(HELD_OUT))


def colour_shape(name: str) -> tuple[str, str]:
    colour, shape = name.split(" ", 1)
    return colour, shape
