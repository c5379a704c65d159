"""How every ``ovseg-*`` command ends: an OvsegError is ``prog: error: ...`` and exit 2, Ctrl-C 130, SIGTERM 143
(unwound like Ctrl-C, so outputs are finalised), a closed stdout pipe 0."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from .errors import OvsegError


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker stop), unwound like Ctrl-C so that outputs are finalised."""


def say(prog: str, message: str) -> None:
    """One status line on stderr, prefixed with the command's name (stdout is for results)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(prog: str, body: Callable[[], int], aftermath: str = "") -> int:
    """Run a command's body and map how it ended to an exit status; ``aftermath`` (e.g. "DIR is unchanged") follows
    the word interrupted or terminated."""
    suffix = f"; {aftermath}" if aftermath else ""
    try:
        with sigterm_unwinds():
            return body()
    except Terminated:
        say(prog, f"terminated{suffix}")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        say(prog, f"interrupted{suffix}")
        return 130
    except BrokenPipeError:  # `ovseg-run --json | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OvsegError as e:
        say(prog, f"error: {first_line(e)}")
        return 2


def _entry(module: str, prog: str) -> Callable[[], None]:
    """A console script: imports the command's module inside the runner, so that an install problem met while
    importing (ovseg.environment.InstallError) is one line too."""

    def entry() -> None:
        try:
            main = importlib.import_module(module).main
        except OvsegError as e:
            say(prog, f"error: {first_line(e)}")
            sys.exit(2)
        sys.exit(main())

    return entry


ovseg_export = _entry("ovseg.export.cli", "ovseg-export")
ovseg_run = _entry("ovseg.runtime.cli", "ovseg-run")
ovseg_bench = _entry("ovseg.benchmarks.cli", "ovseg-bench")
ovseg_calib = _entry("ovseg.calib.cli", "ovseg-calib")
ovseg_eval = _entry("ovseg.benchmarks.eval.cli", "ovseg-eval")
ovseg_train = _entry("ovseg.export.train.cli", "ovseg-train")
