"""Signals, handled so that cleanup code runs and onnxruntime is never interrupted mid-run.

    with terminate_as_interrupt():       # SIGTERM / SIGHUP raise Terminated (a KeyboardInterrupt):
        build_into_staging_folder()      # the `except BaseException: rmtree(staging)` cleanup runs

    with deferred_interrupt() as stop:   # Ctrl-C only sets a flag ...
        for piece in stream:             # ... checked between decode steps: no exception ever lands
            if stop:                     # inside an onnxruntime call or a half-finished import
                break

    with deferred_interrupt():           # a sweep job in a worker process (Ray's cancel arrives as SIGINT):
        for matrix in weights:           # long loops call interruption_point() where stopping leaves
            interruption_point()         # nothing half-done; it raises KeyboardInterrupt if one arrived

Both install their handler only in the main thread (Python allows nothing else) and restore the
previous handler on exit.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (cleanup runs); the CLI exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _termination_signals() -> list[int]:
    return [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP raise `Terminated`, so `finally` / `except BaseException` cleanup runs."""
    if not _main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, raise_terminated) for s in _termination_signals()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class InterruptFlag:
    """Truthy once Ctrl-C was pressed inside `deferred_interrupt()`."""

    def __init__(self):
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def deferred_interrupt() -> Iterator[InterruptFlag]:
    """Inside: Ctrl-C (SIGINT) sets the yielded flag instead of raising KeyboardInterrupt.

    The caller checks the flag between steps. A KeyboardInterrupt raised at an arbitrary bytecode can land
    inside onnxruntime's Python bindings or a module being imported, which crashed the process (abort,
    segfault) or left a half-imported module behind."""
    flag = InterruptFlag()
    if not _main_thread():
        yield flag
        return

    def set_flag(signum, frame):
        flag.requested = True

    previous = signal.signal(signal.SIGINT, set_flag)
    _open.append(flag)
    try:
        yield flag
    finally:
        _open.remove(flag)
        signal.signal(signal.SIGINT, previous)


_open: list[InterruptFlag] = []  # the flags of the deferred_interrupt() blocks now open, innermost last


def interruption_point() -> None:
    """Raise KeyboardInterrupt here if Ctrl-C arrived inside an open `deferred_interrupt()` block.

    Code that runs long inside one (a sweep job: Ray's `ray.cancel` and a terminal's Ctrl-C both arrive as
    SIGINT) calls it where stopping leaves nothing half-done, e.g. between the matrices of a quantization;
    outside any block it does nothing (Ctrl-C has already raised wherever it landed)."""
    if any(_open):
        raise KeyboardInterrupt
