"""Child processes started early and read late: the subprocess checks (8 simulated devices,
XLA_FLAGS set before JAX starts) run one after another in the background from the start of the
session, on the core the test process leaves idle while it compiles, instead of each holding up
its test.

    CHILDREN = Children(__name__)                     # in a test module
    CHILDREN.add("name", lambda: Child([...], env=children.environ() | {...}, timeout=300), read_by=("test_it",))
    proc = CHILDREN.result("name")                    # in test_it: a subprocess.CompletedProcess
                                                      # (text), as subprocess.run gives

conftest.py starts, in the order their tests come, the children of the selected tests (one at a
time; `start_background`) and kills what is left at the end (`stop_background`). A test whose
child has not started yet starts it itself, so a test run alone behaves as before.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import threading
import time
from typing import Callable


class Child:
    """A started process with its output in temporary files (no pipe to fill up)."""

    def __init__(self, argv: list[str], *, timeout: float, **popen):
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, text=True, **popen)
        self.deadline = time.monotonic() + timeout
        self._done: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        """Waits for the process (killed past its timeout, TimeoutExpired raised, as
        subprocess.run does)."""
        if self._done is not None:
            return self._done
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._out.seek(0)
        self._err.seek(0)
        self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read(),
                                                 self._err.read())
        self._out.close()
        self._err.close()
        return self._done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclasses.dataclass
class _Entry:
    module: str
    name: str
    factory: Callable[[], Child]
    read_by: tuple[str, ...] | None
    child: Child | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def get(self) -> Child:
        with self.lock:
            if self.child is None:
                self.child = self.factory()
            return self.child


_ENTRIES: list[_Entry] = []
_STOP = threading.Event()
_ENVIRON: dict[str, str] | None = None


def environ() -> dict[str, str]:
    """The environment to build a child's from: the process's at the start of the session (a
    child started in the background must not see what a test running then has set), or now."""
    return dict(os.environ if _ENVIRON is None else _ENVIRON)


class Children:
    """One test module's children."""

    def __init__(self, module: str):
        self.module = module

    def add(self, name: str, factory: Callable[[], Child], *, read_by: tuple[str, ...] | None) -> None:
        """`read_by`: the names of this module's test functions that read the child's result
        (None: every test of the module)."""
        _ENTRIES.append(_Entry(self.module, name, factory, None if read_by is None else tuple(read_by)))

    def result(self, name: str) -> subprocess.CompletedProcess:
        (entry,) = [e for e in _ENTRIES if (e.module, e.name) == (self.module, name)]
        return entry.get().result()


def start_background(items) -> None:
    """Starts a thread that runs the children of the selected tests (`items`: the session's),
    one at a time, in the order their tests come."""
    first: dict[tuple[str, str | None], int] = {}
    for i, item in enumerate(items):
        module = getattr(item, "module", None)
        if module is not None:
            first.setdefault((module.__name__, item.originalname), i)
            first.setdefault((module.__name__, None), i)
    wanted = []
    for entry in _ENTRIES:
        at = [first[(entry.module, t)] for t in (entry.read_by or (None,)) if (entry.module, t) in first]
        if at:
            wanted.append((min(at), entry))
    wanted.sort(key=lambda x: x[0])
    global _ENVIRON
    _ENVIRON = dict(os.environ)
    _STOP.clear()

    def run():
        for _, entry in wanted:
            if _STOP.is_set():
                return
            try:
                entry.get().proc.wait()
            except Exception:  # noqa: BLE001 - the test that reads it starts it again and sees why
                continue

    if wanted:
        threading.Thread(target=run, name="test-children", daemon=True).start()


def stop_background() -> None:
    """Kills every child still running (the session is over)."""
    _STOP.set()
    for entry in _ENTRIES:
        with entry.lock:
            if entry.child is not None:
                entry.child.kill()
