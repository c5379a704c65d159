"""The export side's one user-facing error type, importable without torch (the TensorRT builder needs no torch), and
the input-size check every image encoder's export passes."""

from ovseg.errors import OvsegError


class ExportError(OvsegError, RuntimeError):
    """An export step failed in a way the user can act on."""


class WeightsUnavailable(ExportError):
    """Pretrained weights cannot be downloaded here (the hub is out of reach, or refused them) and none are cached."""


def patch_grid(size: int, patch: int, encoder: str = "", flag: str = "") -> int:
    """The token grid side of a square input of ``size``; an ExportError naming ``flag`` (the option that set the size)
    and the nearest valid sizes when it is not a multiple of ``encoder``'s ``patch``."""
    if size >= patch and size % patch == 0:
        return size // patch
    below = max(patch, size // patch * patch)
    above = (size // patch + 1) * patch
    valid = f"{below} or {above}" if below != above else f"{above}"
    whose = f"{encoder}'s" if encoder else "the"
    raise ExportError(
        f"{flag + ' ' if flag else ''}{size} is not a multiple of {whose} patch size {patch}: use {valid}"
    )
