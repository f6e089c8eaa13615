"""Thread-side concurrency for fills: single-flight per key and the worker gate.

The WSGI adapter uses these; the decisions themselves stay in :mod:`imageguard.core`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from .errors import Overloaded

T = TypeVar("T")

#: Seconds sent in ``Retry-After`` when fills are shed.
RETRY_AFTER = 1


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class ThreadFlights(Generic[T]):
    """One fill per key at a time; concurrent callers for the key share its outcome.

    The leader always wakes its followers, whether it returns or raises, so a
    failing fill cannot leave anybody waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def run(self, key: str, fill: Callable[[], T], *, timeout: float) -> T:
        """Run *fill* for *key*, or wait up to *timeout* seconds for the fill in flight.

        :raises Overloaded: the fill in flight took longer than *timeout*.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if not flight.done.wait(timeout):
                raise Overloaded("fill_timeout", "the image is still being prepared", retry_after=RETRY_AFTER)
            if flight.error is not None:
                raise flight.error
            return flight.result  # type: ignore[return-value]
        try:
            flight.result = fill()
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class ThreadGate:
    """At most *workers* sanitizations at once and *queue* waiting; more → 503.

    :param workers: ``IMAGEGUARD_WORKERS``.
    :param queue: ``IMAGEGUARD_QUEUE``.
    """

    def __init__(self, workers: int, queue: int) -> None:
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._queue = queue
        self.waiting = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one worker slot for the duration of the block.

        :raises Overloaded: every slot is busy and the queue is full.
        """
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self.waiting >= self._queue:
                    raise Overloaded(
                        "overloaded", "too many images are being prepared", retry_after=RETRY_AFTER
                    )
                self.waiting += 1
            try:
                self._slots.acquire()
            finally:
                with self._lock:
                    self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
