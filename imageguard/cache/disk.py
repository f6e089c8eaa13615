"""L2: sealed envelopes in a directory, shared by every process on the machine.

Use it when several worker processes (gunicorn, uvicorn workers) serve the
same images: one process's fill becomes every process's hit, and the cache
survives restarts. Set ``IMAGEGUARD_DISK_CACHE_DIR`` (and
``IMAGEGUARD_DISK_CACHE_BYTES``).

Layout::

    <directory>/v1/<source_hash[:2]>/<source_hash>/<key>

Entries are fanned out by the hash of their source path, so purging every
variant of a source is renaming one directory away (O(variants)). Each file is
one envelope (:mod:`imageguard.cache.envelope`) named by its cache key; temp
files (``.tmp-*``) live beside the file they become, and purged directories are
renamed to ``<directory>/.trash-*`` before they are removed.

What protects the entries (DESIGN §7):

- the directory must belong to this user and be writable by nobody else
  (checked at start-up, :class:`~imageguard.errors.ConfigError` otherwise);
  directories are created 0700, files 0600;
- writes are atomic (temp file, ``fsync``, ``os.replace``): a reader, in this
  process or another, sees the old entry, the new one or none, never half of one;
- every read checks the envelope's HMAC tag against the key the file is
  *named* by, and the file is opened with ``O_NOFOLLOW``: a flipped byte, a
  truncation, two swapped files, a file sealed under another secret or a
  planted symlink is deleted, logged as an ``integrity_failure`` security
  event and answered as a miss, so the image is filled again;
- keys and source hashes must be lowercase hex (at most 128 characters): any
  other name is a miss or a no-op, so nothing can name a path outside the
  directory.

An :class:`OSError` (read-only file system, disk full, ...) never reaches a
request: the tier logs one warning on the ``imageguard`` logger, answers
"miss" and skips stores for ``retry_interval`` seconds, then tries again; the
first write that works logs that it is back. Purges are tried even then, and
one that fails (the entry stays on disk) makes every read a miss until a
clear succeeds, which the tier retries by itself after each interval: a purged
image is never served from this tier.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import logger, security_event
from .envelope import IntegrityError, Record, Sealer

#: The environment variable named by start-up errors.
DIRECTORY_VARIABLE = "IMAGEGUARD_DISK_CACHE_DIR"
#: Version of the on-disk layout: a new layout gets a new subdirectory.
LAYOUT = "v1"
#: Names the tier accepts for keys and source hashes. Lowercase hex only, so a
#: name can never be ``..``, contain a separator or a glob pattern; bounded so
#: that a file name never exceeds ``NAME_MAX`` (255).
_NAME = re.compile(r"[0-9a-f]{2,128}")
#: Mode of every directory the tier creates.
DIR_MODE = 0o700
#: Mode bits that let someone else plant or swap entries: group- and other-write.
_UNSAFE_BITS = 0o022
#: An eviction pass brings the total down to this fraction of ``maxbytes``, so
#: that it does not run again on the very next store.
EVICT_TO = 0.9
#: Seconds after which a temp file is taken as left by a crashed writer.
STALE_TEMP = 3600.0
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
#: Attempts at creating a temp file when a purge removes its directory meanwhile.
_CREATE_ATTEMPTS = 3
# Opening a planted FIFO must not block the request: O_NONBLOCK (no effect on
# regular files); the file type is checked with fstat before reading.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _valid(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _refuse(directory: str, accepted: str) -> ConfigError:
    return ConfigError(DIRECTORY_VARIABLE, directory, accepted)


def _check_safe(path: str, shown: str, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(shown, f"a directory ({path} is not one)")
    if st.st_uid != os.geteuid():
        raise _refuse(shown, f"a directory owned by uid {os.geteuid()} ({path} is owned by uid {st.st_uid})")
    if st.st_mode & _UNSAFE_BITS:
        raise _refuse(
            shown,
            f"a directory that group and others cannot write "
            f"({path} has mode {stat.S_IMODE(st.st_mode):04o}; use 0700)",
        )


class DiskCache:
    """The disk tier: a :class:`~imageguard.cache.RecordTier` over one directory.

    Several processes may share the directory (they must share the secret, or
    each other's entries fail their check and are refilled). Thread-safe.

    Start-up checks: *directory* is created (with its parents) with mode 0700
    when it does not exist. It is then checked **after resolving symlinks**
    (:func:`os.stat`): a symlink to a safe directory is accepted, and it is the
    target that must be a directory, owned by :func:`os.geteuid`, with no
    group- or other-write bit. The ``v1`` subdirectory, when it exists, must
    pass the same checks and must not be a symlink itself. Leftovers of crashed
    processes (``.trash-*`` directories, temp files older than
    :data:`STALE_TEMP`) are removed, and one scan sets the byte counter.

    Size: the tier keeps an approximate count of the bytes it holds (envelopes
    on disk). A store that takes it over *maxbytes* runs an eviction pass in
    the storing thread (one thread at a time; the others skip it): expired
    files go first, then the oldest (by modification time, which is set to the
    record's creation time) until the total is at most 90 % of *maxbytes*. The
    pass counts every file, so it also takes in what other processes wrote.

    :param directory: the cache directory (``IMAGEGUARD_DISK_CACHE_DIR``).
    :param maxbytes: the bound on the envelopes' total size
        (``IMAGEGUARD_DISK_CACHE_BYTES``); an envelope larger than it is never
        stored, and 0 turns the tier off (nothing stored, every read a miss).
    :param ttl: seconds an entry lives (``IMAGEGUARD_CACHE_TTL``), counted from
        :attr:`Record.created <imageguard.cache.envelope.Record.created>`.
    :param sealer: seals and checks the envelopes.
    :param clock: wall clock in seconds (expiry and the retry interval),
        injectable for tests; it must tell the time :attr:`Record.created` does.
    :param retry_interval: seconds the tier is skipped after an I/O error.
    :raises ~imageguard.errors.ConfigError: the directory cannot be created, is
        not a directory, belongs to another user or is writable by others.

    .. versionadded:: 0.1
    """

    name = "l2"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        maxbytes: int,
        ttl: float,
        sealer: Sealer,
        *,
        clock: Callable[[], float] = time.time,
        retry_interval: float = 60.0,
    ) -> None:
        #: The cache directory, as given.
        self.directory = Path(directory)
        self.maxbytes = maxbytes
        self.ttl = ttl
        self._sealer = sealer
        self._clock = clock
        self._retry_interval = retry_interval
        self._root = self.directory / LAYOUT
        self._root_str = os.fspath(self._root)
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.integrity_failures = 0
        self._entries = 0
        self._bytes = 0
        # Degraded state: skip the tier until _retry_at. A purge that could not
        # be applied leaves entries that must not be served again: then every
        # read misses until a clear() succeeds.
        self._down = False
        self._retry_at = 0.0
        self._pending_clear = False
        self._prepare()
        self._sweep_leftovers()
        files = self._scan()
        self._entries, self._bytes = len(files), sum(size for _, size, _ in files)

    # -- start-up -----------------------------------------------------------------

    def _prepare(self) -> None:
        shown = os.fspath(self.directory)
        try:
            if not os.path.lexists(shown):
                _make_dirs(shown)
                os.chmod(shown, DIR_MODE)  # mkdir's mode is filtered by the umask
            _check_safe(shown, shown, os.stat(shown))
            root = os.fspath(self._root)
            try:
                st = os.lstat(root)
            except FileNotFoundError:
                os.mkdir(root, DIR_MODE)
                os.chmod(root, DIR_MODE)
                st = os.lstat(root)
            _check_safe(root, shown, st)  # lstat: a symlinked v1 is "not a directory"
        except ConfigError:
            raise
        except OSError as exc:
            raise _refuse(shown, f"a directory this process can create and use ({exc})") from exc

    def _sweep_leftovers(self) -> None:
        try:
            with os.scandir(self.directory) as listing:
                trash = [e.path for e in listing if e.name.startswith(_TRASH_PREFIX)]
        except OSError:
            return
        for path in trash:  # purges that a crash interrupted: unreachable already
            shutil.rmtree(path, ignore_errors=True)

    # -- paths and walking ----------------------------------------------------------

    def _source_dir(self, source_hash: str) -> Path:
        return self._root / source_hash[:2] / source_hash

    def _walk(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every file in an entry's place, sorted: ``(source directory name, entry)``.

        Symlinked directories are not entered; temp files (``.``-names) are
        yielded too, the callers tell them apart.
        """
        for fan in _listing(os.fspath(self._root)):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for source in _listing(fan.path):
                if not source.is_dir(follow_symlinks=False):
                    continue
                for item in _listing(source.path):
                    yield source.name, item

    def _scan(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every entry file; stale temp files are removed on the way.

        A temp file's mtime is the file system's clock (and, for a moment before
        its rename, the record's creation time: removing it then only drops that
        one store).
        """
        stale_before = time.time() - STALE_TEMP
        files: list[tuple[float, int, str]] = []
        for _, item in self._walk():
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if item.name.startswith(_TEMP_PREFIX):
                if st.st_mtime < stale_before:
                    self._remove_temp(item.path)
            elif not stat.S_ISDIR(st.st_mode):  # a planted directory is verify's and get's business
                files.append((st.st_mtime, st.st_size, item.path))
        return files

    # -- availability ---------------------------------------------------------------

    def _usable(self) -> bool:
        """Whether to touch the disk now (and, after an outage, retry a pending clear)."""
        with self._lock:
            if self._down and self._clock() < self._retry_at:
                return False
            pending = self._pending_clear
        return self._clear_now() if pending else True

    def _failed(self, exc: OSError, action: str, *, purge: bool = False) -> None:
        with self._lock:
            first = not self._down
            self._down = True
            self._retry_at = self._clock() + self._retry_interval
            if purge:
                self._pending_clear = True
        if first:
            logger.warning(
                "disk cache (L2) %s is unavailable: %s failed: %s; skipping it for %gs, then retrying",
                self.directory,
                action,
                exc,
                self._retry_interval,
            )
        else:
            logger.debug("disk cache (L2) %s still unavailable: %s failed: %s", self.directory, action, exc)

    def _wrote(self) -> None:
        """A write succeeded: the tier is back if it was down."""
        with self._lock:
            was_down = self._down
            self._down = False
        if was_down:
            logger.info("disk cache (L2) %s is available again", self.directory)

    def _forget(self, entries: int, size: int) -> None:
        with self._lock:
            self._entries = max(0, self._entries - entries)
            self._bytes = max(0, self._bytes - size)

    # -- RecordTier -------------------------------------------------------------------

    def get(self, key: str, source_hash: str) -> Record | None:
        """The verified record stored under *key*, or ``None``.

        ``None`` for a missing, expired or tampered entry, an invalid name, and
        while the tier is down. Expired and tampered files are deleted.
        """
        record = self._read(key, source_hash)
        with self._lock:
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
        return record

    def _read(self, key: str, source_hash: str) -> Record | None:
        if self.maxbytes <= 0 or not (_valid(key) and _valid(source_hash)) or not self._usable():
            return None
        # Plain string joins: this runs on every L2 look-up (pathlib costs more than the syscall).
        path = os.path.join(self._root_str, source_hash[:2], source_hash, key)
        try:
            fd = os.open(path, _READ_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: we never write one
                self._tampered(path, key, "symlink", 0)
            else:
                self._failed(exc, "read")
            return None
        try:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode)  # not a FIFO, a directory, a device: never ours
            if regular and st.st_size > self.maxbytes:
                return None  # never ours (maybe a sharer's larger bound): not worth reading
            data = _read_up_to(fd, st.st_size + 1) if regular else b""  # files are replaced, never grown
        except OSError as exc:
            self._failed(exc, "read")
            return None
        finally:
            os.close(fd)
        if not regular:
            self._tampered(path, key, "not_a_file", 0)
            return None
        try:
            record = self._sealer.open(key, data)
            if record.source_hash != source_hash:
                raise IntegrityError("wrong_source")  # sound, but filed under another source
        except IntegrityError as exc:
            self._tampered(path, key, exc.detail, len(data))
            return None
        if record.created + self.ttl < self._clock():
            self._unlink(path, len(data))
            return None
        return record

    def _tampered(self, path: str, key: str, detail: str, size: int) -> None:
        self._unlink(path, size)
        with self._lock:
            self.integrity_failures += 1
        security_event(
            "integrity_failure",
            "a disk cache entry failed its integrity check",
            tier="l2",
            key=key[:12],
            detail=detail,
        )

    def _unlink(self, path: str, size: int, *, purge: bool = False) -> bool:
        try:
            os.unlink(path)  # a symlink itself, never its target
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)  # planted: a directory never takes the tier down
        except OSError as exc:
            self._failed(exc, "delete", purge=purge)
            return False
        self._forget(1, size)
        return True

    def set(self, record: Record) -> None:
        """Store *record* atomically under ``record.key``.

        Skipped when the envelope is larger than ``maxbytes``, the key is not
        a valid name, or the tier is down; an I/O error takes the tier down
        (one warning) and removes the temp file.
        """
        if self.maxbytes <= 0 or not _valid(record.key) or not self._usable():
            return
        data = self._sealer.seal(record)
        if len(data) > self.maxbytes:
            return  # can never fit: served from L1 and the origin
        directory = self._source_dir(record.source_hash)
        final = os.fspath(directory / record.key)
        temp: str | None = None
        try:
            fd, temp = self._create_temp(directory)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                # mtime = creation time: eviction goes oldest-first and spots
                # expired files by it without reading them.
                os.utime(file.fileno(), (record.created, record.created))
                os.fsync(file.fileno())
            try:
                replaced = os.lstat(final).st_size
                added = 0
            except FileNotFoundError:
                replaced, added = 0, 1
            os.replace(temp, final)
            temp = None
        except FileNotFoundError:
            # A purge renamed the directory away under this write: the purge wins.
            self._remove_temp(temp)
            return
        except OSError as exc:
            self._remove_temp(temp)
            self._failed(exc, "write")
            return
        self._wrote()
        with self._lock:
            self._entries += added
            self._bytes += len(data) - replaced
            over = self._bytes > self.maxbytes
        if over:
            self._evict()

    def _create_temp(self, directory: Path) -> tuple[int, str]:
        for attempt in range(_CREATE_ATTEMPTS):
            _make_dirs(os.fspath(directory))
            try:
                return tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX)  # mode 0600
            except FileNotFoundError:
                # An eviction pass or a purge removed the directory in between.
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _remove_temp(temp: str | None) -> None:
        if temp is not None:
            with contextlib.suppress(OSError):  # else left for the next eviction pass
                os.unlink(temp)

    def _evict(self) -> None:
        if not self._evicting.acquire(blocking=False):
            return  # another thread is on it
        try:
            self._evict_pass()
        except OSError as exc:
            self._failed(exc, "eviction")
        finally:
            self._evicting.release()

    def _evict_pass(self) -> None:
        now = self._clock()
        files = sorted(self._scan())
        sources = {os.path.dirname(path) for _, _, path in files}
        target = self.maxbytes * EVICT_TO
        total = sum(size for _, size, _ in files)
        kept = len(files)
        for mtime, size, path in files:
            if mtime + self.ttl >= now and total <= target:
                break  # sorted by age: nothing older is left, and it fits
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            kept -= 1
        for source in sources:
            with contextlib.suppress(OSError):
                os.rmdir(source)  # only succeeds when the pass emptied it
        with self._lock:
            self._entries, self._bytes = kept, total

    def delete(self, key: str) -> bool:
        """Remove *key* under whichever source it is filed; whether it was there.

        Tried even while the tier is down: a purge that fails leaves every read
        a miss until a later :meth:`clear` succeeds.
        """
        if not _valid(key):
            return False
        pattern = os.path.join(glob.escape(os.fspath(self._root)), "*", "*", key)
        found = False
        for path in glob.glob(pattern):
            source = os.path.dirname(path)
            if os.path.islink(source) or os.path.islink(os.path.dirname(source)):
                continue  # not a directory the tier made
            try:
                size = os.lstat(path).st_size
            except OSError:
                size = 0
            if self._unlink(path, size, purge=True):
                found = True
                self._wrote()
                with contextlib.suppress(OSError):
                    os.rmdir(source)  # the last variant: leave no empty directory behind
        return found

    def delete_source(self, source_hash: str) -> int:
        """Remove every variant of one source: one directory rename; how many were removed."""
        if not _valid(source_hash):
            return 0
        trash = self._trash_path()
        try:
            os.rename(self._source_dir(source_hash), trash)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        except OSError as exc:
            self._failed(exc, "purge", purge=True)
            return 0
        self._wrote()
        if os.path.islink(trash):  # a planted link, not a directory the tier made
            with contextlib.suppress(OSError):
                os.unlink(trash)
            return 0
        entries = size = 0
        for item in _listing(trash):
            if item.name.startswith(_TEMP_PREFIX):
                continue
            entries += 1
            with contextlib.suppress(OSError):
                size += item.stat(follow_symlinks=False).st_size
        shutil.rmtree(trash, ignore_errors=True)  # unreachable already; a crash leaves it for start-up
        self._forget(entries, size)
        return entries

    def clear(self) -> None:
        """Remove every entry: ``v1`` is renamed away, recreated empty, then the old one removed.

        A concurrent reader sees the old entry or none.
        """
        self._clear_now()

    def _clear_now(self) -> bool:
        trash = self._trash_path()
        moved = True
        try:
            try:
                os.rename(self._root, trash)
            except FileNotFoundError:
                moved = False
            try:
                os.mkdir(self._root, DIR_MODE)
                os.chmod(self._root, DIR_MODE)
            except FileExistsError:
                pass  # a concurrent store made it (0700) first
        except OSError as exc:
            self._failed(exc, "clear", purge=True)
            return False
        with self._lock:
            self._pending_clear = False
            self._entries = self._bytes = 0
        self._wrote()
        if moved:
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def _trash_path(self) -> Path:
        return self.directory / f"{_TRASH_PREFIX}{secrets.token_hex(8)}"

    def stats(self) -> dict[str, Any]:
        """Counters: ``entries`` and ``bytes`` (approximate: this process's count,
        reset by each eviction pass), ``maxbytes``, ``hits``, ``misses``,
        ``integrity_failures``, ``available`` and ``directory``."""
        with self._lock:
            return {
                "entries": self._entries,
                "bytes": self._bytes,
                "maxbytes": self.maxbytes,
                "hits": self.hits,
                "misses": self.misses,
                "integrity_failures": self.integrity_failures,
                "available": not self._down,
                "directory": os.fspath(self.directory),
            }

    def verify(self) -> Iterator[tuple[str, str | None]]:
        """Check every entry file, in sorted order; nothing is deleted.

        Yields ``(key, None)`` for a sound entry and ``(key, detail)`` for a
        tampered one: an :class:`~imageguard.cache.envelope.IntegrityError`
        detail (``bad_tag``, ``truncated``, ...), ``symlink``, ``not_a_file``,
        ``bad_name`` (a file name that is no key), ``wrong_source`` (sound but
        filed under another source) or ``unreadable``. An expired entry is not
        tampering: it is reported sound (reads drop it).
        """
        for source_hash, item in self._walk():
            name = item.name
            if name.startswith(_TEMP_PREFIX):
                continue
            if not _valid(name):
                yield name, "bad_name"
                continue
            try:
                if item.is_symlink():
                    yield name, "symlink"
                    continue
                if not item.is_file(follow_symlinks=False):
                    yield name, "not_a_file"
                    continue
                fd = os.open(item.path, _READ_FLAGS)
                with os.fdopen(fd, "rb") as file:
                    data = file.read()
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                yield name, "symlink" if exc.errno == errno.ELOOP else "unreadable"
                continue
            try:
                record = self._sealer.open(name, data)
            except IntegrityError as exc:
                yield name, exc.detail
                continue
            yield name, None if record.source_hash == source_hash else "wrong_source"

    def close(self) -> None:
        """Nothing to release: the tier holds no open file between calls."""


def _make_dirs(path: str) -> None:
    """:func:`os.makedirs` with ``exist_ok``, but every level it creates is 0700.

    (Since Python 3.7, ``os.makedirs`` gives the levels above the leaf the
    default mode, 0755 under the usual umask.)
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass  # a file in the way fails the next step with ENOTDIR
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not parent or parent == path:
            raise
        _make_dirs(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    while limit > 0:
        chunk = os.read(fd, min(limit, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _listing(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as listing:
            return sorted(listing, key=lambda item: item.name)
    except OSError:  # gone (purged meanwhile) or not a directory
        return []
