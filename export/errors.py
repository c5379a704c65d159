"""The export side's one user-facing error type, importable without torch (the TensorRT builder needs no torch)."""


class ExportError(RuntimeError):
    """An export step failed in a way the user can act on."""
