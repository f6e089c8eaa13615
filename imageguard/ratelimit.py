"""Miss rate limits per client (``IMAGEGUARD_MISS_RATE``), with the ``limits`` library.

Only a request that makes imageguard call the upstream (a *fill*) is charged:
hits in any tier are never limited, and a request that waits for a fill
another request started is not charged either (it costs no upstream call and
no CPU). The window is a moving window. Storage is in process memory, or in
Redis when ``IMAGEGUARD_REDIS_URL`` is set, so the limit holds across every
instance; the Redis counters are namespaced by the key's fingerprint.

A Redis that is down or slow must not stop the site: while its circuit
breaker is open, the limiter counts in process memory (a per-instance limit
instead of a shared one) and says so once in the log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter

from .cache.redis import SOCKET_TIMEOUT, UNREACHABLE, CircuitBreaker


class MissLimiter:
    """Charges fills to clients; tells how long an over-budget client must wait.

    :param rate: ``IMAGEGUARD_MISS_RATE`` (``120/minute``, several separated by ``;`` or ``,``).
    :param namespace: prefix of the counters (different keys never share budgets).
    :param redis_url: shared storage, or ``None`` for process memory.
    :param clock: wall clock (the ``limits`` windows use ``time.time``).
    """

    def __init__(
        self,
        rate: str,
        *,
        namespace: str,
        redis_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.items: list[RateLimitItem] = parse_many(rate)
        self.namespace = namespace
        self._clock = clock
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._shared: MovingWindowRateLimiter | None = None
        self.breaker = CircuitBreaker("the shared miss rate limit (Redis)")
        if redis_url is not None:
            # limits spells a Unix socket redis+unix://; redis-py spells it unix://.
            uri = redis_url
            if uri.startswith("unix://"):
                uri = "redis+unix://" + uri[len("unix://") :]
            storage = RedisStorage(
                uri,
                key_prefix=f"imageguard:{namespace}:limits",
                wrap_exceptions=False,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
            )
            self._shared = MovingWindowRateLimiter(storage)

    @property
    def blocking(self) -> bool:
        """Whether :meth:`charge` does network I/O (shared storage in Redis)."""
        return self._shared is not None

    def charge(self, client: str | None) -> int | None:
        """Charge one fill to *client*: ``None`` if allowed, else the seconds until it may retry.

        Clients without an address share one budget, ``unknown``.
        """
        identity = client or "unknown"
        limiter = self._local
        if self._shared is not None and self.breaker.allow():
            limiter = self._shared
        try:
            return self._charge(limiter, identity)
        except UNREACHABLE as exc:
            if limiter is self._local:
                raise
            self.breaker.failure(exc)
            return self._charge(self._local, identity)
        finally:
            if limiter is self._shared and not self.breaker.is_open:
                self.breaker.success()

    def _charge(self, limiter: MovingWindowRateLimiter, identity: str) -> int | None:
        for item in self.items:
            if not limiter.hit(item, self.namespace, identity):
                stats = limiter.get_window_stats(item, self.namespace, identity)
                return max(1, math.ceil(stats.reset_time - self._clock()))
        return None
