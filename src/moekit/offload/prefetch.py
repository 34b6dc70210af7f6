"""The background loader of predictive prefetch: one daemon thread running load jobs in order.

A prefetch is issued before the step that needs it and runs while the model computes; a request for
an expert whose load is still running waits for it (a *late* prefetch; its wait is *stall*, counted
by the cache). A failure in the thread is never lost: it is re-raised in the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from moekit.errors import MoekitError

__all__ = ["PrefetchError", "PrefetchWorker"]


class PrefetchError(MoekitError, RuntimeError):
    """A prefetch could not complete because the background loader stopped."""


class _Job:
    def __init__(self, what: str):
        self.what = what
        self._done = threading.Event()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        # Short timed waits keep Ctrl-C responsive in the main thread.
        while not self._done.wait(0.05):
            pass
        if self.error is not None:
            raise self.error


class PrefetchWorker:
    """One daemon thread running load jobs in order. On the first failing job it stops and exits:
    that job and every queued one finish with the error (re-raised by whoever waits on them, and by
    `check`); later `submit`s raise it. `close` stops it and joins it (pending jobs are cancelled)."""

    def __init__(self, name: str = "moekit-prefetch"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit vs. shutdown: no job is queued after the thread left
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[], None], what: str) -> _Job:
        with self._lock:
            self.check()
            if self._closed:
                raise PrefetchError(f"prefetch worker is closed; cannot load {what}")
            job = _Job(what)
            self._queue.put((fn, job))
        return job

    def check(self) -> None:
        """Re-raise a failure of the background thread in the caller's thread."""
        if self.error is not None:
            raise self.error

    def _shutdown(self, reason: BaseException) -> None:
        """Refuse new jobs and cancel the queued ones (the thread then exits)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    item[1].finish(PrefetchError(f"prefetch of {item[1].what} was cancelled: {reason}"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._shutdown(PrefetchError("the worker was closed"))
                return
            fn, job = item
            try:
                fn()
            except BaseException as e:  # handed to the main thread, never lost
                self.error = e
                job.finish(e)
                self._shutdown(e)
                return
            job.finish()

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # a read stuck in the kernel: the daemon thread dies with the process
            raise PrefetchError(f"prefetch worker did not stop within {timeout} s")

