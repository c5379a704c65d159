"""Assertions several test modules share."""

from __future__ import annotations

import pytest


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The raised error's message: one line holding every one of ``parts``."""
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message
