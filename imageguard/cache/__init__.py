"""Cache tiers. Every tier stores :class:`~imageguard.core.Entry` objects by key.

L1 is :class:`~imageguard.cache.memory.MemoryCache`; the disk (L2) and Redis
(L3) tiers implement the same small interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..core import Entry


class Tier(Protocol):
    """What the core needs from a cache tier."""

    name: str

    def get(self, key: str) -> Entry | None:
        """The entry stored under *key*, or ``None``."""

    def set(self, key: str, entry: Entry) -> None:
        """Store *entry* (silently skipped when it can never fit)."""

    def delete(self, key: str) -> bool:
        """Remove *key*; whether it was there."""

    def delete_source(self, path: str) -> int:
        """Remove every variant of the source *path*; how many were removed."""

    def clear(self) -> None:
        """Remove everything."""

    def stats(self) -> dict[str, int]:
        """Counters: entries, bytes, maxbytes, hits, misses."""
