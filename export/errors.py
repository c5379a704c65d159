"""The export side's one user-facing error type, importable without torch (the TensorRT builder needs no torch)."""

from ovseg.errors import OvsegError


class ExportError(OvsegError, RuntimeError):
    """An export step failed in a way the user can act on."""


class WeightsUnavailable(ExportError):
    """Pretrained weights cannot be downloaded here (the hub is out of reach, or refused them) and none are cached."""
