"""Child processes started early and read late: the subprocess checks (8 simulated devices,
XLA_FLAGS set before JAX starts) run one after another in the background from the start of the
session, on the core the test process leaves idle while it compiles, instead of each holding up
its test.

    CHILDREN = Children(__name__)                     # in a test module
    CHILDREN.add("name", lambda: Child([...], env=children.environ() | {...}, timeout=300), read_by=("test_it",))
    proc = CHILDREN.result("name")                    # in test_it: a subprocess.CompletedProcess
                                                      # (text), as subprocess.run gives
A Job is a function run in a thread of its own, for a chain of processes (its readers: the
tests that use a fixture, `uses="runs"`); its result is what the function returned.

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
from pathlib import Path
from typing import Any, Callable


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

    def wait(self) -> None:
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Job:
    """`fn(job)` run in a thread of its own (several processes one after another, say): it
    passes each process it starts through `job.track`, so that `kill` stops them."""

    def __init__(self, fn: Callable[[Job], Any]):
        self._procs: list[subprocess.Popen] = []
        self._value: Any = None
        self._error: BaseException | None = None
        self.killed = False
        self._thread = threading.Thread(target=self._run, args=(fn,), name="test-job", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn(self)
        except BaseException as e:  # noqa: BLE001 - raised again by result()
            self._error = e

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        if self.killed:
            proc.kill()
        return proc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def kill(self) -> None:
        self.killed = True
        for proc in list(self._procs):
            if proc.poll() is None:
                proc.kill()


@dataclasses.dataclass
class _Entry:
    module: str
    name: str
    factory: Callable[[], Child | Job]
    read_by: tuple[str, ...]
    uses: str | None
    child: Child | Job | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def get(self) -> Child | Job:
        with self.lock:
            if self.child is None:
                self.child = self.factory()
            return self.child


_ENTRIES: list[_Entry] = []
_STOP = threading.Event()
_ENVIRON: dict[str, str] | None = None
_FOLDER: Path | None = None


def folder(name: str) -> Path:
    """A new folder for a child's files, under the session's temporary folder."""
    base = Path(tempfile.mkdtemp()) if _FOLDER is None else _FOLDER
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def environ() -> dict[str, str]:
    """The environment to build a child's from: the process's at the start of the session (a
    child started in the background must not see what a test running then has set), or now."""
    return dict(os.environ if _ENVIRON is None else _ENVIRON)


class Children:
    """One test module's children."""

    def __init__(self, module: str):
        self.module = module

    def add(self, name: str, factory: Callable[[], Child | Job], *, read_by: tuple[str, ...] = (),
            uses: str | None = None) -> None:
        """Its readers: this module's test functions named in `read_by`, and those that use the
        fixture `uses`."""
        _ENTRIES.append(_Entry(self.module, name, factory, tuple(read_by), uses))

    def result(self, name: str):
        """The child's CompletedProcess (a Job's: what its function returned, or what it raised)."""
        (entry,) = [e for e in _ENTRIES if (e.module, e.name) == (self.module, name)]
        return entry.get().result()


def start_background(items, tmp: Path) -> None:
    """Starts a thread that runs the children of the selected tests (`items`: the session's),
    one at a time, in the order their tests come; `tmp`: the session's folder for their files."""
    global _FOLDER
    _FOLDER = tmp
    def reads(entry, item) -> bool:
        module = getattr(item, "module", None)
        return module is not None and module.__name__ == entry.module and (
            item.originalname in entry.read_by or entry.uses in getattr(item, "fixturenames", ()))

    wanted = []  # (where its first reader comes, entry)
    for entry in _ENTRIES:
        at = next((i for i, item in enumerate(items) if reads(entry, item)), None)
        if at is not None:
            wanted.append((at, entry))
    wanted.sort(key=lambda x: x[0])
    global _ENVIRON
    _ENVIRON = dict(os.environ)
    _STOP.clear()

    def run():
        for _, entry in wanted:
            if _STOP.is_set():
                return
            try:
                entry.get().wait()
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
