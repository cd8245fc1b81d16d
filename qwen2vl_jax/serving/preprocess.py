"""Admission control for the host-side work of a request (media read, prompt rendered and
tokenized), before it reaches the batcher's queue.

Each request gets a `Ticket`: its deadline (counted from its arrival) and a stop flag the work
checks between steps, so a request that times out or whose client goes away stops at the next
step instead of running to the end. The work runs on pools of the server's own, sized by a flag
(not Python's shared default executor, which every library in the process also uses): one for
requests that carry images or videos, one for text-only requests, so a cheap text request never
waits behind image decoding. Requests waiting for or running on either pool count toward the
same queue limit as the batcher's queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from typing import Awaitable, Callable

from qwen2vl_jax.serving.settings import ApiError

TEXT_WORKERS = 2  # text-only requests are bounded by the prompt size checks: a couple of threads keep up


def default_workers() -> int:
    """One preprocessing thread per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def timeout_error(limit: float) -> ApiError:
    return ApiError(504, f"the request took longer than the server's limit of {limit:g} s (--request-timeout)",
                    code="timeout")


class Ticket:
    """One request's deadline and stop flag, shared by the event loop and the worker thread."""

    def __init__(self, arrived: float, timeout: float):
        self.deadline, self.timeout = arrived + timeout, timeout
        self._stopped = threading.Event()
        self._gone = False  # the client went away (else: the deadline passed)
        self._lock = threading.Lock()
        self._on_stop: list[Callable[[], None]] = []

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set() or self.remaining() <= 0

    def error(self) -> ApiError:
        if self._gone:
            return ApiError(499, "the client went away")
        return timeout_error(self.timeout)

    def check(self) -> None:
        """Raises the request's end (504, or 499 for a client that left) once it is over: called
        between steps of the work."""
        if self.stopped:
            raise self.error()

    def stop(self, gone: bool = False) -> None:
        """Ends the request: the work stops at its next check, and blocking calls registered with
        `on_stop` (a socket read) are interrupted now."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._gone = gone
            self._stopped.set()
            callbacks, self._on_stop = self._on_stop, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - interrupting is best effort
                pass

    def on_stop(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Runs `fn` when the request is stopped (at once if it already is); returns a function
        that unregisters it."""
        with self._lock:
            if not self._stopped.is_set():
                self._on_stop.append(fn)
                return lambda: self._forget(fn)
        fn()
        return lambda: None

    def _forget(self, fn) -> None:
        with self._lock:
            if fn in self._on_stop:
                self._on_stop.remove(fn)


class Preprocessor:
    """The preprocessing pools and the count of requests in them."""

    def __init__(self, workers: int | None, max_queue: int, queue_depth: Callable[[], int]):
        self.workers = workers or default_workers()
        self.max_queue, self._queue_depth = max_queue, queue_depth
        self.media_pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="qwen2vl-media")
        self.text_pool = concurrent.futures.ThreadPoolExecutor(min(TEXT_WORKERS, self.workers) or 1,
                                                               thread_name_prefix="qwen2vl-text")
        self._lock = threading.Lock()
        self.pending = 0  # requests admitted here and not yet done (waiting for a thread or running)

    def _admit(self) -> None:
        with self._lock:
            waiting = self.pending + self._queue_depth()
            if waiting >= self.max_queue:
                raise ApiError(429, f"the server is busy: {waiting} requests are waiting already (the queue holds "
                                    f"{self.max_queue}); retry later", code="queue_full")
            self.pending += 1

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, fn: Callable[[Ticket], object], ticket: Ticket, *, media: bool,
                  gone: Callable[[], Awaitable] | None = None):
        """fn(ticket) on the media or the text pool; returns its result, or raises the request's
        end (504 at the deadline, 499 when `gone()` completes: the client left) without waiting
        for the work, which stops at its next check. 429 when the queue is full."""
        self._admit()

        def work():
            try:
                ticket.check()  # waited past the deadline, or the client left: never start
                return fn(ticket)
            finally:
                self._release()

        pool = self.media_pool if media else self.text_pool
        try:
            cf = pool.submit(work)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._release()
            raise ApiError(503, "the server is shutting down") from None
        future = asyncio.wrap_future(cf)
        waiters = {future} if gone is None else {future, asyncio.ensure_future(gone())}
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(ticket.remaining(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(ticket, cf, gone=True)
            raise
        finally:
            for w in waiters:
                if w is not future:
                    w.cancel()
        if future in done:
            return future.result()
        self._abandon(ticket, cf, gone=bool(done))
        future.cancel()
        raise ticket.error()

    def _abandon(self, ticket: Ticket, cf: concurrent.futures.Future, gone: bool) -> None:
        ticket.stop(gone=gone)
        if cf.cancel():  # never started: `work` will not release its place
            self._release()

    def close(self) -> None:
        for pool in (self.media_pool, self.text_pool):
            pool.shutdown(wait=False, cancel_futures=True)
