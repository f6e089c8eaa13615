"""L2 (disk) and L3 (Redis) behind both adapters: what a client receives.

Every test runs once per adapter (``make_client``). A "second instance" is a
second guard over the same upstream with a fresh L1, sharing the disk
directory or the Redis server, as another worker process would. Tampering is
done on the real files and the real Redis values; the assertions are on the
status, headers and bytes the client receives, and on the security events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from imageguard.cache.envelope import Record, Sealer, source_hash
from tests.drivers import MakeClient, Result, assert_clean_image
from tests.redis_server import redis_server
from tests.support import SECRET, Upstream, eventually, png, read_only, reopen

HTML = b"<html><script>alert(document.domain)</script></html>"


def l2_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "v1").rglob("*") if p.is_file() and not p.name.startswith("."))


def has_colour(colour: tuple[int, int, int]) -> Callable[[Result], None]:
    def check(result: Result) -> None:
        image = assert_clean_image(result, "png").convert("RGB")
        assert image.getpixel((1, 1)) == colour

    return check


def security_events(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "imageguard.security" and getattr(r, "imageguard", {}).get("reason") == reason
    ]


# -- L2 -----------------------------------------------------------------------------


def test_disk_tier_serves_a_second_instance(
    make_client: MakeClient, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    first = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    served = first.get(path)
    assert_clean_image(served, "png")
    (stored,) = l2_files(tmp_path / "l2")
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.parent.parent.name == source_hash(path)[:2] and stored.parent.name == source_hash(path)
    second = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    again = second.get(path)
    assert again.body == served.body and again.headers["ETag"] == served.headers["ETag"]
    assert upstream.calls_to(path) == 1  # the second instance's L1 missed; L2 answered


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def _flip_header_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[12] ^= 0x20  # inside the JSON header
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def _other_key(file: Path) -> None:
    # A well-formed envelope for the same key, sealed with a key that is not ours,
    # whose body is an HTML polyglot: exactly what a poisoner would plant.
    forged = Record(file.name, "image/png", '"x"', "/static/a.png", None, 0.0, png(30, 20) + HTML)
    file.write_bytes(Sealer("attacker-key-0123456789abcdef").seal(forged))


@pytest.mark.parametrize(
    "tamper",
    [_flip_last_byte, _flip_header_byte, _truncate, _other_key],
    ids=["flipped-body-byte", "flipped-header-byte", "truncated", "sealed-by-another-key"],
)
def test_tampered_disk_entry_is_never_served(
    make_client: MakeClient,
    upstream: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[Path], None],
) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    original = make_client(upstream, disk_cache_dir=str(tmp_path / "l2")).get(path)
    (stored,) = l2_files(tmp_path / "l2")
    tamper(stored)
    caplog.set_level(logging.WARNING, "imageguard.security")
    served = make_client(upstream, disk_cache_dir=str(tmp_path / "l2")).get(path)
    assert served.body == original.body  # refilled from the upstream, not the planted bytes
    assert HTML not in served.body
    assert upstream.calls_to(path) == 2
    (event,) = security_events(caplog, "integrity_failure")
    assert event.imageguard["tier"] == "l2"  # type: ignore[attr-defined]
    # The refill replaced the bad entry with a sound one.
    (rewritten,) = l2_files(tmp_path / "l2")
    assert Sealer(SECRET).open(rewritten.name, rewritten.read_bytes()).body == original.body


def test_swapped_disk_entries_are_never_served(
    make_client: MakeClient, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    red = upstream.add("red.png", png(30, 20, colour=(255, 0, 0)), "image/png")
    blue = upstream.add("blue.png", png(30, 20, colour=(0, 0, 255)), "image/png")
    first = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    first.get(red)
    first.get(blue)
    red_file, blue_file = (
        next(p for p in l2_files(tmp_path / "l2") if p.parent.name == source_hash(x)) for x in (red, blue)
    )
    red_bytes, blue_bytes = red_file.read_bytes(), blue_file.read_bytes()
    red_file.write_bytes(blue_bytes)
    blue_file.write_bytes(red_bytes)
    caplog.set_level(logging.WARNING, "imageguard.security")
    second = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    has_colour((255, 0, 0))(second.get(red))
    has_colour((0, 0, 255))(second.get(blue))
    assert len(security_events(caplog, "integrity_failure")) == 2


def test_unsafe_disk_directory_is_refused(
    make_client: MakeClient, upstream: Upstream, tmp_path: Path
) -> None:
    from imageguard.errors import ConfigError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError) as raised:
        make_client(upstream, disk_cache_dir=str(shared))
    assert raised.value.variable == "IMAGEGUARD_DISK_CACHE_DIR"


def test_surrogate_key_header(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    assert "Surrogate-Key" not in make_client(upstream).get(path).headers  # off by default
    both = make_client(upstream, surrogate_key="both").get(path)
    assert both.headers["Surrogate-Key"] == both.headers["Cache-Tag"] == source_hash(path)
    signed = make_client(upstream, surrogate_key="surrogate-key")
    variant = signed.get(signed.url(path, w=10))
    assert variant.headers["Surrogate-Key"] == source_hash(path)  # every variant carries its source's tag
    assert "Cache-Tag" not in variant.headers


def test_purge_reaches_the_disk_tier(make_client: MakeClient, upstream: Upstream, tmp_path: Path) -> None:
    path = upstream.add("a.png", png(30, 20, colour=(255, 0, 0)), "image/png")
    client = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    client.get(path)
    client.get(client.url(path, w=10))
    assert len(l2_files(tmp_path / "l2")) == 2
    upstream.add("a.png", png(30, 20, colour=(0, 0, 255)), "image/png")
    assert client.guard.purge(path=path) == 2
    assert l2_files(tmp_path / "l2") == []
    has_colour((0, 0, 255))(client.get(path))
    client.guard.purge_all()
    assert l2_files(tmp_path / "l2") == []
    has_colour((0, 0, 255))(make_client(upstream, disk_cache_dir=str(tmp_path / "l2")).get(path))


# -- L3 -----------------------------------------------------------------------------


def _redis_entries(url: str) -> dict[bytes, bytes]:
    raw = redis.Redis.from_url(url)
    try:
        return {k: raw.get(k) or b"" for k in raw.scan_iter(match=b"imageguard:*:e:*")}
    finally:
        raw.close()


def test_redis_tier_serves_a_second_instance(
    make_client: MakeClient, upstream: Upstream, redis_url: str
) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    first = make_client(upstream, redis_url=redis_url)
    served = first.get(path)
    assert len(_redis_entries(redis_url)) == 1
    again = make_client(upstream, redis_url=redis_url).get(path)
    assert again.body == served.body and again.headers["ETag"] == served.headers["ETag"]
    assert upstream.calls_to(path) == 1


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda v: v[:-1] + bytes([v[-1] ^ 1]), id="flipped-body-byte"),
        pytest.param(lambda v: v[:-100], id="truncated"),
        pytest.param(lambda v: b"garbage", id="garbage"),
        pytest.param(None, id="sealed-by-another-key"),
    ],
)
def test_tampered_redis_entry_is_never_served(
    make_client: MakeClient,
    upstream: Upstream,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[bytes], bytes] | None,
) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    original = make_client(upstream, redis_url=redis_url).get(path)
    ((name, value),) = _redis_entries(redis_url).items()
    key = name.decode().rsplit(":", 1)[1]
    if tamper is None:
        forged = Record(key, "image/png", '"x"', path, None, 0.0, png(30, 20) + HTML)
        planted = Sealer("attacker-key-0123456789abcdef").seal(forged)
    else:
        planted = tamper(value)
    raw = redis.Redis.from_url(redis_url)
    raw.set(name, planted)
    caplog.set_level(logging.WARNING, "imageguard.security")
    served = make_client(upstream, redis_url=redis_url).get(path)
    assert served.body == original.body and HTML not in served.body
    assert upstream.calls_to(path) == 2
    (event,) = security_events(caplog, "integrity_failure")
    assert event.imageguard["tier"] == "l3"  # type: ignore[attr-defined]
    assert Sealer(SECRET).open(key, raw.get(name) or b"").body == original.body  # refilled, sound
    raw.close()


def test_l3_hit_is_promoted_to_l2(
    make_client: MakeClient, upstream: Upstream, redis_url: str, tmp_path: Path
) -> None:
    path = upstream.add("a.png", png(30, 20), "image/png")
    make_client(upstream, redis_url=redis_url).get(path)  # an instance without a disk tier fills L3
    second = make_client(upstream, redis_url=redis_url, disk_cache_dir=str(tmp_path / "l2"))
    assert_clean_image(second.get(path), "png")
    assert len(l2_files(tmp_path / "l2")) == 1
    assert upstream.calls_to(path) == 1


def test_purge_reaches_redis_and_other_instances(
    make_client: MakeClient, upstream: Upstream, redis_url: str
) -> None:
    path = upstream.add("a.png", png(30, 20, colour=(255, 0, 0)), "image/png")
    a = make_client(upstream, redis_url=redis_url)
    b = make_client(upstream, redis_url=redis_url)
    has_colour((255, 0, 0))(a.get(path))
    has_colour((255, 0, 0))(b.get(path))  # now in b's L1 as well
    # b's listener subscribes in its own thread: a purge published before that is
    # not delivered to it (a known limit, see the README), so wait for both listeners.
    channel = b.guard.core._shared.channel
    raw = redis.Redis.from_url(redis_url)
    eventually(lambda: dict(raw.pubsub_numsub(channel)).get(channel.encode(), 0) >= 2)
    raw.close()
    upstream.add("a.png", png(30, 20, colour=(0, 0, 255)), "image/png")
    a.guard.purge(path=path)
    assert _redis_entries(redis_url) == {}
    eventually(lambda: _pixel(b.get(path)) == (0, 0, 255))  # b's L1 dropped it on the pub/sub message
    upstream.add("a.png", png(30, 20, colour=(0, 255, 0)), "image/png")
    a.guard.purge_all()
    eventually(lambda: _pixel(b.get(path)) == (0, 255, 0))
    assert b.guard.stats()["generation"] == a.guard.stats()["generation"] >= 1


def _pixel(result: Result) -> tuple[int, int, int]:
    assert result.status == 200, result.reason
    return reopen(result.body).convert("RGB").getpixel((1, 1))  # type: ignore[return-value]


@pytest.mark.timeout(90)
def test_redis_outage_is_survived_and_recovered(make_client: MakeClient, upstream: Upstream) -> None:
    images = {f"i{n}.png": png(20 + n, 20) for n in range(6)}
    paths = [upstream.add(name, body, "image/png") for name, body in images.items()]
    with redis_server() as server:
        client = make_client(upstream, redis_url=server.url)
        assert_clean_image(client.get(paths[0]), "png")
        server.stop()
        for path in paths:  # a hit (paths[0]) and misses: all answered while Redis is down
            image = assert_clean_image(client.get(path), "png")
            assert image.size[0] == 20 + paths.index(path)
        server.start()
        other = make_client(upstream, redis_url=server.url)

        def stored_again() -> bool:
            client.guard.purge(path=paths[1])  # a fresh fill, now that Redis is back
            client.get(paths[1])
            return len(_redis_entries(server.url)) >= 1

        eventually(stored_again, timeout=30)
        assert_clean_image(other.get(paths[1]), "png")


def test_read_only_disk_tier_never_fails_a_request(
    make_client: MakeClient, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = upstream.add("stored.png", png(30, 20, colour=(255, 0, 0)), "image/png")
    client = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    has_colour((255, 0, 0))(client.get(stored))
    caplog.set_level(logging.WARNING, "imageguard")
    fresh = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"))
    paths = [upstream.add(f"new{n}.png", png(30, 20, colour=(0, 0, 255)), "image/png") for n in range(3)]
    with read_only(tmp_path / "l2"):
        has_colour((255, 0, 0))(fresh.get(stored))  # still read from L2
        for path in paths:  # fills that cannot be stored on disk are still served
            has_colour((0, 0, 255))(fresh.get(path))
    warnings = [r for r in caplog.records if r.name == "imageguard" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "l2") in warnings[0].getMessage()
