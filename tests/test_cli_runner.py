"""The one CLI runner: how every ovseg-* command ends, and the signals a frame's writes defer."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from ovseg.cli import run_cli, signals_deferred
from ovseg.errors import OvsegError


def _raises(error: BaseException):
    def body() -> int:
        raise error

    return body


def test_an_ovseg_error_is_one_line_and_exit_2(capsys):
    assert run_cli("ovseg-x", _raises(OvsegError("the bundle is gone: run ovseg-export\nsecond line"))) == 2
    assert capsys.readouterr().err == "ovseg-x: error: the bundle is gone: run ovseg-export\n"


def test_ctrl_c_is_130_and_says_what_is_left(capsys):
    assert run_cli("ovseg-x", _raises(KeyboardInterrupt()), aftermath="out/ is unchanged") == 130
    assert capsys.readouterr().err == "ovseg-x: interrupted; out/ is unchanged\n"


def test_sigterm_unwinds_like_ctrl_c_with_143(capsys):
    def body() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause() if hasattr(signal, "pause") else None
        return 0

    assert run_cli("ovseg-x", body) == 143
    assert capsys.readouterr().err == "ovseg-x: terminated\n"


def test_other_errors_are_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        run_cli("ovseg-x", _raises(ZeroDivisionError()))


def test_a_signal_inside_signals_deferred_takes_effect_at_its_end():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have ignored it
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a signal delivered now would interrupt here
                reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_signals_deferred_holds_while_other_threads_run():
    """The process-directed signal may land on any thread; it must still wait for the block to end."""
    stop = threading.Event()
    workers = [threading.Thread(target=stop.wait) for _ in range(4)]
    for w in workers:
        w.start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached_end = True
        assert reached_end
    finally:
        signal.signal(signal.SIGINT, previous)
        stop.set()
        for w in workers:
            w.join()
