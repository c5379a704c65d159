"""How every ``ovseg-*`` command ends: an OvsegError is ``prog: error: ...`` and exit 2, Ctrl-C 130, SIGTERM 143
(unwound like Ctrl-C, so outputs are finalised), a closed stdout pipe 0."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .constants import BACKENDS, PRECISIONS, default_bundle
from .errors import OvsegError
from .profiles import PROFILES


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker stop), unwound like Ctrl-C so that outputs are finalised."""


def say(prog: str, message: str) -> None:
    """One status line on stderr, prefixed with the command's name (stdout is for results)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def log_lines(prog: str, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """While it lasts, the "ovseg" logger's records are ``prog: message`` lines on stderr, and only there (a plain
    StreamHandler, so tqdm's logging_redirect_tqdm can move it above progress bars). The root logger is the caller's."""
    logger = logging.getLogger("ovseg")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_bundle_argument(p: argparse.ArgumentParser, role: str) -> None:
    """--bundle DIR, defaulting to the default bundle (read when the parser is built); ``role`` says what it is for."""
    p.add_argument(
        "--bundle",
        type=Path,
        default=default_bundle(),
        metavar="DIR",
        help=f"{role} (default $OVSEG_HOME/bundles/default, OVSEG_HOME defaulting to ~/.cache/ovseg)",
    )


def add_segmenter_arguments(p: argparse.ArgumentParser, per: str) -> None:
    """--backend, --precision, --segments and --threads, as ovseg-run and ovseg-eval take them (``per``: "frame").
    --precision and --segments default to the bundle's profile's (None here; ovseg.profiles)."""
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (default auto)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"encoder precision (default: the bundle's profile's: {by_profile('precision')})",
    )
    p.add_argument(
        "--segments",
        type=positive_int,
        metavar="K",
        help=f"DINOv2 segment candidates per {per} (default: the bundle's profile's: {by_profile('num_segments')})",
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for inference (default: all cores)")


def by_profile(setting: str) -> str:
    """A profile setting's value in every profile, for --help: "accurate 1, balanced 10, fast 30"."""
    values = {p.name: getattr(p, setting) for p in PROFILES.values()}
    return ", ".join(f"{name} {'none' if value is None else value}" for name, value in values.items())


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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block take effect when it ends, so that a step that must not be cut in
    half (a frame written to every output) completes. Python handlers, not a thread's signal mask: another thread
    (ONNX Runtime's, the native pool's) would take a signal the main thread blocks."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # now handled as it would have been


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
ovseg_run = _entry("ovseg.runtime.tools.run", "ovseg-run")
ovseg_bench = _entry("ovseg.benchmarks.cli", "ovseg-bench")
ovseg_calib = _entry("ovseg.calib.cli", "ovseg-calib")
ovseg_eval = _entry("ovseg.benchmarks.eval.cli", "ovseg-eval")
ovseg_train = _entry("ovseg.export.train.cli", "ovseg-train")
ovseg_check = _entry("ovseg.runtime.tools.check", "ovseg-check")
ovseg_build = _entry("ovseg.runtime.tools.build", "ovseg-build")
ovseg_sign = _entry("ovseg.runtime.bundle.signing", "ovseg-sign")
ovseg_serve = _entry("ovseg.runtime.triton.cli", "ovseg-serve")
ovseg_ros = _entry("ovseg.runtime.ros.node", "ovseg-ros")
