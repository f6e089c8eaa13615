"""L2: layout, modes, start-up refusals, tampering, TTL, eviction, purges, degrading, two writers.

Everything runs on real files under ``tmp_path``; nothing of ``os`` is mocked.
The tests run as root in CI, where permission bits do not stop writes, so the
"read-only" failures are made real otherwise (``chattr +i``, ``RLIMIT_FSIZE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import resource
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from imageguard.cache.disk import STALE_TEMP, DiskCache
from imageguard.cache.envelope import Record, Sealer, source_hash
from imageguard.errors import ConfigError
from tests.support import read_only

SECRET = "test-secret-key-0123456789abcdef"
SEALER = Sealer(SECRET)
TTL = 3600.0
START = 1_000_000.0


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def record(
    name: str, source: str = "/a.png", body: bytes = b"\x89PNG body", created: float = START
) -> Record:
    return Record(
        key=key(name),
        content_type="image/png",
        etag=f'"{name}"',
        source_path=source,
        last_modified="Wed, 21 Oct 2015 07:28:00 GMT",
        created=created,
        body=body,
    )


def entry_path(directory: Path, rec: Record) -> Path:
    return directory / "v1" / rec.source_hash[:2] / rec.source_hash / rec.key


def files_named(directory: Path, prefix: str) -> list[Path]:
    return list(directory.rglob(f"{prefix}*"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "l2"


@pytest.fixture
def make(directory: Path, clock: Clock) -> Callable[..., DiskCache]:
    def build(maxbytes: int = 10_000_000, retry_interval: float = 60.0) -> DiskCache:
        return DiskCache(directory, maxbytes, TTL, SEALER, clock=clock, retry_interval=retry_interval)

    return build


def security_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "imageguard.security"]


def operational(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "imageguard" and r.levelno == level]


# -- layout, round trip, modes ----------------------------------------------------------


def test_round_trip_layout_and_modes(make: Callable[..., DiskCache], directory: Path) -> None:
    cache = make()
    rec = record("a")
    cache.set(rec)
    path = entry_path(directory, rec)
    assert path.is_file()
    assert mode(path) == 0o600
    for folder in (directory, directory / "v1", path.parent.parent, path.parent):
        assert mode(folder) == 0o700, folder
    assert path.parent.name == source_hash("/a.png")
    assert cache.get(rec.key, rec.source_hash) == rec
    assert not files_named(directory, ".tmp-")
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["bytes"] == path.stat().st_size
    assert stats["hits"] == 1 and stats["misses"] == 0 and stats["available"] is True
    assert stats["directory"] == os.fspath(directory) and stats["maxbytes"] == 10_000_000
    # The file's mtime is the record's creation time (eviction goes by it).
    assert path.stat().st_mtime == pytest.approx(START)


def test_missing_entry_is_a_counted_miss(make: Callable[..., DiskCache]) -> None:
    cache = make()
    rec = record("a")
    assert cache.get(rec.key, rec.source_hash) is None
    assert cache.stats()["misses"] == 1


def test_a_second_instance_counts_what_is_on_disk(make: Callable[..., DiskCache]) -> None:
    first = make()
    for name in "abc":
        first.set(record(name, source=f"/{name}.png"))
    second = make()  # another process opening the same directory
    assert second.stats()["entries"] == 3
    assert second.stats()["bytes"] == first.stats()["bytes"]
    rec = record("b", source="/b.png")
    assert second.get(rec.key, rec.source_hash) == rec


@pytest.mark.parametrize(
    ("name", "source"),
    [
        pytest.param("../../../etc/passwd", "ab" * 16, id="dotdot-key"),
        pytest.param("*", "ab" * 16, id="glob-key"),
        pytest.param("AB" * 32, "ab" * 16, id="uppercase-key"),
        pytest.param("ab" * 32, "../..", id="dotdot-source"),
        pytest.param("ab" * 32, "ab/cd", id="separator-source"),
        pytest.param("ab" * 32, "", id="empty-source"),
        pytest.param("a" * 300, "ab" * 16, id="too-long-key"),
    ],
)
def test_names_that_are_not_lowercase_hex_never_touch_the_disk(
    make: Callable[..., DiskCache], directory: Path, name: str, source: str
) -> None:
    cache = make()
    cache.set(record("real"))
    before = sorted(directory.rglob("*"))
    assert cache.get(name, source) is None
    assert cache.delete(name) is False
    assert cache.delete_source(source) == 0
    if name != "ab" * 32:
        cache.set(Record(name, "image/png", '"x"', "/x.png", None, START, b"x"))
    assert sorted(directory.rglob("*")) == before
    assert cache.stats()["available"] is True


# -- start-up refusals ------------------------------------------------------------------


def test_a_fresh_path_is_created_0700_with_parents(tmp_path: Path, clock: Clock) -> None:
    target = tmp_path / "deep" / "er" / "l2"
    DiskCache(target, 1000, TTL, SEALER, clock=clock)
    assert mode(target) == 0o700 and mode(target / "v1") == 0o700


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702, 0o720], ids=oct)
def test_refuses_a_directory_that_others_can_write(tmp_path: Path, bits: int) -> None:
    target = tmp_path / "l2"
    target.mkdir()
    os.chmod(target, bits)
    with pytest.raises(ConfigError) as caught:
        DiskCache(target, 1000, TTL, SEALER)
    assert caught.value.variable == "IMAGEGUARD_DISK_CACHE_DIR"
    assert caught.value.value == os.fspath(target)
    assert oct(bits)[2:] in str(caught.value)


def test_refuses_a_v1_subdirectory_that_others_can_write(tmp_path: Path) -> None:
    target = tmp_path / "l2"
    (target / "v1").mkdir(parents=True)
    os.chmod(target, 0o700)
    os.chmod(target / "v1", 0o777)
    with pytest.raises(ConfigError) as caught:
        DiskCache(target, 1000, TTL, SEALER)
    assert caught.value.variable == "IMAGEGUARD_DISK_CACHE_DIR"


def test_refuses_a_symlinked_v1(tmp_path: Path) -> None:
    target = tmp_path / "l2"
    target.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (target / "v1").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="not one"):
        DiskCache(target, 1000, TTL, SEALER)


def test_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "l2"
    target.write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        DiskCache(target, 1000, TTL, SEALER)
    assert caught.value.variable == "IMAGEGUARD_DISK_CACHE_DIR"
    under_a_file = target / "sub"
    with pytest.raises(ConfigError):
        DiskCache(under_a_file, 1000, TTL, SEALER)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="giving a directory to another user (os.chown) needs root",
)
@pytest.mark.parametrize("which", ["dir", "v1"])
def test_refuses_a_directory_owned_by_another_user(tmp_path: Path, which: str) -> None:
    target = tmp_path / "l2"
    (target / "v1").mkdir(parents=True, mode=0o700)
    os.chmod(target, 0o700)
    os.chown(target if which == "dir" else target / "v1", 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid") as caught:
        DiskCache(target, 1000, TTL, SEALER)
    assert caught.value.variable == "IMAGEGUARD_DISK_CACHE_DIR"


def test_symlinks_are_resolved_before_the_check(tmp_path: Path) -> None:
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    (tmp_path / "to-safe").symlink_to(safe)
    DiskCache(tmp_path / "to-safe", 1000, TTL, SEALER)  # accepted: the target is safe
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (tmp_path / "to-open").symlink_to(open_dir)
    with pytest.raises(ConfigError):
        DiskCache(tmp_path / "to-open", 1000, TTL, SEALER)


def test_start_up_removes_leftover_trash_and_stale_temp_files(
    make: Callable[..., DiskCache], directory: Path
) -> None:
    cache = make(maxbytes=3000)
    rec = record("a")
    cache.set(rec)
    trash = directory / ".trash-0123"
    (trash / "ab").mkdir(parents=True)
    (trash / "ab" / "x").write_bytes(b"old")
    stale = entry_path(directory, rec).parent / ".tmp-stale"
    stale.write_bytes(b"half")
    old = os.stat(stale).st_mtime - 2 * STALE_TEMP
    os.utime(stale, (old, old))
    fresh = entry_path(directory, rec).parent / ".tmp-fresh"  # another process mid-write
    fresh.write_bytes(b"half")
    again = make(maxbytes=3000)
    assert not trash.exists()
    assert not stale.exists() and fresh.exists()
    assert again.stats()["entries"] == 1  # temp files are not entries
    # Eviction passes do the same.
    stale.write_bytes(b"half")
    os.utime(stale, (old, old))
    for name in "bcd":  # the third store goes over: one eviction pass
        again.set(record(name, body=b"x" * 1000))
    assert not stale.exists() and fresh.exists()


# -- tampering ---------------------------------------------------------------------------

Tamper = Callable[[Path, dict[str, Record]], None]


def _flip(path: Path, where: Callable[[bytes], int]) -> None:
    data = bytearray(path.read_bytes())
    data[where(bytes(data))] ^= 0x01
    path.write_bytes(bytes(data))


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[4:8], "big")


def flip_header(path: Path, recs: dict[str, Record]) -> None:
    _flip(path, lambda data: 8 + _header_len(data) // 2)


def flip_magic(path: Path, recs: dict[str, Record]) -> None:
    _flip(path, lambda data: 0)


def flip_tag(path: Path, recs: dict[str, Record]) -> None:
    _flip(path, lambda data: 8 + _header_len(data) + 5)


def flip_body(path: Path, recs: dict[str, Record]) -> None:
    _flip(path, lambda data: len(data) - 1)


def truncate_in_tag(path: Path, recs: dict[str, Record]) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: 8 + _header_len(data) + 10])


def truncate_body(path: Path, recs: dict[str, Record]) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def swap_with_sibling(path: Path, recs: dict[str, Record]) -> None:
    other = path.parent / recs["b"].key  # same source
    tmp = path.with_name("swap")
    os.rename(path, tmp)
    os.rename(other, path)
    os.rename(tmp, other)


def move_across_sources(path: Path, recs: dict[str, Record]) -> None:
    other = entry_path(path.parents[3], recs["c"])  # another source
    os.replace(other, path)


def sealed_by_another_secret(path: Path, recs: dict[str, Record]) -> None:
    path.write_bytes(Sealer("other-secret-key-fedcba9876543210").seal(recs["a"]))


def symlink_to_a_valid_envelope(path: Path, recs: dict[str, Record]) -> None:
    planted = path.parents[4] / "planted"
    planted.write_bytes(SEALER.seal(recs["a"]))  # valid for this very key
    path.unlink()
    path.symlink_to(planted)


def same_key_filed_under_another_source(path: Path, recs: dict[str, Record]) -> None:
    path.write_bytes(SEALER.seal(dataclasses.replace(recs["a"], source_path="/elsewhere.png")))


TAMPERING: list[tuple[Tamper, str]] = [
    (flip_header, "bad_tag"),
    (flip_magic, "bad_magic"),
    (flip_tag, "bad_tag"),
    (flip_body, "bad_tag"),
    (truncate_in_tag, "truncated"),
    (truncate_body, "bad_tag"),
    (swap_with_sibling, "bad_tag"),
    (move_across_sources, "bad_tag"),
    (sealed_by_another_secret, "bad_tag"),
    (symlink_to_a_valid_envelope, "symlink"),
    (same_key_filed_under_another_source, "wrong_source"),
]


@pytest.mark.parametrize(("tamper", "detail"), TAMPERING, ids=[t.__name__ for t, _ in TAMPERING])
def test_tampered_entries_are_reported_deleted_and_missed(
    make: Callable[..., DiskCache],
    directory: Path,
    caplog: pytest.LogCaptureFixture,
    tamper: Tamper,
    detail: str,
) -> None:
    cache = make()
    recs = {"a": record("a"), "b": record("b", body=b"other body"), "c": record("c", source="/c.png")}
    for rec in recs.values():
        cache.set(rec)
    target = recs["a"]
    path = entry_path(directory, target)
    tamper(path, recs)

    reported = dict(cache.verify())
    assert reported[target.key] == detail
    assert os.path.lexists(path)  # verify reports, never deletes

    caplog.set_level(logging.WARNING, logger="imageguard.security")
    assert cache.get(target.key, target.source_hash) is None
    assert not os.path.lexists(path)
    events = security_records(caplog)
    assert len(events) == 1
    facts = events[0].imageguard  # type: ignore[attr-defined]
    assert facts["reason"] == "integrity_failure" and facts["tier"] == "l2"
    assert facts["key"] == target.key[:12] and facts["detail"] == detail
    assert cache.stats()["integrity_failures"] == 1
    if tamper is symlink_to_a_valid_envelope:
        assert (directory.parent / "planted").is_file()  # the link went, not its target
    # The slot is usable again: the next fill stores a sound entry.
    cache.set(target)
    assert cache.get(target.key, target.source_hash) == target


def test_verify_reports_sound_and_expired_entries_as_sound(
    make: Callable[..., DiskCache], clock: Clock
) -> None:
    cache = make()
    cache.set(record("a"))
    cache.set(record("b", source="/b.png"))
    clock.now = START + TTL + 1  # both expired: still not tampering
    assert sorted(cache.verify()) == sorted([(key("a"), None), (key("b"), None)])


def test_verify_reports_files_that_are_no_entries(make: Callable[..., DiskCache], directory: Path) -> None:
    cache = make()
    rec = record("a")
    cache.set(rec)
    folder = entry_path(directory, rec).parent
    (folder / "NOT-A-KEY").write_bytes(b"junk")
    (folder / ("cd" * 32)).mkdir()
    assert dict(cache.verify()) == {rec.key: None, "NOT-A-KEY": "bad_name", "cd" * 32: "not_a_file"}


@pytest.mark.parametrize("plant", [os.mkfifo, os.mkdir], ids=["fifo", "directory"])
def test_a_non_file_in_an_entry_place_is_removed_without_blocking(
    make: Callable[..., DiskCache],
    directory: Path,
    caplog: pytest.LogCaptureFixture,
    plant: Callable[[Path], None],
) -> None:
    cache = make()
    rec = record("a")
    cache.set(rec)
    path = entry_path(directory, rec)
    path.unlink()
    plant(path)  # without O_NONBLOCK, opening a FIFO for reading waits for a writer
    caplog.set_level(logging.WARNING, logger="imageguard")
    assert cache.get(rec.key, rec.source_hash) is None
    assert not os.path.lexists(path)
    details = [r.imageguard["detail"] for r in security_records(caplog)]  # type: ignore[attr-defined]
    assert details == ["not_a_file"]
    assert cache.stats()["available"] is True and not operational(caplog, logging.WARNING)
    cache.set(rec)
    assert cache.get(rec.key, rec.source_hash) == rec


# -- TTL, size bound ---------------------------------------------------------------------


def test_ttl_with_injected_clock(make: Callable[..., DiskCache], directory: Path, clock: Clock) -> None:
    cache = make()
    rec = record("a")
    cache.set(rec)
    clock.now = START + TTL
    assert cache.get(rec.key, rec.source_hash) == rec
    clock.now = START + TTL + 0.5
    assert cache.get(rec.key, rec.source_hash) is None
    assert not entry_path(directory, rec).exists()
    assert cache.stats()["entries"] == 0 and cache.stats()["integrity_failures"] == 0


def _sizes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "v1").rglob("*") if p.is_file())


def test_eviction_goes_oldest_first_by_mtime(make: Callable[..., DiskCache], directory: Path) -> None:
    body = b"x" * 1000
    envelope = len(SEALER.seal(record("a", body=body)))
    cache = make(maxbytes=int(envelope * 3.5))
    recs = {name: record(name, source=f"/{name}.png", body=body) for name in "abcd"}
    for name in "abc":
        cache.set(recs[name])
    # b is made the oldest by its mtime alone (its record is not older).
    os.utime(entry_path(directory, recs["b"]), (START - 100, START - 100))
    cache.set(recs["d"])  # 4 envelopes > 3.5: one pass, down to 90 %
    present = {name for name, rec in recs.items() if entry_path(directory, rec).exists()}
    assert present == {"a", "c", "d"}
    assert _sizes(directory) <= envelope * 3.5 * 0.9
    assert cache.stats()["bytes"] == _sizes(directory) and cache.stats()["entries"] == 3
    assert not (directory / "v1" / recs["b"].source_hash[:2] / recs["b"].source_hash).exists()


def test_eviction_drops_every_expired_entry_first(make: Callable[..., DiskCache], directory: Path) -> None:
    body = b"x" * 1000
    envelope = len(SEALER.seal(record("a", body=body)))
    cache = make(maxbytes=int(envelope * 3.5))
    recs = {name: record(name, source=f"/{name}.png", body=body) for name in "abcd"}
    for name in "abc":
        cache.set(recs[name])
    for name in "ab":  # expired: written long ago
        os.utime(entry_path(directory, recs[name]), (START - TTL - 10, START - TTL - 10))
    cache.set(recs["d"])  # oldest-first alone would drop only one
    present = {name for name, rec in recs.items() if entry_path(directory, rec).exists()}
    assert present == {"c", "d"}
    assert cache.stats()["entries"] == 2


def test_eviction_takes_in_what_other_processes_wrote(
    make: Callable[..., DiskCache], directory: Path
) -> None:
    body = b"x" * 1000
    envelope = len(SEALER.seal(record("a", body=body)))
    mine, theirs = make(maxbytes=envelope * 4), make(maxbytes=envelope * 4)
    for i, name in enumerate("abcd"):
        theirs.set(record(name, source=f"/{name}.png", body=body, created=START + i))
    assert mine.stats()["entries"] == 0  # it started before they wrote
    for i, name in enumerate("efgh"):  # its own count stays within the bound
        mine.set(record(name, source=f"/{name}.png", body=body, created=START + 10 + i))
    assert _sizes(directory) == envelope * 8
    mine.set(record("i", source="/i.png", body=body, created=START + 20))  # over: the pass scans all
    assert _sizes(directory) <= envelope * 4 * 0.9
    assert mine.stats()["bytes"] == _sizes(directory) and mine.stats()["entries"] == 3
    left = {
        name for name in "abcdefghi" if entry_path(directory, record(name, source=f"/{name}.png")).exists()
    }
    assert left == {"g", "h", "i"}  # theirs were the oldest


def test_oversize_records_are_skipped_and_zero_stores_nothing(
    make: Callable[..., DiskCache], directory: Path
) -> None:
    small = make(maxbytes=500)
    big = record("big", body=b"x" * 600)
    small.set(big)
    assert small.get(big.key, big.source_hash) is None
    assert list((directory / "v1").iterdir()) == []
    off = make(maxbytes=0)
    rec = record("a")
    off.set(rec)
    assert off.get(rec.key, rec.source_hash) is None
    assert list((directory / "v1").iterdir()) == []
    assert off.stats()["entries"] == 0


# -- purges ------------------------------------------------------------------------------


def test_delete_delete_source_and_clear(make: Callable[..., DiskCache], directory: Path) -> None:
    cache = make()
    variants = [record(f"a{i}", source="/a.png") for i in range(3)]
    others = [record(f"b{i}", source="/b.png") for i in range(2)]
    for rec in variants + others:
        cache.set(rec)
    assert cache.stats()["entries"] == 5

    assert cache.delete(others[0].key) is True
    assert cache.delete(others[0].key) is False
    assert not entry_path(directory, others[0]).exists()
    assert cache.stats()["entries"] == 4

    assert cache.delete_source(source_hash("/a.png")) == 3
    assert cache.delete_source(source_hash("/a.png")) == 0
    assert all(cache.get(rec.key, rec.source_hash) is None for rec in variants)
    assert not entry_path(directory, variants[0]).parent.exists()
    assert cache.get(others[1].key, others[1].source_hash) == others[1]
    assert cache.stats()["entries"] == 1

    cache.clear()
    assert cache.get(others[1].key, others[1].source_hash) is None
    assert mode(directory / "v1") == 0o700 and list((directory / "v1").iterdir()) == []
    assert [p.name for p in directory.iterdir()] == ["v1"]  # no trash left behind
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    cache.set(others[1])  # still usable after a clear
    assert cache.get(others[1].key, others[1].source_hash) == others[1]


# -- degrading ---------------------------------------------------------------------------


def test_a_read_only_directory_degrades_with_one_warning_and_recovers(
    make: Callable[..., DiskCache], directory: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imageguard")
    cache = make(retry_interval=60.0)
    stored = record("stored", source="/s.png")
    cache.set(stored)
    recs = [record(f"r{i}", source=f"/{i}.png") for i in range(4)]
    with read_only(directory / "v1"):
        cache.set(recs[0])  # makedirs of a new source directory fails
        warnings = operational(caplog, logging.WARNING)
        assert len(warnings) == 1
        assert os.fspath(directory) in warnings[0].getMessage()
        assert "Operation not permitted" in warnings[0].getMessage() or "denied" in warnings[0].getMessage()
        assert cache.stats()["available"] is False
        # Within the interval: skipped, silent, no exception, every read a miss.
        clock.now += 30
        cache.set(recs[1])
        assert cache.get(stored.key, stored.source_hash) is None
        assert cache.get(recs[0].key, recs[0].source_hash) is None
        # After the interval it is tried again; still failing: still one warning.
        clock.now += 31
        cache.set(recs[2])
        assert len(operational(caplog, logging.WARNING)) == 1
        assert cache.stats()["available"] is False
    assert not files_named(directory, ".tmp-")
    # The cause is gone: after the next interval, stores and reads work again.
    clock.now += 61
    cache.set(recs[3])
    assert cache.stats()["available"] is True
    assert cache.get(recs[3].key, recs[3].source_hash) == recs[3]
    assert cache.get(stored.key, stored.source_hash) == stored
    assert len(operational(caplog, logging.WARNING)) == 1
    infos = [r for r in operational(caplog, logging.INFO) if "available again" in r.getMessage()]
    assert len(infos) == 1


def test_a_failed_write_removes_its_temp_file(
    make: Callable[..., DiskCache], directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, the way a full
    # disk fails them with ENOSPC: after mkstemp, in the middle of the body.
    # (Python ignores SIGXFSZ, so the error is an OSError, not a signal.)
    cache = make()
    rec = record("big", body=os.urandom(256 * 1024))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        cache.set(rec)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not files_named(directory, ".tmp-")
    assert not entry_path(directory, rec).exists()
    assert cache.stats()["available"] is False
    warnings = operational(caplog, logging.WARNING)
    assert len(warnings) == 1 and "File too large" in warnings[0].getMessage()


def test_a_failed_purge_keeps_every_read_a_miss_until_a_clear_succeeds(
    make: Callable[..., DiskCache], directory: Path, clock: Clock
) -> None:
    cache = make(retry_interval=60.0)
    rec = record("a")
    cache.set(rec)
    with read_only(directory):  # neither the unlink nor clear()'s rename can happen
        assert cache.delete(rec.key) is False  # the entry stays on disk
        clock.now += 61
        assert cache.get(rec.key, rec.source_hash) is None  # never served after its purge
    assert entry_path(directory, rec).exists()
    clock.now += 61
    assert cache.get(rec.key, rec.source_hash) is None  # the pending clear ran first
    assert not entry_path(directory, rec).exists()
    assert cache.stats()["available"] is True
    cache.set(rec)
    assert cache.get(rec.key, rec.source_hash) == rec


# -- concurrency -------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from imageguard.cache.disk import DiskCache
    from imageguard.cache.envelope import Record, Sealer

    directory, key, fill, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cache = DiskCache(directory, 10**9, 3600.0, Sealer({secret!r}), clock=lambda: {start!r})
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for i in range(count):
        body = fill.encode() * (1000 + 7 * (i % 50))
        cache.set(Record(key, "image/png", '"' + fill + '"', "/same.png", None, {start!r}, body))
    """
).format(secret=SECRET, start=START)


