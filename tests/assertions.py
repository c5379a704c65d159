"""Assertions several test modules share."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The raised error's message: one line holding every one of ``parts``."""
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def eventually(condition: Callable[[], object], what: str, within: float = 120.0) -> None:
    """Wait until another thread or process gets somewhere; fails saying what never happened. A bound on a hang,
    not a timing: ``within`` is far beyond what a loaded machine needs."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)
