"""Cache tiers.

L1 is :class:`~imageguard.cache.memory.MemoryCache` (:class:`Tier`, entries in
process memory). The disk (L2) and Redis (L3) tiers are record tiers (:class:`RecordTier`):
they store sealed envelopes (:mod:`imageguard.cache.envelope`) and check each
one on every read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..core import Entry
    from .envelope import Record


class Tier(Protocol):
    """What the core needs from a cache tier."""

    name: str

    def get(self, key: str) -> Entry | None:
        """The entry stored under *key*, or ``None``."""

    def set(self, key: str, entry: Entry) -> None:
        """Store *entry* (silently skipped when it can never fit)."""

    def delete(self, key: str) -> bool:
        """Remove *key*; whether it was there."""

    def delete_source(self, source_hash: str) -> int:
        """Remove every variant of the source whose path hashes to *source_hash*; how many."""

    def clear(self) -> None:
        """Remove everything."""

    def stats(self) -> dict[str, int]:
        """Counters: entries, bytes, maxbytes, hits, misses."""


class RecordTier(Protocol):
    """What the core needs from a shared, out-of-process tier (L2 disk, L3 Redis).

    These tiers store sealed :class:`~imageguard.cache.envelope.Record` envelopes,
    not entries. None of the methods raises for an I/O problem: a tier that
    cannot be reached or written degrades (logs one warning, answers "miss",
    skips stores) and comes back by itself. An entry that fails its integrity
    check is deleted, reported as an ``integrity_failure`` security event and
    counted, and the read answers ``None`` so the image is filled again.
    """

    name: str

    def get(self, key: str, source_hash: str) -> Record | None:
        """The verified record stored under *key* (whose source path hashes to *source_hash*)."""

    def set(self, record: Record) -> None:
        """Store *record* under ``record.key`` (skipped when it cannot fit or the tier is down)."""

    def delete(self, key: str) -> bool:
        """Remove *key*; whether it was there."""

    def delete_source(self, source_hash: str) -> int:
        """Remove every variant of one source; how many were removed."""

    def clear(self) -> None:
        """Remove every entry of this tier (this namespace, for Redis)."""

    def stats(self) -> dict[str, Any]:
        """Counters: at least entries, bytes, hits, misses, integrity_failures, available."""

    def verify(self) -> Iterator[tuple[str, str | None]]:
        """Walk every stored entry: ``(key, None)`` if sound, ``(key, detail)`` if tampered.

        Tampered entries are reported, not deleted (``imageguard cache verify``).
        """

    def close(self) -> None:
        """Release files, connections and threads."""