def test_two_processes_writing_one_key_leave_one_valid_entry(
    make: Callable[..., DiskCache], directory: Path
) -> None:
    cache = make()
    the_key = key("contended")
    root = Path(__file__).resolve().parents[1]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, os.fspath(directory), the_key, fill, "300"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env={**os.environ, "PYTHONPATH": os.fspath(root)},
            text=True,
        )
        for fill in "AB"
    ]
    for writer in writers:  # both imported and ready: then released together
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    seen: set[str] = set()
    while any(writer.poll() is None for writer in writers):
        got = cache.get(the_key, source_hash("/same.png"))  # a reader in a third process
        if got is not None:
            assert set(got.body) == {ord(got.etag.strip('"'))}
            seen.add(got.etag)
    for writer in writers:
        assert writer.wait(timeout=30) == 0
    assert cache.stats()["integrity_failures"] == 0  # never half a file
    final = cache.get(the_key, source_hash("/same.png"))
    assert final is not None and final.etag in {'"A"', '"B"'}
    assert set(final.body) == {ord(final.etag.strip('"'))}
    assert dict(cache.verify()) == {the_key: None}
    assert not files_named(directory, ".tmp-")


def test_threads_share_one_instance(make: Callable[..., DiskCache], directory: Path) -> None:
    body = b"t" * 500
    envelope = len(SEALER.seal(record("x", body=body)))
    cache = make(maxbytes=envelope * 20)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(60):
                rec = record(f"{n}-{i}", source=f"/{n}-{i % 5}.png", body=body)
                cache.set(rec)
                got = cache.get(rec.key, rec.source_hash)
                assert got is None or got == rec
                if i % 20 == 19:
                    cache.delete_source(source_hash(f"/{n}-0.png"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = cache.stats()
    assert stats["integrity_failures"] == 0 and stats["available"] is True
    assert _sizes(directory) <= envelope * (20 + len(threads))  # the bound, give or take the racers
    assert not files_named(directory, ".tmp-")
