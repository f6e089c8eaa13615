"""Spot sudden jumps in rejections (a scan, a forged-URL campaign, a poisoned upstream).

Use :class:`AnomalyDetector` beside the security events: call
:meth:`~AnomalyDetector.observe` once per rejection with its reason code. Counts
are kept per reason in time buckets; when the current bucket's count reaches
``factor`` times the reason's recent mean per bucket (and at least ``minimum``),
one ``anomaly`` security event is logged, then no other for that reason until
``cooldown`` seconds have passed, so an attack cannot flood the logs through the
detector meant to report it.

Memory is bounded: buckets older than the window are dropped, and at most
:data:`MAX_REASONS` reasons are tracked (more are counted as ``other``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from .events import logger, security_event

__all__ = ["MAX_REASONS", "AnomalyDetector"]

#: Distinct reasons tracked; further ones are folded into :data:`OTHER`.
MAX_REASONS = 256
#: The reason under which untracked reasons are counted.
OTHER = "other"


class AnomalyDetector:
    """Counts rejections per reason and logs a jump well above the recent baseline.

    :param clock: seconds, monotonic (tests pass a fake clock).
    :param bucket: seconds per bucket.
    :param window: buckets in the baseline (the ones before the current bucket).
    :param factor: how many times the baseline the current bucket must reach.
    :param minimum: the fewest rejections in one bucket that can be an anomaly.
    :param cooldown: seconds between two anomaly events for the same reason.
    :raises ValueError: a parameter is not positive (``factor``, ``minimum``,
        ``cooldown`` may be 0).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        bucket: float = 10.0,
        window: int = 60,
        factor: float = 10.0,
        minimum: int = 20,
        cooldown: float = 60.0,
    ) -> None:
        if not bucket > 0 or not math.isfinite(bucket):
            raise ValueError(f"bucket must be a positive number of seconds, got {bucket!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1 bucket, got {window!r}")
        if factor < 0 or minimum < 0 or cooldown < 0:
            raise ValueError("factor, minimum and cooldown must not be negative")
        self._clock = clock
        self._bucket = bucket
        self._window = window
        self._factor = factor
        self._minimum = minimum
        self._cooldown = cooldown
        self._lock = threading.Lock()
        # reason -> {bucket index -> count}, only buckets within the window.
        self._counts: dict[str, dict[int, int]] = {}
        # reason -> (bucket index, baseline): the baseline only changes with the bucket.
        self._baselines: dict[str, tuple[int, float]] = {}
        # reason -> clock time of its last anomaly event.
        self._fired: dict[str, float] = {}
        self._pruned_at: int | None = None

    def observe(self, reason: str) -> None:
        """Count one rejection of *reason*; log an ``anomaly`` event if it jumped. Never raises."""
        try:
            report = self._observe(reason)
            if report is not None:
                name, count, baseline = report
                security_event(
                    "anomaly",
                    f"{name} rejections jumped to {count} in {self._bucket:g}s "
                    f"(baseline {baseline:.2f} per {self._bucket:g}s)",
                    reported_reason=name,
                    count=count,
                    baseline=round(baseline, 2),
                    window_seconds=self._window * self._bucket,
                )
        except Exception:
            logger.exception("anomaly detection failed")

    def counts(self) -> dict[str, int]:
        """Rejections per reason over the last ``window`` buckets, the current one included."""
        with self._lock:
            current = self._index(self._clock())
            self._prune(current)
            first = current - self._window + 1
            totals = {
                reason: sum(n for index, n in buckets.items() if first <= index <= current)
                for reason, buckets in self._counts.items()
            }
        return {reason: total for reason, total in totals.items() if total}

    def _index(self, now: float) -> int:
        return math.floor(now / self._bucket)

    def _observe(self, reason: str) -> tuple[str, int, float] | None:
        with self._lock:
            now = self._clock()
            current = self._index(now)
            if self._pruned_at != current:
                self._prune(current)
            name = reason if isinstance(reason, str) else OTHER
            if name not in self._counts and len(self._counts) >= MAX_REASONS:
                name = OTHER
            buckets = self._counts.setdefault(name, {})
            count = buckets.get(current, 0) + 1
            buckets[current] = count
            cached = self._baselines.get(name)
            if cached is not None and cached[0] == current:
                baseline = cached[1]
            else:
                first = current - self._window
                baseline = sum(n for index, n in buckets.items() if first <= index < current) / self._window
                self._baselines[name] = (current, baseline)
            if count < max(self._minimum, self._factor * baseline):
                return None
            last = self._fired.get(name)
            if last is not None and now - last < self._cooldown:
                return None
            self._fired[name] = now
            if len(self._fired) > MAX_REASONS + 1:  # only with a cooldown longer than the window
                del self._fired[min(self._fired, key=self._fired.__getitem__)]
            return name, count, baseline

    def _prune(self, current: int) -> None:
        # Keep the current bucket and the `window` before it (the baseline);
        # forget reasons with nothing left and cooldowns that have run out.
        oldest = current - self._window
        for reason in list(self._counts):
            buckets = self._counts[reason]
            for index in [i for i in buckets if i < oldest]:
                del buckets[index]
            if not buckets:
                del self._counts[reason]
                self._baselines.pop(reason, None)
        now = current * self._bucket
        for reason in [r for r, at in self._fired.items() if now - at >= self._cooldown + self._bucket]:
            del self._fired[reason]
        self._pruned_at = current
