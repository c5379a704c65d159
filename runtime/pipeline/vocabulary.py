"""Vocabularies: the class lists of guided mode and the concept list of guidance-free mode.

Runtime side: standard library only (never torch). The lists are text files in
runtime/vocab/, one class name per line; blank lines and lines starting with
"#" are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ovseg.errors import OvsegError

VOCAB_DIR = Path(__file__).resolve().parents[1] / "vocab"
DEFAULT_CONCEPTS = "concepts"
_PRESET_NAMES = ("voc20", "voc21", "context59", "context60", "ade150", "cocostuff171", "cityscapes19", DEFAULT_CONCEPTS)
PRESETS: dict[str, str] = {name: str(VOCAB_DIR / f"{name}.txt") for name in _PRESET_NAMES}

# PixelCLIP's inference ensemble (eval.sh: PROMPT_ENSEMBLE_TYPE imagenet_select,
# i.e. IMAGENET_TEMPLATES_SELECT in pixelclip/third_party/imagenet_templates.py).
GUIDED_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "A photo of a {} in the scene",
]
# One template: the concept list has 10k+ names and may be embedded on a CPU; 8x the text-encoder work buys little there.
CONCEPT_TEMPLATES: list[str] = ["a photo of a {}."]


class VocabularyError(OvsegError, ValueError):
    """A vocabulary could not be loaded; the message is one line saying what to do."""


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _resolve(preset_or_file: str) -> Path:
    if preset_or_file in PRESETS:
        return Path(PRESETS[preset_or_file])
    path = Path(preset_or_file)
    if not path.exists():
        raise VocabularyError(
            f"unknown vocabulary {preset_or_file!r}: not a preset ({', '.join(PRESETS)}) and no such file; "
            "give a preset name or a text file with one class name per line"
        )
    if not path.is_file():
        raise VocabularyError(f"vocabulary {str(path)!r} is not a file; give a text file with one class name per line")
    return path


def load_vocabulary(preset_or_file: str) -> list[str]:
    """Class names of a preset (see PRESETS) or of a text file, in file order, duplicates dropped."""
    path = _resolve(preset_or_file)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise VocabularyError(
            f"cannot read vocabulary file {str(path)!r} ({error.strerror}); check the path and its permissions"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise VocabularyError(
            f"vocabulary file {str(path)!r} is not UTF-8 (bad byte at offset {error.start}); save it as UTF-8 text"
        ) from None
    stripped = (line.strip() for line in text.splitlines())
    names = _unique(line for line in stripped if line and not line.startswith("#"))
    if not names:
        raise VocabularyError(
            f"vocabulary file {str(path)!r} has no class names; put one class name per line (# starts a comment)"
        )
    return names


def parse_class_list(text: str) -> list[str]:
    """Class names from a comma-separated list (`--classes cat,dog,sofa`): stripped, empties and duplicates dropped."""
    names = _unique(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise VocabularyError(
            f"class list {text!r} has no class names; give names separated by commas, e.g. cat,dog,sofa"
        )
    return names


def prompts_for(name: str, templates: Iterable[str]) -> list[str]:
    """The text prompts of one class name: each template with "{}" replaced by the name."""
    prompts = []
    for template in templates:
        if "{}" not in template:
            raise VocabularyError(f"prompt template {template!r} has no {{}} for the class name; add one")
        prompts.append(template.replace("{}", name))
    return prompts
