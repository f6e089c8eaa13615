"""L3 on a real ``redis-server``: round trip, namespaces, tampering, purges, the purge bus, outages.

Tampering is done with a raw client on the real values. Outages are real too:
a server stopped and started again on the same port, and a socket that
accepts connections and never answers. The breaker's clock is injected, so
"how many times did it reach for Redis" is counted, never timed.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
import redis

from imageguard.cache.envelope import Record, Sealer, source_hash
from imageguard.cache.redis import SOCKET_TIMEOUT, CircuitBreaker, PurgeMessage, RedisCache, connect
from tests.redis_server import redis_server
from tests.servers import free_port
from tests.support import SECRET

OTHER_SECRET = "another-secret-key-0123456789abcdef"
SOURCE = "/images/a.png"
TTL = 60


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(key: str, source: str = SOURCE, body: bytes = b"\x89PNG body bytes") -> Record:
    return Record(key, "image/png", '"etag-1"', source, "Tue, 01 Jul 2025 00:00:00 GMT", 1.5, body)


def security_events(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "imageguard.security" and getattr(r, "imageguard", {}).get("reason") == reason
    ]


def warnings_from(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "imageguard" and r.levelno == level and text in r.getMessage()
    ]


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.02)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_cache(redis_url: str) -> Iterator[Callable[..., RedisCache]]:
    made: list[RedisCache] = []

    def make(secret: str = SECRET, url: str | None = None, **options: object) -> RedisCache:
        cache = RedisCache(url or redis_url, TTL, Sealer(secret), **options)  # type: ignore[arg-type]
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def fresh_secret() -> str:
    """A namespace of this test's own: a listener left running elsewhere cannot hear it."""
    return "test-" + secrets.token_hex(16)


@pytest.fixture
def cache(make_cache: Callable[..., RedisCache]) -> RedisCache:
    return make_cache()


def entry_name(cache: RedisCache, key: str) -> bytes:
    return f"{cache.namespace}e:{key}".encode()


# -- the breaker on its own ------------------------------------------------------------


