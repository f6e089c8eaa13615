"""L1: the byte bound, the TTL (injected clock), oversize entries, purge by source."""

from __future__ import annotations

import threading

import pytest

from imageguard import Settings
from imageguard.cache.envelope import source_hash
from imageguard.cache.memory import ENTRY_OVERHEAD, MemoryCache
from imageguard.core import Core, Entry
from imageguard.raster import SanitizedImage
from tests.support import SECRET


def entry(key: str, size: int, source: str = "/a.png") -> Entry:
    core = Core(Settings(secret_key=SECRET))
    return core.make_entry(key, source, SanitizedImage(b"x" * size, "png", "image/png", 1, 1, 1, "png"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bounded_by_body_bytes_lru() -> None:
    cache = MemoryCache(3 * (1000 + ENTRY_OVERHEAD), ttl=60)
    for key in "abc":
        cache.set(key, entry(key, 1000))
    assert cache.get("a") is not None  # a is now most recently used
    cache.set("d", entry("d", 1000))
    assert cache.get("b") is None  # least recently used went
    assert {k for k in "acd" if cache.get(k)} == set("acd")
    assert cache.stats()["bytes"] <= cache.maxbytes


def test_ttl_with_injected_clock() -> None:
    clock = Clock()
    cache = MemoryCache(10_000, ttl=10, timer=clock)
    cache.set("a", entry("a", 10))
    clock.now = 9.9
    assert cache.get("a") is not None
    clock.now = 10.1
    assert cache.get("a") is None


def test_oversize_entry_is_served_uncached_and_zero_disables() -> None:
    cache = MemoryCache(1000, ttl=10)
    cache.set("big", entry("big", 2000))
    assert cache.get("big") is None
    off = MemoryCache(0, ttl=10)
    off.set("a", entry("a", 1))
    assert off.get("a") is None


def test_delete_source_and_stats() -> None:
    cache = MemoryCache(100_000, ttl=10)
    cache.set("a1", entry("a1", 10, "/a.png"))
    cache.set("a2", entry("a2", 10, "/a.png"))
    cache.set("b1", entry("b1", 10, "/b.png"))
    assert cache.delete_source(source_hash("/a.png")) == 2
    assert cache.delete("b1") and not cache.delete("b1")
    cache.get("zz")
    stats = cache.stats()
    assert stats["entries"] == 0 and stats["misses"] == 1


def test_threads_hammering_keep_the_bound() -> None:
    cache = MemoryCache(20 * (100 + ENTRY_OVERHEAD), ttl=60)

    def work(n: int) -> None:
        for i in range(300):
            cache.set(f"{n}-{i}", entry(f"{n}-{i}", 100))
            cache.get(f"{n}-{i - 1}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert 0 < stats["entries"] <= 20 and stats["bytes"] <= cache.maxbytes


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_entry_headers_are_precomputed(size: int) -> None:
    made = entry("k", size)
    headers = dict(made.headers)
    assert headers["Content-Length"] == str(size)
    assert headers["ETag"] == made.etag
    assert dict(made.raw_headers)[b"etag"] == made.etag.encode()
