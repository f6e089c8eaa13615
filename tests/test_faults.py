"""Fault injection under load: Redis killed or frozen, the disk read-only or full, the
upstream raising, hanging or cut short, clients that go away mid-response.

Every load test runs a stream of requests from 16 threads (hot hits, cold misses
of distinct images, each asked for twice so that fills are shared, and signed
resizes) while a real fault is injected and lifted, and checks each answer as it
arrives: a correct image (200, the ETag is the hash of the body, Pillow re-decodes
it, the expected size and colour for that URL, the same bytes every time for one
URL) or an expected refusal (``no-store``, a reason; 503 with ``Retry-After``),
never a 500 or another image's bytes. Afterwards nothing is lost or corrupted:
every L1 entry, every L2 file (``DiskCache.verify()``) and every L3 value
(``RedisCache.verify()``) verifies under the test's secret and holds an image of
its own source, and a final request for every URL the load asked for is correct.

The faults are real: a ``redis-server`` killed with SIGKILL (or frozen with
SIGSTOP) and started again on its port, a directory made immutable with
``chattr`` (``tests.support.read_only``), a 512 KiB tmpfs filled by a file, an
upstream app that raises, hangs or sends half of its body, raw sockets that close
before or during the response of a real gunicorn/uvicorn. The phases of a test
wait for numbers of answers (and a little time); nothing asserts on wall-clock
durations.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask, g, has_request_context
from flask import Response as FlaskResponse
from PIL import Image

import imageguard.wsgi
from imageguard import Settings
from imageguard.cache.disk import DiskCache
from imageguard.cache.envelope import Record, Sealer
from imageguard.cache.redis import RedisCache
from imageguard.core import Core
from tests.drivers import MakeClient, Result
from tests.redis_server import RedisServer, redis_server
from tests.servers import ROOT, free_port, gunicorn, uvicorn, wait_for_port
from tests.support import SECRET, Upstream, gif, read_only

pytestmark = pytest.mark.faults

#: Threads of the load.
THREADS = 16
#: The refusal any answer of a load may be: load shedding (with Retry-After). A
#: ``fill_timeout`` (a fill outlasting the 120 s follower timeout) is a hang: only
#: the hung-upstream test, which shortens that timeout, expects it.
SHEDDING = frozenset({(503, "overloaded")})
IMAGE_CACHE_CONTROL = "public, max-age=86400"

Colour = tuple[int, int, int]
Size = tuple[int, int]


# -- the images of a test and what each URL must look like ----------------------------------------


def colour_of(index: int) -> Colour:
    """A colour of its own for each image index below 65536 (so that a mix-up shows)."""
    return ((index * 97) % 256, (index // 256 * 53 + 32) % 256, (index * 7 + 100) % 256)


def picture(index: int, size: Size, noisy: bool) -> bytes:
    """A PNG of colour_of(index); *noisy*: its lower 60 % is seeded noise (incompressible).

    The noise starts far enough down that pixel (1, 1) keeps the solid colour in
    every resize the gallery asks for.
    """
    width, height = size
    image = Image.new("RGB", size, colour_of(index))
    if noisy:
        top = height * 2 // 5
        noise = random.Random(index).randbytes(width * (height - top) * 3)
        image.paste(Image.frombytes("RGB", (width, height - top), noise), (0, top))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Target:
    """One URL of the load and what its answer must be."""

    url: str
    source: str
    size: Size
    colour: Colour


_NAME = re.compile(r"(hot|cold)([0-9]+)\.png")
#: Index of cold image 0 (hot images are 0..HOT-1).
COLD_BASE = 100
#: Cold images an in-process test may ask for (colours stay distinct below 65536).
COLD_LIMIT = 60000


class Gallery:
    """The images of one test (hot ones, and cold ones made on demand), their signed
    resizes, and the request mix.

    :param prefix: the path the upstream serves images under (``/static/``, ``/img/``).
    :param sign: the guard's ``url(path, **params)``.
    :param size: every image's size; each resize width must give a whole height.
    :param noisy: large, incompressible images (the disk-full test).
    :param folder: for a real server: each image is written there (atomically)
        before the first request for it.
    """

    def __init__(
        self,
        prefix: str,
        sign: Callable[..., str],
        *,
        size: Size = (40, 30),
        widths: Sequence[int] = (8, 16, 20, 24),
        noisy: bool = False,
        hot: int = 4,
        folder: Path | None = None,
    ) -> None:
        width, height = size
        assert all(height * w % width == 0 for w in widths), "a resize would round its height"
        self.prefix = prefix
        self.sign = sign
        self.size = size
        self.widths = tuple(widths)
        self.noisy = noisy
        self.folder = folder
        self._bytes: dict[str, bytes] = {}
        self._resized: dict[tuple[str, int], Target] = {}
        self._lock = threading.Lock()
        self.hot = [self.named(f"hot{i}.png") for i in range(hot)]
        self.resized = [self.resize(t, w) for t in self.hot for w in self.widths]

    @staticmethod
    def index(name: str) -> int | None:
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        number = int(match[2])
        return number if match[1] == "hot" else COLD_BASE + number

    def named(self, name: str) -> Target:
        index = self.index(name)
        assert index is not None and index < COLD_BASE + COLD_LIMIT, name
        if self.folder is not None and not (self.folder / name).exists():
            with self._lock:
                if not (self.folder / name).exists():  # whole, before anybody asks for it
                    temp = self.folder / f".{name}.tmp"
                    temp.write_bytes(picture(index, self.size, self.noisy))
                    os.replace(temp, self.folder / name)
        return Target(self.prefix + name, self.prefix + name, self.size, colour_of(index))

    def cold(self, n: int) -> Target:
        return self.named(f"cold{n}.png")

    def find(self, source: str) -> Target | None:
        """The unresized target of a source path, if it is one of this gallery's."""
        name = source[len(self.prefix) :] if source.startswith(self.prefix) else ""
        index = self.index(name)
        if index is None:
            return None
        return Target(source, source, self.size, colour_of(index))

    def resize(self, target: Target, width: int) -> Target:
        with self._lock:
            made = self._resized.get((target.source, width))
        if made is None:
            height = self.size[1] * width // self.size[0]
            made = Target(self.sign(target.source, w=width), target.source, (width, height), target.colour)
            with self._lock:
                self._resized[(target.source, width)] = made
        return made

    def image(self, name: str) -> bytes | None:
        """The PNG bytes of *name* (made once: the same bytes every time), or None."""
        index = self.index(name)
        if index is None:
            return None
        with self._lock:
            if name not in self._bytes:
                self._bytes[name] = picture(index, self.size, self.noisy)
            return self._bytes[name]

    def sizes(self) -> set[Size]:
        """Every size the load asks for."""
        return {self.size} | {(w, self.size[1] * w // self.size[0]) for w in self.widths}

    def pick(self, i: int) -> Target:
        """The *i*-th request of the mix, in rounds of 8: 4 hot hits, a new cold image
        asked for twice (a fill and a request that shares it), a resize of a hot image,
        a resize of the round's cold image (a new variant)."""
        round_, slot = divmod(i, 8)
        if slot < 4:
            return self.hot[(round_ + slot) % len(self.hot)]
        if slot == 6:
            return self.resized[round_ % len(self.resized)]
        cold = self.cold(round_ % COLD_LIMIT)
        return cold if slot < 6 else self.resize(cold, self.widths[1])


def body_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def image_problem(gallery: Gallery, source: str, body: bytes, size: Size | None = None) -> str | None:
    """Why *body* is not an image of *source* (of *size*, or of any size the load asks for)."""
    wanted = gallery.find(source)
    if wanted is None:
        return f"{source} is not an image of this test"
    try:
        image = Image.open(io.BytesIO(body))
        image.load()
    except Exception as exc:
        return f"{source}: the body does not decode ({exc!r})"
    if image.format != "PNG":
        return f"{source}: {image.format} instead of PNG"
    if size is not None and image.size != size:
        return f"{source}: {image.size} instead of {size}"
    if size is None and image.size not in gallery.sizes():
        return f"{source}: a size the load never asked for: {image.size}"
    pixel = image.convert("RGB").getpixel((1, 1))
    if pixel != wanted.colour:
        return f"{source}: colour {pixel} instead of {wanted.colour} (another image's bytes?)"
    return None


# -- the load ----------------------------------------------------------------------------------


Fetch = Callable[[str], Result]


class Load:
    """*threads* threads issuing ``gallery.pick(i)`` requests until stopped.

    Each worker uses ``fetchers[k % len(fetchers)]`` (instances of a fleet). Each
    answer is checked as it arrives; problems are collected in :attr:`failures`.
    A fault refusal is accepted only from a request that overlapped the fault
    (:meth:`fault` was active when it started or ended, or in between).
    """

    def __init__(self, gallery: Gallery, fetchers: Sequence[Fetch], *, threads: int = THREADS) -> None:
        self.gallery = gallery
        self.fetchers = list(fetchers)
        self.threads = threads
        self.done = 0
        self.outcomes: Counter[tuple[int, str | None]] = Counter()
        self.failures: list[str] = []
        self.requested: dict[str, Target] = {}
        self.etags: dict[str, set[str]] = {}
        self.sources: dict[str, str] = {}  # ETag -> the source it was served for
        self.refused: dict[str, Target] = {}  # URLs that got a fault refusal
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._window = 0  # bumped whenever a fault starts or ends
        self._fault: frozenset[tuple[int, str]] = frozenset()
        self._workers: list[threading.Thread] = []
        self._go = threading.Event()  # cleared: no new request starts (paused)
        self._go.set()
        self._flying: set[int] = set()  # the requests in flight, by number

    # -- running --------------------------------------------------------------------

    def __enter__(self) -> Load:
        for k in range(self.threads):
            fetch = self.fetchers[k % len(self.fetchers)]
            worker = threading.Thread(target=self._work, args=(fetch,), name=f"load-{k}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + 30
        for worker in self._workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        stuck = [w.name for w in self._workers if w.is_alive()]
        if stuck:
            self._fail(f"requests never returned (threads {stuck}): a hang")

    def _work(self, fetch: Fetch) -> None:
        while not self._stop.is_set():
            if not self._go.wait(0.05):
                continue
            number = next(self._counter)
            target = self.gallery.pick(number)
            with self._lock:
                if not self._go.is_set():
                    continue
                self._flying.add(number)
                self.requested.setdefault(target.url, target)
                window, fault = self._window, self._fault
            try:
                result = fetch(target.url)
            except Exception as exc:
                self._fail(f"{target.url}: the request raised {exc!r}")
                continue
            finally:
                with self._lock:
                    self._flying.discard(number)
            with self._lock:
                if self._window != window:
                    fault = fault | self._fault
            self.check(target, result, fault)

    @contextlib.contextmanager
    def paused(self, timeout: float = 30.0) -> Iterator[None]:
        """No request in flight for the duration of the block (for a fault that cannot
        be injected atomically); the load goes on after it."""
        self._go.clear()
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._lock:
                    if not self._flying:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError("requests still in flight: a hang")
                time.sleep(0.005)
            yield
        finally:
            self._go.set()

    def fault(self, *refusals: tuple[int, str]) -> None:
        """From now on the fault is on: answers may also be one of *refusals*."""
        with self._lock:
            self._window += 1
            self._fault = frozenset(refusals)

    def healed(self, timeout: float = 30.0) -> None:
        """The fault is over (the caller lifted it): once the requests in flight now
        have ended (a fill that began under the fault answers whoever joined it,
        even later), requests that start must not be refused for it."""
        with self._lock:
            flying = set(self._flying)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not flying & self._flying:
                    self._window += 1
                    self._fault = frozenset()
                    return
            if time.monotonic() > deadline:
                raise AssertionError("requests under the fault never ended: a hang")
            time.sleep(0.005)

    def until(
        self,
        more: int = 0,
        *,
        seconds: float = 0.0,
        condition: Callable[[], bool] | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Block until *more* further answers arrived, *seconds* passed and *condition* holds."""
        start, began = self.done, time.monotonic()
        deadline = began + timeout
        while True:
            now = time.monotonic()
            if self.done >= start + more and now - began >= seconds and (condition is None or condition()):
                return
            if now > deadline:
                raise AssertionError(
                    f"stalled: {self.done - start}/{more} answers, condition "
                    f"{'unset' if condition is None else condition()}, outcomes {dict(self.outcomes)}, "
                    f"failures {self.failures[:5]}"
                )
            time.sleep(0.02)

    # -- checking --------------------------------------------------------------------

    def _fail(self, problem: str) -> None:
        with self._lock:
            self.done += 1
            if len(self.failures) < 50:
                self.failures.append(problem)

    def check(self, target: Target, result: Result, fault: frozenset[tuple[int, str]] = frozenset()) -> bool:
        """Record *result*; whether it was acceptable (a problem is kept in :attr:`failures`)."""
        problem = (
            self._image_problem(target, result)
            if result.status == 200
            else self._refusal_problem(target, result, fault)
        )
        with self._lock:
            self.done += 1
            self.outcomes[(result.status, result.reason)] += 1
            if problem is not None and len(self.failures) < 50:
                self.failures.append(problem)
        return problem is None

    def _image_problem(self, target: Target, result: Result) -> str | None:
        headers, body = result.headers, result.body
        for name, wanted in (
            ("Content-Type", "image/png"),
            ("Cache-Control", IMAGE_CACHE_CONTROL),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Length", str(len(body))),
            ("ETag", body_etag(body)),
        ):
            if headers.get(name) != wanted:
                return f"{target.url}: {name} {headers.get(name)!r}, wanted {wanted!r}"
        problem = image_problem(self.gallery, target.source, body, target.size)
        if problem is not None:
            return f"{target.url}: {problem}"
        etag = headers["ETag"]
        with self._lock:
            self.etags.setdefault(target.url, set()).add(etag)
            if self.sources.setdefault(etag, target.source) != target.source:
                return f"{target.url}: the bytes served for {self.sources[etag]}"
        return None

    def _refusal_problem(
        self, target: Target, result: Result, fault: frozenset[tuple[int, str]]
    ) -> str | None:
        answer = (result.status, result.reason)
        if answer not in SHEDDING and answer not in fault:
            return f"{target.url}: unexpected {answer} {result.body[:120]!r}"
        if result.headers.get("Cache-Control") != "no-store":
            return f"{target.url}: {answer} without no-store: {result.headers.get('Cache-Control')!r}"
        if result.status == 503 and result.headers.get("Retry-After") != "1":
            return f"{target.url}: 503 without Retry-After"
        if answer in fault:
            with self._lock:
                self.refused.setdefault(target.url, target)
        return None

    def count(self, status: int) -> int:
        return sum(n for (s, _), n in self.outcomes.items() if s == status)

    def assert_clean(self) -> None:
        assert not self.failures, "\n".join(self.failures)
        varying = {url: tags for url, tags in self.etags.items() if len(tags) > 1}
        assert not varying, f"one URL, several bodies: {varying}"

    def check_every_url(self, fetchers: Sequence[Fetch] | None = None) -> None:
        """A final request for every URL the load asked for, on every instance: all correct."""
        targets = list(self.requested.values())
        jobs = [(fetch, t) for fetch in fetchers or self.fetchers for t in targets]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: job[0](job[1].url), jobs))
        for (_, target), result in zip(jobs, results, strict=True):
            assert result.status == 200, (target.url, result.status, result.reason, result.body[:120])
            self.check(target, result)
        self.assert_clean()


# -- what the tiers hold ---------------------------------------------------------------------------


def l2_names(directory: Path) -> set[str]:
    """The names of the entry files under *directory* now (safe while the tier writes and evicts)."""
    return {name for _, _, files in os.walk(directory / "v1") for name in files if not name.startswith(".")}


def l2_records(directory: Path) -> list[Record]:
    """Every entry file under *directory*, opened (checked) with the test's secret."""
    sealer = Sealer(SECRET)
    return [
        sealer.open(file.name, file.read_bytes())
        for file in sorted((directory / "v1").rglob("*"))
        if file.is_file() and not file.name.startswith(".")
    ]


def l3_records(url: str) -> list[Record]:
    sealer = Sealer(SECRET)
    raw = redis.Redis.from_url(url)
    try:
        found = []
        for name in raw.scan_iter(match=b"imageguard:*:e:*"):
            value = raw.get(name)
            if value is not None:
                found.append(sealer.open(name.decode().rsplit(":", 1)[1], value))
        return found
    finally:
        raw.close()


def verify_l2(directory: Path, gallery: Gallery, load: Load | None = None) -> list[Record]:
    """``DiskCache.verify()``: every entry sound; each one an image of its own source."""
    disk = DiskCache(directory, 1 << 30, 3600, Sealer(SECRET))
    report = list(disk.verify())
    assert all(detail is None for _, detail in report), report
    records = l2_records(directory)
    assert len(records) == len(report)
    _check_records("l2", records, gallery, load)
    return records


def verify_l3(url: str, gallery: Gallery, load: Load | None = None) -> list[Record]:
    """``RedisCache.verify()``: every entry sound; each one an image of its own source."""
    shared = RedisCache(url, 3600, Sealer(SECRET))
    try:
        report = list(shared.verify())
        assert shared.available, "Redis was not reachable for the check"
    finally:
        shared.close()
    assert all(detail is None for _, detail in report), report
    records = l3_records(url)
    _check_records("l3", records, gallery, load)
    return records


def verify_l1(guard: Any, gallery: Gallery, load: Load | None = None) -> int:
    """Every entry in a guard's memory: ETag of its body, an image of its own source."""
    cache = guard.core.cache
    with cache._lock:
        entries = list(cache._cache.values())
    records = [entry.record() for entry in entries]
    for entry in entries:
        assert entry.headers[1] == ("Content-Length", str(len(entry.body)))
    _check_records("l1", records, gallery, load)
    return len(entries)


def _check_records(tier: str, records: list[Record], gallery: Gallery, load: Load | None) -> None:
    for record in records:
        assert record.etag == body_etag(record.body), (tier, record.source_path)
        assert record.content_type == "image/png", (tier, record.content_type)
        problem = image_problem(gallery, record.source_path, record.body)
        assert problem is None, (tier, problem)
        if load is not None:  # the very bytes some client was served for this source
            assert load.sources.get(record.etag) == record.source_path, (tier, record.source_path)


def tier(client: Any, name: str) -> Any:
    return next(t for t in client.guard.core.lower if t.name == name)


def disk_warnings(caplog: pytest.LogCaptureFixture, directory: Path) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "imageguard" and r.levelno == logging.WARNING and str(directory) in r.getMessage()
    ]


# -- an upstream that fails on demand -------------------------------------------------------------


class HangEverything(dict[str, float]):
    """``Upstream.slow`` that makes every image answer after *seconds* (cancellable in ASGI)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __contains__(self, name: object) -> bool:
        return True

    def __missing__(self, name: str) -> float:
        return self.seconds


@dataclass
class FaultUpstream(Upstream):
    """:class:`tests.support.Upstream` (Flask or FastAPI), serving a gallery, that can fail.

    :attr:`fault`: ``"raise"`` (the app raises), ``"truncate"`` (the first half of
    the body under the full ``Content-Length``, as when the connection behind the
    app breaks). :attr:`declared` forces a ``Content-Length`` for one name.
    """

    gallery: Gallery | None = None
    fault: str | None = None
    declared: dict[str, int] = field(default_factory=dict)

    def answer(self, name: str, headers: Any) -> tuple[int, bytes, str, dict[str, str]]:
        if self.fault == "raise":
            raise RuntimeError("the upstream failed")
        made = self.gallery.image(name) if self.gallery is not None and name not in self.files else None
        if made is not None:
            status, body, content_type, extra = 200, made, "image/png", {}
        else:
            status, body, content_type, extra = super().answer(name, headers)
        length = self.declared.get(name)
        if self.fault == "truncate" and status == 200:
            length, body = len(body), body[: len(body) // 2]
        if length is not None:
            extra = {**extra, "Content-Length": str(length)}
            if has_request_context():
                g.declared_length = length  # werkzeug recomputes it: put back after the view
        return status, body, content_type, extra

    def app(self) -> Flask:
        app = super().app()

        @app.after_request
        def declared_length(response: FlaskResponse) -> FlaskResponse:
            length = g.pop("declared_length", None)
            if length is not None:
                response.headers["Content-Length"] = str(length)
            return response

        return app


def build(make_client: MakeClient, upstream: FaultUpstream, **settings: Any) -> tuple[Any, Gallery]:
    """A client (``make_client``), and a gallery served by *upstream* and signed by it."""
    client = make_client(upstream, **settings)
    gallery = Gallery("/static/", client.url)
    upstream.gallery = gallery
    return client, gallery


# -- 1. Redis killed (or frozen) and restarted under load ----------------------------------------


def redis_entries(url: str) -> int:
    raw = redis.Redis.from_url(url, socket_timeout=1)
    try:
        return sum(1 for _ in raw.scan_iter(match=b"imageguard:*:e:*"))
    finally:
        raw.close()


@contextlib.contextmanager
def redis_fault(server: RedisServer, kind: str) -> Iterator[None]:
    """Redis SIGKILLed (started again, empty, on its port) or SIGSTOPped (continued) for the block."""
    process = server.process
    assert process is not None
    if kind == "killed":
        process.kill()
        process.wait(5)
        try:
            yield
        finally:
            server.start()
    else:
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["killed", "frozen"])
def test_redis_fault_under_load(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Two instances sharing a Redis (one with a disk tier too) under load; Redis is
    SIGKILLed and started again, empty (or SIGSTOPped, so that calls time out, and
    continued). Every request is served; each breaker opens (one warning) and closes
    (one "is back") when its probe (every 0.3 s here) finds Redis again; new fills
    reach L3 again; every L1/L2/L3 entry verifies."""
    upstream = FaultUpstream()
    caplog.set_level(logging.INFO, "imageguard")
    with redis_server() as server:
        first, gallery = build(
            make_client, upstream, redis_url=server.url, disk_cache_dir=str(tmp_path / "l2")
        )
        second = make_client(upstream, redis_url=server.url)  # another instance: L1 + L3
        shared = [tier(first, "l3"), tier(second, "l3")]
        for l3 in shared:
            l3.breaker.interval = 0.3  # probe a dead Redis often (the default is 5 s)
        with Load(gallery, [first.get, second.get]) as load:
            load.until(150, seconds=0.4)
            assert redis_entries(server.url) > 0  # L3 in use before the fault
            with redis_fault(server, kind):
                load.until(200, seconds=1.0, condition=lambda: all(l3.breaker.is_open for l3 in shared))
            before = redis_entries(server.url)
            # L3 is used again: new fills reach it, and both breakers closed.
            load.until(
                100,
                seconds=0.3,
                condition=lambda: (
                    redis_entries(server.url) > before and not any(l3.breaker.is_open for l3 in shared)
                ),
            )
        load.assert_clean()
        name = f"Redis (L3) at {server.url}"
        messages = [r.getMessage() for r in caplog.records if r.name == "imageguard"]
        # One warning per trip and one "is back" per recovery; both breakers tripped.
        # (Mostly one trip each; a call that began before the outage and succeeds just
        # after another one failed closes the breaker again: then one more trip.)
        trips = [m for m in messages if m.startswith(f"{name} is unavailable")]
        assert len(trips) == len([m for m in messages if m == f"{name} is back"]) >= len(shared), messages
        assert all(l3.breaker.trips >= 1 for l3 in shared)
        verify_l3(server.url, gallery, load)
        verify_l2(tmp_path / "l2", gallery, load)
        for client in (first, second):
            verify_l1(client.guard, gallery, load)
        load.check_every_url()


# -- 2. the disk tier read-only, and full, under load ----------------------------------------------


@pytest.mark.timeout(90)
def test_read_only_disk_under_load(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shared L2 directory made immutable (``read_only``) under load, then writable
    again: entries are still read from it, stores fail (one warning per instance, the
    retries every 0.2 s fail quietly), every request is served; afterwards the tier
    stores again ("available again").

    ``chattr -R`` walks the tree: a directory a store creates during the walk can
    escape it and stay writable, and a tier that then stores there is (rightly) back
    until its next failure, with one more warning. So the load is paused for the
    walks (in and out); it runs for the whole of the fault.
    """
    directory = tmp_path / "l2"
    upstream = FaultUpstream()
    first, gallery = build(make_client, upstream, disk_cache_dir=str(directory))
    second = make_client(upstream, disk_cache_dir=str(directory))  # another process, same disk
    disks = [tier(first, "l2"), tier(second, "l2")]
    for disk in disks:
        disk._retry_interval = 0.2  # try the disk again soon after a failure (the default is 60 s)
    caplog.set_level(logging.INFO, "imageguard")
    with Load(gallery, [first.get, second.get]) as load, contextlib.ExitStack() as fault:
        load.until(150, seconds=0.4)
        stored = [load.requested[url] for url in sorted(load.requested) if "cold" in url][:8]
        with load.paused():
            fault.enter_context(read_only(directory))
        load.until(200, seconds=1.0, condition=lambda: not any(d.stats()["available"] for d in disks))
        # A new instance starts on the read-only directory and reads what was stored.
        third = make_client(upstream, disk_cache_dir=str(directory))
        calls = [upstream.calls_to(target.source) for target in stored]
        for target in stored:
            assert load.check(target, third.get(target.url)), load.failures[-1:]
        assert [upstream.calls_to(target.source) for target in stored] == calls
        assert tier(third, "l2").stats()["hits"] == len(stored)
        before = l2_names(directory)
        with load.paused():
            fault.close()
        load.until(
            100,
            seconds=0.3,
            condition=lambda: all(d.stats()["available"] for d in disks) and l2_names(directory) - before,
        )
    load.assert_clean()
    # One warning per instance for the whole outage, and one "available again".
    warnings = disk_warnings(caplog, directory)
    assert len(warnings) == len(disks), [r.getMessage() for r in warnings]
    assert all("Operation not permitted" in r.getMessage() for r in warnings)
    back = [r for r in caplog.records if r.name == "imageguard" and "available again" in r.getMessage()]
    assert len(back) == len(disks)
    verify_l2(directory, gallery, load)
    for client in (first, second):
        verify_l1(client.guard, gallery, load)
    load.check_every_url()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB file system (tmpfs, mode 0700) mounted on a fresh directory."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed: no size-limited directory for the disk-full test")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a 512 KiB tmpfs here (uid {os.geteuid()}: {done.stderr.strip()}): "
            "the disk-full test needs root (or CAP_SYS_ADMIN) for a size-limited directory"
        )
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill_up(filler: Path, leave: int) -> None:
    """Grow *filler* until the file system is full, then give back *leave* bytes."""
    chunk = b"\xa5" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


class Clock:
    """The wall clock plus an offset that the test moves forward (a tier's retry interval)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.timeout(90)
def test_full_disk_under_load(
    make_client: MakeClient, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 512 KiB tmpfs filled by a file under load: stores fail with ENOSPC, the tier
    goes down with one warning per instance, retries (each retry interval) fail
    quietly while the disk stays full, every request is still served; once the file
    is gone, the next retry stores again ("available again")."""
    directory = small_disk / "cache"
    upstream = FaultUpstream()
    # Each instance evicts at its own count of 128 KiB (each counts only its own writes
    # between passes): together they stay inside the 512 KiB once the filler is gone.
    settings = {"disk_cache_dir": str(directory), "disk_cache_bytes": 128 * 1024}
    first = make_client(upstream, **settings)
    gallery = Gallery("/static/", first.url, size=(160, 120), widths=(80, 96, 120, 128), noisy=True)
    upstream.gallery = gallery
    second = make_client(upstream, **settings)
    disks = [tier(first, "l2"), tier(second, "l2")]
    clock = Clock()  # the retry interval stays 60 s: the test moves the tiers' clock past it
    for disk in disks:
        disk._clock = clock
    smallest = min(len(gallery.image(f"cold{n}.png") or b"") for n in range(8))
    assert smallest > 20 * 1024  # and their resizes are above 8 KiB: none fits in what is left
    caplog.set_level(logging.INFO, "imageguard")
    filler = small_disk / "filler"
    with Load(gallery, [first.get, second.get]) as load:
        load.until(100, seconds=0.4)
        assert l2_names(directory), "nothing reached the disk before the fault"
        # Filled with no write under way: a write that was (its temp file removed when it
        # fails, an eviction pass after it succeeds) could free room for another, and a
        # tier that then stores is (rightly) back until its next failure: one more warning.
        with load.paused():
            fill_up(filler, leave=4096)
            stat = os.statvfs(small_disk)
            assert stat.f_bavail * stat.f_frsize <= 8192, stat  # every image and resize is larger
        load.until(20, condition=lambda: not any(d.stats()["available"] for d in disks))
        for _ in range(3):  # retries while the disk is still full: they fail, quietly
            clock.offset += 61
            load.until(50, seconds=0.3)
        assert not list(directory.rglob(".tmp-*")), "a failed write left its temp file"
        assert not any(d.stats()["available"] for d in disks)
        before = l2_names(directory)
        filler.unlink()
        clock.offset += 61
        load.until(
            16,
            condition=lambda: all(d.stats()["available"] for d in disks) and l2_names(directory) - before,
        )
    load.assert_clean()
    warnings = disk_warnings(caplog, directory)
    assert len(warnings) == len(disks), [r.getMessage() for r in warnings]
    assert all("No space left on device" in r.getMessage() for r in warnings)
    back = [r for r in caplog.records if r.name == "imageguard" and "available again" in r.getMessage()]
    assert len(back) == len(disks)
    verify_l2(directory, gallery, load)
    assert not list(directory.rglob(".tmp-*")), "a failed write left its temp file"
    for client in (first, second):
        verify_l1(client.guard, gallery, load)
    load.check_every_url()


# -- 3. the upstream raising, hanging, cut short ---------------------------------------------------


def check_refused_urls_recover(load: Load, client: Any, upstream: FaultUpstream, directory: Path) -> None:
    """Every URL refused during the fault is served correctly now, then hit: the refusal
    was not cached, the next correct answer was (in L1, and in L2 with the same bytes)."""
    assert load.refused, f"the fault never reached a client: {dict(load.outcomes)}"
    served = set()
    for target in load.refused.values():
        result = client.get(target.url)
        assert load.check(target, result), load.failures[-1:]
        calls = upstream.calls_to(target.source)
        again = client.get(target.url)
        assert load.check(target, again) and again.body == result.body
        assert upstream.calls_to(target.source) == calls, f"{target.url} was not cached"
        served.add(result.headers["ETag"])
    assert served <= {r.etag for r in l2_records(directory)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fault", "refusals"),
    [
        pytest.param("raise", [(502, "upstream_error")], id="raising"),
        pytest.param("truncate", [(502, "truncated_image"), (502, "corrupt_image")], id="cut-mid-image"),
    ],
)
def test_failing_upstream_under_load(
    make_client: MakeClient, tmp_path: Path, fault: str, refusals: list[tuple[int, str]]
) -> None:
    """For a while every upstream call raises (or sends the first half of its body under
    the full Content-Length): hits are still served, misses get 502 with a reason and
    no-store; nothing of it is cached, and each refused URL is filled, served and
    cached correctly once the upstream answers again."""
    directory = tmp_path / "l2"
    upstream = FaultUpstream()
    client, gallery = build(make_client, upstream, disk_cache_dir=str(directory))
    with Load(gallery, [client.get]) as load:
        load.until(100, seconds=0.3)
        load.fault(*refusals)
        upstream.fault = fault
        load.until(200, seconds=0.8)
        upstream.fault = None
        load.healed()
        load.until(100, seconds=0.3)
    load.assert_clean()
    assert load.count(502) > 0 and load.count(500) == 0
    # Nothing from the fault was cached: every tier holds only sound images.
    verify_l2(directory, gallery, load)
    verify_l1(client.guard, gallery, load)
    check_refused_urls_recover(load, client, upstream, directory)
    load.check_every_url()


@pytest.mark.timeout(60)
def test_hung_upstream_under_load(
    make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASGI: ``upstream_timeout`` ends a hung fill (502 ``upstream_timeout`` to all its waiters).

    WSGI cannot interrupt the upstream call: the leader waits for it, and the
    requests that share its fill wait at most the follower timeout (503
    ``fill_timeout`` with Retry-After; ``FOLLOWER_TIMEOUT`` is 120 s, shortened
    here). The hang ends when the test releases the upstream.
    """
    directory = tmp_path / "l2"
    upstream = FaultUpstream()
    client, gallery = build(make_client, upstream, disk_cache_dir=str(directory))
    release = threading.Event()
    if client.name == "asgi":
        client.guard.upstream_timeout = 0.3
        refusals = [(502, "upstream_timeout")]
    else:
        monkeypatch.setattr(imageguard.wsgi, "FOLLOWER_TIMEOUT", 0.3)
        refusals = [(503, "fill_timeout")]
    with Load(gallery, [client.get]) as load:
        load.until(100, seconds=0.3)
        load.fault(*refusals)
        if client.name == "asgi":
            upstream.slow = HangEverything(30.0)  # an async sleep: the timeout cancels it
        else:
            upstream.delay = release  # every fill's thread waits (at most 10 s) for the release
        try:
            # WSGI: the load stalls once every thread leads a hung fill, so wait by time.
            load.until(0, seconds=1.0, condition=lambda: load.count(502) + load.count(503) > 0)
        finally:
            upstream.slow = {}
            release.set()  # (delay stays set: Flask reads the attribute twice)
        load.healed()
        load.until(100, seconds=0.3)
    load.assert_clean()
    verify_l2(directory, gallery, load)
    verify_l1(client.guard, gallery, load)
    check_refused_urls_recover(load, client, upstream, directory)
    load.check_every_url()


def gif_cut_at_frame(frames: int, keep: int) -> tuple[bytes, bytes]:
    """A GIF of *frames* frames, and its first bytes up to the start of frame *keep*."""
    whole = gif(32, 32, frames=frames)
    starts = [i for i in range(len(whole)) if whole[i : i + 3] == b"!\xf9\x04"]  # graphic control blocks
    return whole, whole[: starts[keep]]


@pytest.mark.timeout(30)
def test_body_shorter_than_its_content_length_is_refused(make_client: MakeClient, tmp_path: Path) -> None:
    """An upstream answer whose body ends before its own Content-Length (a file that
    shrank under FileResponse/send_file, a proxied body cut off) is incomplete: 502,
    no-store, nothing cached, however well the bytes that came decode."""
    directory = tmp_path / "l2"
    upstream = FaultUpstream()
    client = make_client(upstream, disk_cache_dir=str(directory))
    whole, cut = gif_cut_at_frame(6, 2)
    path = upstream.add("anim.gif", cut, "image/gif")
    upstream.declared["anim.gif"] = len(whole)  # the app meant to send all of it
    result = client.get(path)
    frames = Image.open(io.BytesIO(result.body)).n_frames if result.status == 200 else None
    assert (result.status, result.reason) == (502, "truncated_image"), (
        result.status,
        f"{frames} frames of 6",
    )
    assert result.headers["Cache-Control"] == "no-store"
    assert client.guard.core.cache.stats()["entries"] == 0
    assert l2_records(directory) == []
    upstream.add("anim.gif", whole, "image/gif")
    del upstream.declared["anim.gif"]
    fixed = client.get(path)
    assert fixed.status == 200 and Image.open(io.BytesIO(fixed.body)).n_frames == 6


# -- 4. clients that go away ------------------------------------------------------------------------


def asgi_scope(url: str) -> dict[str, Any]:
    path, _, query = url.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


@pytest.mark.timeout(60)
def test_asgi_clients_gone_while_the_fill_is_in_flight(tmp_path: Path) -> None:
    """Under load, in the guard's event loop, while two slow fills (an image and a
    resize of it) run: for each, one client's ``send`` raises on the start (a reset),
    one's on the body, one's ``receive`` says ``http.disconnect`` at once and its
    ``send`` drops everything (what uvicorn does), one request task is cancelled, and
    three normal clients share the fill. They get the image; it was filled once and
    its L1 and L2 entries verify; later requests are hits."""
    import asyncio

    from tests.drivers import ASGIDriver, call_asgi

    directory = tmp_path / "l2"
    upstream = FaultUpstream()
    driver = ASGIDriver(upstream, Settings(secret_key=SECRET, miss_rate="off", disk_cache_dir=str(directory)))
    try:
        gallery = Gallery("/static/", driver.url, size=(160, 120), widths=(80, 96, 120, 128), noisy=True)
        upstream.gallery = gallery
        slow = gallery.cold(COLD_LIMIT - 1)  # beyond what the load reaches
        upstream.slow[slow.source.rsplit("/", 1)[1]] = 0.5
        targets = [slow, gallery.resize(slow, 80)]

        async def leave(target: Target, when: str) -> tuple[BaseException | None, list[str]]:
            sent: list[str] = []

            async def receive() -> dict[str, Any]:
                if when == "disconnect":
                    return {"type": "http.disconnect"}
                await asyncio.Event().wait()  # never: the guard does not read a GET's body
                raise AssertionError

            async def send(message: dict[str, Any]) -> None:
                sent.append(message["type"])
                if when == "disconnect":
                    return  # dropped, like uvicorn after a disconnect
                if message["type"] == ("http.response.start" if when == "start" else "http.response.body"):
                    raise ConnectionResetError("the client went away")

            try:
                await driver.app(asgi_scope(target.url), receive, send)
            except Exception as exc:
                return exc, sent
            return None, sent

        async def scenario() -> tuple[list[Any], list[Result]]:
            leaving = [
                asyncio.create_task(leave(t, when))
                for t in targets
                for when in ("start", "body", "disconnect")
            ]
            cancelled = [asyncio.create_task(call_asgi(driver.app, t.url)) for t in targets]
            normal = [asyncio.create_task(call_asgi(driver.app, t.url)) for t in targets for _ in range(3)]
            await asyncio.sleep(0.1)
            assert not any(task.done() for task in (*leaving, *normal)), "the fill was not in flight"
            for task in cancelled:
                task.cancel()
            return list(await asyncio.gather(*leaving)), list(await asyncio.gather(*normal))

        with Load(gallery, [driver.get]) as load:
            load.until(50)
            left, results = driver.portal.call(scenario)
            load.until(50)
        load.assert_clean()
        # A send that raises goes back to the server (its business); a dropped response raises nothing.
        wanted = {
            "start": (ConnectionResetError, ["http.response.start"]),
            "body": (ConnectionResetError, ["http.response.start", "http.response.body"]),
            "disconnect": (type(None), ["http.response.start", "http.response.body"]),
        }
        for (exc, sent), when in zip(left, ["start", "body", "disconnect"] * 2, strict=True):
            assert isinstance(exc, wanted[when][0]) and sent == wanted[when][1], (when, exc, sent)
        for target, result in zip([t for t in targets for _ in range(3)], results, strict=True):
            assert load.check(target, result), load.failures
        assert upstream.calls_to(slow.source) == 2  # one fill per variant, kept despite the leavers
        verify_l1(driver.guard, gallery, load)
        stored = [r for r in verify_l2(directory, gallery, load) if r.source_path == slow.source]
        assert sorted(r.etag for r in stored) == sorted(r.headers["ETag"] for r in results[::3])
        for target in targets:
            assert load.check(target, driver.get(target.url)), load.failures
        assert upstream.calls_to(slow.source) == 2  # hits
        assert not driver.guard._fills
        load.check_every_url()
    finally:
        driver.close()


# -- real servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(kind: str, env: dict[str, str], log: Path) -> Iterator[int]:
    """gunicorn (Flask + ImageGuard) or uvicorn (Starlette + middleware) over tests.apps.scaleout_app.

    Output goes to *log* (a pipe nobody reads could fill and block the server).
    """
    port = free_port()
    argv = (
        gunicorn("tests.apps.scaleout_app:make_wsgi()", port)
        if kind == "gunicorn"
        else uvicorn("tests.apps.scaleout_app:make_asgi", port, factory=True)
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield port
        assert process.poll() is None, f"{kind} died: {log.read_text()[-3000:]}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def http_fetch(port: int) -> Fetch:
    def fetch(target: str) -> Result:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return Result(response.status, httpx.Headers(response.getheaders()), response.read())
        finally:
            connection.close()

    return fetch


def fleet_env(images: Path, **variables: str) -> dict[str, str]:
    return {
        "SCALEOUT_IMAGES": str(images),
        "IMAGEGUARD_SECRET_KEY": SECRET,
        "IMAGEGUARD_MISS_RATE": "off",
        **variables,
    }


def signer() -> Callable[..., str]:
    return Core(Settings(secret_key=SECRET, miss_rate="off")).url


def l3_available(fetch: Fetch) -> bool:
    """Whether a server's guard takes its Redis tier for reachable (``/_stats``)."""
    return bool(json.loads(fetch("/_stats").body)["l3"]["available"])


@pytest.mark.server
@pytest.mark.timeout(120)
def test_redis_killed_under_load_real_servers(tmp_path: Path) -> None:
    """gunicorn (Flask) and uvicorn (Starlette) sharing one Redis and one disk
    directory; Redis SIGKILLed and started again under load. (Their breakers probe
    every 5 s, the default: not configurable by environment.)"""
    images = tmp_path / "images"
    images.mkdir()
    directory = tmp_path / "l2"
    gallery = Gallery("/img/", signer(), folder=images)
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(redis_server())
        env = fleet_env(images, IMAGEGUARD_REDIS_URL=shared.url, IMAGEGUARD_DISK_CACHE_DIR=str(directory))
        a = stack.enter_context(server("gunicorn", env, tmp_path / "a.log"))
        b = stack.enter_context(server("uvicorn", env, tmp_path / "b.log"))
        fetchers = [http_fetch(a), http_fetch(b)]
        with Load(gallery, fetchers) as load:
            load.until(150, seconds=0.5)
            assert redis_entries(shared.url) > 0
            with redis_fault(shared, "killed"):
                load.until(150, seconds=1.0, condition=lambda: not any(l3_available(f) for f in fetchers))
            # Both instances use L3 again (after their breakers' next probe): new fills reach it.
            load.until(
                60,
                condition=lambda: all(l3_available(f) for f in fetchers) and redis_entries(shared.url) > 4,
                timeout=40,
            )
        load.assert_clean()
        verify_l3(shared.url, gallery, load)
        verify_l2(directory, gallery, load)
        load.check_every_url()
    for log in ("a.log", "b.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text, text[-3000:]


def big_picture(index: int) -> bytes:
    """A 1200x900 noisy PNG (about 3 MiB): long to sanitize, long to send."""
    return picture(index, (1200, 900), noisy=True)


def leave_early(port: int, target: str, when: str) -> int:
    """Ask for *target* on a raw socket and close it: ``before`` any answer, or
    ``during`` the body (a few KiB read, then a reset). Bytes read."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        if when == "before":
            time.sleep(0.05)
            return 0
        got = b""
        while b"\r\n\r\n" not in got or len(got) < 16384:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        return len(got)


@pytest.mark.server
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_clients_closing_early_on_a_real_server(tmp_path: Path, kind: str) -> None:
    """Raw sockets that close while a large image is being filled, and while its
    3 MiB body is being sent, beside a normal load; then every answer is correct,
    each large image was filled once, and its L2 entry holds the served bytes."""
    images = tmp_path / "images"
    images.mkdir()
    directory = tmp_path / "l2"
    gallery = Gallery("/img/", signer(), folder=images)
    big = [f"big{n}.png" for n in range(3)]
    for n, name in enumerate(big):
        (images / name).write_bytes(big_picture(900 + n))
    env = fleet_env(images, IMAGEGUARD_DISK_CACHE_DIR=str(directory))
    with server(kind, env, tmp_path / "server.log") as port:
        fetch = http_fetch(port)
        calls = int(fetch("/_calls").body)
        with Load(gallery, [fetch], threads=8) as load:
            load.until(100, seconds=0.3)
            with ThreadPoolExecutor(12) as pool:
                # First, clients that leave while the fill is in flight (the leader among them)...
                gone = list(pool.map(lambda name: leave_early(port, f"/img/{name}", "before"), big))
                # ...then clients that leave halfway through the body, several at once.
                jobs = [f"/img/{name}" for name in big for _ in range(4)]
                gone += list(pool.map(lambda t: leave_early(port, t, "during"), jobs))
            assert all(n < 200_000 for n in gone), gone  # they really left early
            load.until(100, seconds=0.3)
        load.assert_clean()
        for name in big:
            result = fetch(f"/img/{name}")
            assert result.status == 200 and result.headers["ETag"] == body_etag(result.body)
            image = Image.open(io.BytesIO(result.body))
            image.load()
            assert image.size == (1200, 900)
            assert image.convert("RGB").getpixel((1, 1)) == colour_of(900 + big.index(name))
            stored = [r for r in l2_records(directory) if r.source_path == f"/img/{name}"]
            assert [r.body for r in stored] == [result.body]  # L2 and L1 (the hit) agree
        # One upstream call per URL asked for (single flight, then the caches): no fill
        # was lost with a client that left, and none was done twice.
        assert int(fetch("/_calls").body) - calls == len(big) + len(load.requested)
        report = list(DiskCache(directory, 1 << 30, 3600, Sealer(SECRET)).verify())
        assert report and all(detail is None for _, detail in report), report
        load.check_every_url()
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text, text[-3000:]