def test_breaker_opens_once_and_lets_one_probe_through(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    breaker = CircuitBreaker("thing", 5.0, clock=clock)
    caplog.set_level(logging.INFO, "imageguard")
    assert breaker.allow() and not breaker.is_open
    breaker.failure(ConnectionError("refused"))
    breaker.failure(ConnectionError("refused"))  # a concurrent caller's failure: no second warning
    assert breaker.is_open and not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert not breaker.allow() and not breaker.allow()  # everyone else, meanwhile
    breaker.failure(TimeoutError("slow"))  # the probe failed: another interval
    assert not breaker.allow()
    clock.now += 5.1
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()
    breaker.success()
    assert len(warnings_from(caplog, "thing is unavailable")) == 1
    assert warnings_from(caplog, "thing is back", logging.INFO) == ["thing is back"]
    assert (breaker.failures, breaker.trips) == (3, 1)


def test_breaker_replaces_a_probe_that_never_reported() -> None:
    clock = Clock()
    breaker = CircuitBreaker("thing", 1.0, clock=clock)
    breaker.failure(OSError("down"))
    clock.now += 1.5
    assert breaker.allow() and not breaker.allow()
    clock.now += 1.5  # the probe's caller vanished
    assert breaker.allow()


# -- the tier ------------------------------------------------------------------------


def test_round_trip_sets_a_ttl(cache: RedisCache, raw: redis.Redis) -> None:
    stored = record("k1")
    cache.set(stored)
    assert cache.get("k1", source_hash(SOURCE)) == stored
    assert cache.get("absent", source_hash(SOURCE)) is None
    assert 0 < raw.ttl(entry_name(cache, "k1")) <= TTL
    assert 0 < raw.ttl(f"{cache.namespace}s:{source_hash(SOURCE)}") <= TTL
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"], stats["integrity_failures"]) == (1, 1, 1, 0)
    assert stats["available"] is True and stats["bytes"] == stats["redis_used_memory"] > 0


def test_nothing_connects_in_the_constructor() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", TTL, Sealer(SECRET))
    assert cache.breaker.failures == 0 and cache.available
    cache.close()


def test_url_query_parameters_win_over_the_short_defaults(redis_url: str) -> None:
    defaults = connect(redis_url).connection_pool.connection_kwargs
    assert defaults["socket_timeout"] == defaults["socket_connect_timeout"] == SOCKET_TIMEOUT
    assert defaults["retry"].get_retries() == 0
    tuned = connect(redis_url + "?socket_timeout=1.5&socket_connect_timeout=2").connection_pool
    assert tuned.connection_kwargs["socket_timeout"] == 1.5
    assert tuned.connection_kwargs["socket_connect_timeout"] == 2.0


def test_namespaces_keep_secrets_apart(
    make_cache: Callable[..., RedisCache], raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = make_cache(), make_cache(OTHER_SECRET)
    assert ours.namespace != theirs.namespace and ours.channel != theirs.channel
    caplog.set_level(logging.WARNING, "imageguard.security")
    ours.set(record("k1", body=b"ours"))
    assert theirs.get("k1", source_hash(SOURCE)) is None
    theirs.set(record("k1", body=b"theirs"))
    mine, yours = ours.get("k1", source_hash(SOURCE)), theirs.get("k1", source_hash(SOURCE))
    assert mine is not None and mine.body == b"ours"
    assert yours is not None and yours.body == b"theirs"
    theirs.clear()
    assert ours.get("k1", source_hash(SOURCE)) is not None
    assert security_events(caplog, "integrity_failure") == []
    assert all(name.startswith(ours.namespace.encode()) for name in raw.scan_iter(match=b"*"))


def _flip(value: bytes, offset: int) -> bytes:
    return value[:offset] + bytes([value[offset] ^ 0x01]) + value[offset + 1 :]


def _tag_offset(value: bytes) -> int:
    return 8 + int(struct.unpack(">I", value[4:8])[0])


def _value(raw: redis.Redis, name: bytes) -> bytes:
    value = raw.get(name)
    assert isinstance(value, bytes)
    return value


def _set(transform: Callable[[bytes], bytes]) -> Callable[[redis.Redis, bytes, bytes], None]:
    def tamper(raw: redis.Redis, name: bytes, _other: bytes) -> None:
        raw.set(name, transform(_value(raw, name)), keepttl=True)

    return tamper


def _swap(raw: redis.Redis, name: bytes, other: bytes) -> None:
    first, second = _value(raw, name), _value(raw, other)
    raw.set(name, second, keepttl=True)
    raw.set(other, first, keepttl=True)


def _make_a_list(raw: redis.Redis, name: bytes, _other: bytes) -> None:
    raw.delete(name)
    raw.rpush(name, b"not a string")


TAMPERING = [
    pytest.param(_set(lambda v: _flip(v, 10)), "bad_tag", ("k1",), id="header-byte"),
    pytest.param(_set(lambda v: _flip(v, _tag_offset(v) + 7)), "bad_tag", ("k1",), id="tag-byte"),
    pytest.param(_set(lambda v: _flip(v, len(v) - 1)), "bad_tag", ("k1",), id="body-byte"),
    pytest.param(_set(lambda v: _flip(v, 3)), "unknown_version", ("k1",), id="version-byte"),
    pytest.param(_set(lambda v: v[:-1]), "bad_tag", ("k1",), id="truncated-body"),
    pytest.param(_set(lambda v: v[:6]), "truncated", ("k1",), id="truncated-prefix"),
    pytest.param(_swap, "bad_tag", ("k1", "k2"), id="swapped"),
    pytest.param(
        _set(lambda v: Sealer(OTHER_SECRET).seal(record("k1", body=b"<script>"))),
        "bad_tag",
        ("k1",),
        id="sealed-by-another-secret",
    ),
    pytest.param(_set(lambda v: b"<html><script>alert(1)</script>"), "bad_magic", ("k1",), id="garbage"),
    pytest.param(_make_a_list, "wrong_type", ("k1",), id="not-a-string"),
]


@pytest.mark.parametrize(("tamper", "detail", "tampered"), TAMPERING)
def test_tampered_entries_are_reported_deleted_and_counted(
    cache: RedisCache,
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[redis.Redis, bytes, bytes], None],
    detail: str,
    tampered: tuple[str, ...],
) -> None:
    cache.set(record("k1", body=b"first image"))
    cache.set(record("k2", body=b"second image"))
    tamper(raw, entry_name(cache, "k1"), entry_name(cache, "k2"))

    report = dict(cache.verify())
    assert report == {key: detail if key in tampered else None for key in ("k1", "k2")}
    assert raw.exists(entry_name(cache, "k1")) == 1  # verify() only reports

    caplog.set_level(logging.WARNING, "imageguard.security")
    for key in ("k1", "k2"):
        got = cache.get(key, source_hash(SOURCE))
        if key in tampered:
            assert got is None
            assert raw.exists(entry_name(cache, key)) == 0
        else:
            assert got is not None and got.body == b"second image"
    events = security_events(caplog, "integrity_failure")
    assert [e.imageguard for e in events] == [  # type: ignore[attr-defined]
        {"reason": "integrity_failure", "tier": "l3", "key": key, "detail": detail} for key in tampered
    ]
    assert cache.stats()["integrity_failures"] == len(tampered)


def test_a_record_of_another_source_is_an_integrity_failure(
    cache: RedisCache, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cache.set(record("k1", source="/images/other.png"))
    caplog.set_level(logging.WARNING, "imageguard.security")
    assert cache.get("k1", source_hash(SOURCE)) is None
    (event,) = security_events(caplog, "integrity_failure")
    assert event.imageguard["detail"] == "wrong_source"  # type: ignore[attr-defined]
    assert raw.exists(entry_name(cache, "k1")) == 0


def test_delete_and_delete_source(cache: RedisCache, raw: redis.Redis) -> None:
    for key in ("a1", "a2", "a3"):
        cache.set(record(key))
    cache.set(record("b1", source="/images/b.png"))
    assert cache.delete("a1") is True
    assert cache.delete("a1") is False
    assert cache.delete_source(source_hash(SOURCE)) == 2
    assert cache.delete_source(source_hash(SOURCE)) == 0
    assert [k for k in ("a1", "a2", "a3") if cache.get(k, source_hash(SOURCE)) is not None] == []
    assert cache.get("b1", source_hash("/images/b.png")) is not None
    assert raw.exists(f"{cache.namespace}s:{source_hash(SOURCE)}") == 0


def test_clear_keeps_the_generation(make_cache: Callable[..., RedisCache], raw: redis.Redis) -> None:
    cache, neighbour = make_cache(), make_cache(OTHER_SECRET)
    assert cache.generation() == 0
    assert (cache.bump_generation(), cache.bump_generation()) == (1, 2)
    assert neighbour.generation() == 0  # a counter per namespace
    for key in ("k1", "k2", "k3"):
        cache.set(record(key))
    neighbour.set(record("k1"))
    cache.clear()
    assert cache.stats()["entries"] == 0 and cache.generation() == 2
    assert sorted(raw.scan_iter(match=f"{cache.namespace}*")) == [f"{cache.namespace}gen".encode()]
    assert neighbour.get("k1", source_hash(SOURCE)) is not None


def test_unreachable_redis_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    cache = RedisCache(url, TTL, Sealer(SECRET), clock=Clock())
    caplog.set_level(logging.WARNING, "imageguard")
    assert cache.get("k1", source_hash(SOURCE)) is None
    cache.set(record("k1"))
    assert cache.delete("k1") is False
    assert cache.delete_source(source_hash(SOURCE)) == 0
    cache.clear()
    assert list(cache.verify()) == []
    assert cache.generation() is None and cache.bump_generation() is None
    cache.publish(PurgeMessage("all", "", 1))
    stats = cache.stats()
    assert stats["available"] is False and stats["entries"] == 0 and stats["misses"] == 1
    assert "hunter2" not in stats["url"] and ":***@" in stats["url"]
    assert (cache.breaker.failures, cache.breaker.trips) == (1, 1)  # one attempt, then the breaker
    (warning,) = warnings_from(caplog, "is unavailable")
    assert "hunter2" not in warning
    cache.close()


# -- the purge bus -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_purges_reach_the_other_instance_and_not_the_sender(
    make_cache: Callable[..., RedisCache], fresh_secret: str
) -> None:
    got_a: list[PurgeMessage] = []
    got_b: list[PurgeMessage] = []
    synced: list[int] = []
    a = make_cache(fresh_secret, on_purge=got_a.append, on_resync=synced.append)
    b = make_cache(fresh_secret, on_purge=got_b.append, on_resync=synced.append)
    a.start_listener()
    b.start_listener()
    a.start_listener()  # idempotent
    eventually(lambda: len(synced) == 2)
    assert synced == [0, 0]

    a.publish(PurgeMessage("source", source_hash(SOURCE), 0))
    eventually(lambda: len(got_b) == 1)
    assert got_b == [PurgeMessage("source", source_hash(SOURCE), 0, a.origin)]
    b.publish(PurgeMessage("key", "k1", 0))
    eventually(lambda: len(got_a) == 1)
    # a's own message reached a's connection before b's: it was dropped, not delayed.
    assert got_a == [PurgeMessage("key", "k1", 0, b.origin)]
    assert len(got_b) == 1


@pytest.mark.timeout(60)
def test_forged_and_foreign_purge_messages_are_dropped(
    make_cache: Callable[..., RedisCache],
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    fresh_secret: str,
) -> None:
    got: list[PurgeMessage] = []
    synced: list[int] = []
    sender = make_cache(fresh_secret)
    receiver = make_cache(fresh_secret, on_purge=got.append, on_resync=synced.append)
    stranger = make_cache(OTHER_SECRET)
    receiver.start_listener()
    eventually(lambda: synced == [0])
    caplog.set_level(logging.WARNING, "imageguard.security")

    forged = PurgeMessage("all", "", 99, "attacker").to_json()
    raw.publish(receiver.channel, b"\x00" * 32 + forged)  # a tag made up
    raw.publish(receiver.channel, Sealer(OTHER_SECRET).sign_message(forged))  # another secret's tag
    stranger.publish(PurgeMessage("all", "", 7))  # another namespace: another channel
    sender.publish(PurgeMessage("all", "", 1))
    eventually(lambda: len(got) == 1)
    assert got == [PurgeMessage("all", "", 1, sender.origin)]
    events = security_events(caplog, "forged_purge_message")
    assert len(events) == 2 and all(e.imageguard["tier"] == "l3" for e in events)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_resync_reports_the_current_generation(
    make_cache: Callable[..., RedisCache], fresh_secret: str
) -> None:
    make_cache(fresh_secret).bump_generation()
    make_cache(fresh_secret).bump_generation()
    synced: list[int] = []
    cache = make_cache(fresh_secret, on_resync=synced.append)
    cache.start_listener()
    eventually(lambda: synced == [2])
    assert cache.listening


@pytest.mark.timeout(60)
def test_a_cache_nobody_holds_is_collected_and_its_listener_ends(redis_url: str) -> None:
    synced: list[int] = []
    before = set(threading.enumerate())
    cache = RedisCache(redis_url, TTL, Sealer(SECRET), on_resync=synced.append)
    cache.start_listener()
    (thread,) = set(threading.enumerate()) - before
    eventually(lambda: synced == [0])
    collected = threading.Event()
    weakref.finalize(cache, collected.set)
    del cache
    # The thread does not keep it (nor its core) alive; it holds it only while handing a message over.
    eventually(lambda: gc.collect() >= 0 and collected.is_set())
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_listener_is_restarted_in_a_forked_child(make_cache: Callable[..., RedisCache]) -> None:
    synced: list[int] = []
    cache = make_cache(on_resync=synced.append)
    cache.start_listener()
    eventually(lambda: synced == [0])
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            if not cache.listening:  # the thread did not survive fork()
                cache.start_listener()
                deadline = time.monotonic() + 10
                while len(synced) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                code = 0 if synced == [0, 0] and cache.listening else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.listening and synced == [0]  # the parent's listener is untouched


# -- outages -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_outage_is_survived_and_recovered(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    synced: list[int] = []
    caplog.set_level(logging.INFO, "imageguard")
    with redis_server() as server:
        cache = RedisCache(
            server.url, TTL, Sealer(SECRET), on_resync=synced.append, breaker_interval=0.2, clock=clock
        )
        try:
            cache.start_listener()
            eventually(lambda: synced == [0])
            cache.set(record("k1"))
            assert cache.get("k1", source_hash(SOURCE)) is not None

            server.stop()
            for n in range(50):
                assert cache.get("k1", source_hash(SOURCE)) is None
                cache.set(record(f"k{n}"))
            assert cache.generation() is None and not cache.available
            # The clock stood still: one failed attempt (two if the listener noticed first).
            assert cache.breaker.is_open and cache.breaker.failures <= 2
            assert len(warnings_from(caplog, "is unavailable")) == 1

            server.start()

            def stored_again() -> bool:
                clock.now += 1.0  # past the interval: the next call is the probe
                cache.set(record("k2"))
                return cache.get("k2", source_hash(SOURCE)) is not None

            eventually(stored_again, timeout=10)
            assert cache.available
            eventually(lambda: synced == [0, 0])  # the listener subscribed again
            assert len(warnings_from(caplog, "is unavailable")) == 1
            assert len(warnings_from(caplog, "is back", logging.INFO)) == 1
        finally:
            cache.close()


class SilentServer:
    """Accepts TCP connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # accept() is not woken by close(): poll a flag
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.timeout(60)
def test_a_hung_redis_costs_one_timeout_then_the_breaker_answers() -> None:
    server = SilentServer()
    cache = RedisCache(f"redis://127.0.0.1:{server.port}/0", TTL, Sealer(SECRET), clock=Clock())
    try:
        assert cache.get("k1", source_hash(SOURCE)) is None  # after about socket_timeout
        assert cache.breaker.is_open and cache.breaker.failures == 1
        for _ in range(20):
            assert cache.get("k1", source_hash(SOURCE)) is None
            cache.set(record("k1"))
        assert cache.generation() is None
        assert cache.breaker.failures == 1 and len(server.accepted) == 1
    finally:
        cache.close()
        server.close()


def test_a_stale_success_does_not_close_an_open_breaker() -> None:
    # Found by tests/test_faults.py: a call that began before an outage and
    # succeeded just after another call failed closed the breaker on a dead Redis.
    now = [0.0]
    breaker = CircuitBreaker("x", 5.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure(ConnectionError("down"))
    breaker.success()  # the stale answer of a call that started earlier
    assert breaker.is_open and not breaker.allow()
    now[0] = 6.0
    assert breaker.allow()  # the probe
    breaker.success()
    assert not breaker.is_open
