"""The one error base: every failure a user can act on is an OvsegError, and every ovseg-* CLI prints it as one line."""


class OvsegError(Exception):
    """A failure the user can act on; the message is one line that says what to do."""


class SegmenterError(OvsegError, RuntimeError):
    """The Segmenter cannot do what was asked; the message is one line saying what is missing."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (libraries' messages span lines); its type's name when it has none."""
    return " ".join(str(e).split()) or type(e).__name__
