"""L1: the in-process LRU cache with a TTL, bounded by body bytes.

Built on :class:`cachetools.TLRUCache`/:class:`cachetools.TTLCache`; cachetools
containers are not thread-safe, so every access holds the lock handed in
(a WSGI server calls from many threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cachetools import TTLCache

if TYPE_CHECKING:
    from ..core import Entry

#: Bytes charged per entry on top of its body: headers, key and object overhead.
ENTRY_OVERHEAD = 512


def entry_size(entry: Entry) -> int:
    """Bytes an entry is charged against ``IMAGEGUARD_CACHE_BYTES``."""
    return len(entry.body) + ENTRY_OVERHEAD


class MemoryCache:
    """Thread-safe LRU+TTL cache of entries, bounded by their size in bytes.

    :param maxbytes: the byte bound (``IMAGEGUARD_CACHE_BYTES``); 0 disables it.
    :param ttl: seconds an entry lives.
    :param timer: the clock, injectable for tests.
    :param lock: the lock that guards the container.
    """

    name = "l1"

    def __init__(
        self,
        maxbytes: int,
        ttl: float,
        *,
        timer: Callable[[], float] = time.monotonic,
        lock: threading.Lock | None = None,
    ) -> None:
        self.maxbytes = maxbytes
        self._lock = lock or threading.Lock()
        self._cache: TTLCache[str, Entry] = TTLCache(
            maxsize=max(maxbytes, 1), ttl=ttl, timer=timer, getsizeof=entry_size
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str, *, count: bool = True) -> Entry | None:
        """The entry for *key*; *count* ``False`` for a re-check that is not a new request."""
        with self._lock:
            try:
                entry = self._cache[key]  # one expiry check (Cache.get() would do two)
            except KeyError:
                if count:
                    self.misses += 1
                return None
            if count:
                self.hits += 1
            return entry

    def set(self, key: str, entry: Entry) -> None:
        if self.maxbytes <= 0 or entry_size(entry) > self.maxbytes:
            return  # too large to cache: served uncached (cachetools would raise)
        with self._lock:
            self._cache[key] = entry

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._cache.pop(key, None) is not None

    def delete_source(self, source_hash: str) -> int:
        """Remove every variant of the source whose path hashes to *source_hash*."""
        with self._lock:
            doomed = [k for k, e in self._cache.items() if e.source_hash == source_hash]
            for key in doomed:
                del self._cache[key]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._cache.expire()
            return {
                "entries": len(self._cache),
                "bytes": int(self._cache.currsize),
                "maxbytes": self.maxbytes,
                "hits": self.hits,
                "misses": self.misses,
            }
