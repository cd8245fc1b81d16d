"""Ctrl-C and SIGTERM for the CLIs: stop cleanly, at a point where stopping is safe.

With `installed()` (the CLIs, around the whole run) SIGINT and SIGTERM raise KeyboardInterrupt,
as Ctrl-C does by default, with two exceptions:
- inside `held()` (the writing phase, see convert.staging) the first signal is only noted and
  raised by `check()` at the next safe point: between layers, between tensors, before the
  final rename. Orbax reads and writes in background threads; an exception in the middle of
  one leaves them writing into a folder that is being removed. A second signal raises at once,
  except inside `shielded()` (removing the temporary folder: the work is stopping already).
- a signal that lands in a garbage-collection callback (JAX registers one) would be printed and
  dropped by Python there; it is sent again a moment later instead.
`deferred()` (training's checkpoint saves) holds both signals for a block and delivers them
once it has finished, so the work stops right after it rather than halfway through.
Outside the main thread signals are Python's to handle, and all of this does nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"held": False, "shielded": False, "noted": []}


def _in_gc_callback(frame) -> bool:
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame):
    if _state["shielded"] or (_state["held"] and not _state["noted"]):
        _state["noted"].append(signum)
        return
    if _in_gc_callback(frame):
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _state["noted"].append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (see the module doc) until the block ends."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    _state["noted"] = []
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["noted"] = []


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Inside the block a first SIGINT/SIGTERM waits for the next `check()`. One noted after
    the last check (while the finished output is renamed into place) is dropped: the work it
    would have stopped is done."""
    if not _main_thread():
        yield
        return
    with contextlib.ExitStack() as stack:
        if signal.getsignal(signal.SIGINT) is not _handler:
            stack.enter_context(installed())  # a library call: hold Ctrl-C the same way
        check()
        _state["held"] = True
        try:
            yield
        except BaseException:
            raise  # what was noted stays noted: the caller may ask (see shell.run)
        else:
            _state["noted"] = []
        finally:
            _state["held"] = False


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """No signal interrupts the block (a short cleanup that is already stopping the work)."""
    before, _state["shielded"] = _state["shielded"], True
    try:
        yield
    finally:
        _state["shielded"] = before


def check() -> None:
    """Raises KeyboardInterrupt if a signal was noted."""
    if _state["noted"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block are delivered when it ends (main thread only)."""
    if not _main_thread():
        yield
        return
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(got):
            signal.raise_signal(sig)
