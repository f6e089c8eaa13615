"""Load test: the FastAPI example under uvicorn and the Flask example under gunicorn.

    python benchmarks/load.py [--seconds 60] [--connections 64] [--server uvicorn|gunicorn|both]
                              [--warmup 5] [--json out.json]

Each server is started on a free port on 127.0.0.1 (nothing else is ever
contacted), warmed up, then driven for ``--seconds`` with ``--connections``
concurrent keep-alive connections, each sending its next request as soon as
the previous answer is in (a closed loop). The requests are a fixed mix:

- ``hot``: a few URLs requested over and over (signed thumbnails and two
  unsigned originals): L1 hits;
- ``conditional``: the same with the ``If-None-Match`` of the answer: 304;
- ``resize``: 32 signed resizes of the example images, each a miss once, then hits;
- ``cold``: a signed resize never asked before (a new ``w``/``q``/``fmt``
  combination each time): every one is a fill (upstream call + re-encode);
- ``pass``: the app's own non-image page (``/thumbnails`` or ``/``), passed through;
- attacks: ``bad_signature`` (tampered ``s``, or ``w`` changed under a valid
  ``s``), ``unsigned`` (a transform without ``s``), ``traversal`` (dot segments,
  encoded dots and slashes, backslashes, a non-image path outside the folder),
  ``unknown_param`` (unknown, duplicate and non-canonical parameters) and
  ``forged_headers`` (``X-Forwarded-For``, ``Forwarded``, a foreign ``Host``,
  ``X-Original-URL``, cookies; a repeated ``Host``), each with the status and
  ``X-ImageGuard-Reason`` it must get. A forged-header request that is served
  must carry the same ``ETag`` as the clean request: the headers changed nothing.

The servers run with ``IMAGEGUARD_MISS_RATE=off``: the load test is one client
on one address, and the default budget (120 fills a minute) would otherwise
answer most cold requests 429. L1 is bounded at ``--l1-bytes`` (2 MiB by
default, small enough that the cold requests fill it and eviction runs).

Reported per server: requests/s, p50/p99 latency overall and per kind, counts
by status and by ``X-ImageGuard-Reason``, the servers' RSS (``VmRSS`` from
``/proc``; gunicorn's master and workers summed) at start, after the warm-up and
at the end, and the L1 bytes against their bound. The examples have no stats
endpoint, so the server processes run the unchanged example apps wrapped in
an outer layer (:func:`fastapi_app`, :func:`flask_app` below) that answers one
path, ``/__loadtest__/stats``, with ``guard.stats()`` and the worker's pid; every
other request goes to the example app as it is. It is sampled twice a second on
a fresh connection (so that gunicorn's workers take turns); an L1 that went
above its bound between two samples would be missed.

The checks print as PASS/FAIL lines; the exit status is 1 if any failed.

The client is an asyncio HTTP/1.1 client over raw sockets (uvloop when
installed): a few microseconds of Python per request, where httpx costs tens.
It still shares the machine's cores with the server, so its own CPU use is
printed: a client near 100% of a core is the bottleneck, not the server.
Latency includes the client's own queueing. Everything is bounded in time: a
hard timeout ends the run, and the servers (each in its own process group) are
always terminated, then killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo root importable

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SECRET = "loadtest-secret-key-0123456789abcdef"
STATS_PATH = "/__loadtest__/stats"
IMAGES = ("landscape.jpg", "logo.png", "spinner.gif", "hills.webp")
#: Share of each kind of request in the mix (percent).
MIX = {
    "hot": 45,
    "conditional": 5,
    "resize": 15,
    "cold": 8,
    "pass": 5,
    "bad_signature": 5,
    "unsigned": 4,
    "traversal": 5,
    "unknown_param": 4,
    "forged_headers": 4,
}
#: Kinds whose request may start a fill, so load shedding (503) is a correct answer.
FILLING = frozenset({"hot", "conditional", "resize", "cold", "forged_headers"})
SHED_REASONS = frozenset({"overloaded", "fill_timeout"})
#: Every status the test may see at all; anything else is unexpected whatever the kind.
KNOWN_STATUSES = frozenset({200, 304, 400, 403, 404, 429, 502, 503})
REQUEST_TIMEOUT = 30.0  # seconds one request may take before it counts as a client error
SAMPLE_EVERY = 0.5  # seconds between stats and RSS samples
RSS_GROWTH_LIMIT = 0.20  # RSS may grow at most this much from the warm-up's end to the end
STARTUP_TIMEOUT = 30.0  # seconds a server has to answer its first request


# -- server side: the example apps, with a stats path in front -------------------------------------


def _stats_body(guard: Any) -> bytes:
    return json.dumps({"pid": os.getpid(), **guard.stats()}, default=str).encode()


def fastapi_app() -> Any:
    """``examples/fastapi_app.py``'s app as it is, behind one extra path (``uvicorn --factory``)."""
    from examples.fastapi_app import app
    from imageguard import ImageGuardMiddleware

    guard = ImageGuardMiddleware.from_app(app)

    async def observed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STATS_PATH:
            body = _stats_body(guard)
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return observed


def flask_app() -> WSGIApplication:
    """``examples/flask_app.py``'s ``create_app()`` as it is, behind one extra path (gunicorn)."""
    from examples.flask_app import create_app

    app = create_app()
    guard = app.extensions["imageguard"]

    def observed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == STATS_PATH:
            body = _stats_body(guard)
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return app(environ, start_response)

    return observed


# -- the servers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    prefix: str  # where the example serves its images
    pass_path: str  # a page of the app that is not an image
    argv: Callable[[int, argparse.Namespace], list[str]]
    processes: Callable[[argparse.Namespace], int]  # how many there are once it is up


SERVERS = {
    "uvicorn": ServerSpec(
        "uvicorn",
        "FastAPI example (examples/fastapi_app.py) under uvicorn",
        "/static/",
        "/thumbnails",
        lambda port, args: [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "benchmarks.load:fastapi_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(args.uvicorn_workers),
        ],
        lambda args: 1 if args.uvicorn_workers == 1 else 1 + args.uvicorn_workers,  # + the supervisor
    ),
    "gunicorn": ServerSpec(
        "gunicorn",
        "Flask example (examples/flask_app.py create_app) under gunicorn, gthread workers",
        "/static/images/",
        "/",
        lambda port, args: [
            sys.executable,
            "-m",
            "gunicorn",
            "--worker-class",
            "gthread",
            "--workers",
            str(args.gunicorn_workers),
            "--threads",
            str(args.gunicorn_threads),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "benchmarks.load:flask_app()",
        ],
        lambda args: 1 + args.gunicorn_workers,  # the master and its workers
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def _rss_bytes(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    with suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Server:
    spec: ServerSpec
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        """The server's processes: uvicorn's one, or gunicorn's master and its workers."""
        return [self.process.pid, *_children(self.process.pid)]

    def rss(self) -> int:
        return sum(_rss_bytes(pid) for pid in self.pids())

    def cpu(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def log_tail(self, lines: int = 20) -> str:
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def server_environ(args: argparse.Namespace) -> dict[str, str]:
    """The servers' environment: this one, less any IMAGEGUARD_* setting, plus the test's."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGUARD_")}
    environ.update(
        IMAGEGUARD_SECRET_KEY=SECRET,
        IMAGEGUARD_MISS_RATE="off",
        IMAGEGUARD_CACHE_BYTES=args.l1_bytes,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return environ


@contextmanager
def running(spec: ServerSpec, args: argparse.Namespace, workdir: Path) -> Iterator[Server]:
    """Start *spec* on a free loopback port; always terminate (then kill) its process group."""
    port = _free_port()
    log = workdir / f"{spec.name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            spec.argv(port, args),
            cwd=ROOT,
            env=server_environ(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: gunicorn's workers go with it
        )
    server = Server(spec, port, process, log)
    try:
        _wait_ready(server, spec.processes(args))
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    with suppress(ProcessLookupError):  # workers that outlived their master
        os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(server: Server, processes: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    request = f"GET {STATS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.spec.name} exited at start-up:\n{server.log_tail()}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(request)
            answered = sock.recv(64).startswith(b"HTTP/1.1 200")
            if answered and len(server.pids()) >= processes:  # every worker is up
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"{server.spec.name} did not answer within {STARTUP_TIMEOUT:g} s:\n{server.log_tail()}"
    )


# -- the client ------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    reason: str | None  # X-ImageGuard-Reason
    etag: str | None
    size: int
    close: bool
    image: bool  # Content-Type image/*
    sandboxed: bool  # imageguard's Content-Security-Policy (sandbox) is on it


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, Content-Length or chunked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        answer = self._parse()
        if answer is not None:
            self.waiter.set_result(answer)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, raw: bytes) -> Answer:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(REQUEST_TIMEOUT, self._timed_out, self.waiter)
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _timed_out(self, waiter: asyncio.Future[Answer]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError("no answer in time"))
        self.close()

    def _parse(self) -> Answer | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if status in (204, 304) or 100 <= status < 200:
            size, consumed = 0, start
        elif b"content-length" in headers:
            size = int(headers[b"content-length"])
            consumed = start + size
            if len(self.buffer) < consumed:
                return None
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunked = self._chunked(start)
            if chunked is None:
                return None
            size, consumed = chunked
        else:
            raise ConnectionError("an answer without Content-Length or chunked encoding")
        del self.buffer[:consumed]
        reason = headers.get(b"x-imageguard-reason")
        etag = headers.get(b"etag")
        return Answer(
            status,
            reason.decode("latin-1") if reason is not None else None,
            etag.decode("latin-1") if etag is not None else None,
            size,
            headers.get(b"connection", b"").lower() == b"close",
            headers.get(b"content-type", b"").lower().startswith(b"image/"),
            b"sandbox" in headers.get(b"content-security-policy", b""),
        )

    def _chunked(self, position: int) -> tuple[int, int] | None:
        size = 0
        while True:
            line_end = self.buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            length = int(bytes(self.buffer[position:line_end]).split(b";")[0], 16)
            position = line_end + 2
            if length == 0:
                trailer_end = self.buffer.find(b"\r\n", position)
                return None if trailer_end < 0 else (size, trailer_end + 2)
            if len(self.buffer) < position + length + 2:
                return None
            size += length
            position += length + 2


async def _connect(port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, "127.0.0.1", port)
    return protocol


@dataclass(frozen=True)
class Probe:
    """One request of the mix and the answers it may get."""

    kind: str
    target: str
    statuses: frozenset[int]
    reasons: frozenset[str | None] = frozenset({None})
    headers: tuple[tuple[str, str], ...] = ()
    same_etag_as: str | None = None  # served: must carry this target's clean ETag
    host: str | None = "127.0.0.1"  # None: the headers carry the Host(s)

    @cached_property
    def raw(self) -> bytes:
        lines = [f"GET {self.target} HTTP/1.1"]
        if self.host is not None:
            lines.append(f"Host: {self.host}")
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


OK = frozenset({200})
REFUSED_OR_ABSENT = frozenset({400, 404})


class Plan:
    """The mix for one server: fixed probes per kind, plus fresh cold resizes."""

    def __init__(self, spec: ServerSpec) -> None:
        from imageguard import Settings
        from imageguard.core import Core

        self.core = Core(Settings(secret_key=SECRET, miss_rate="off"), listen=False)
        self.spec = spec
        prefix = spec.prefix
        self.cold_count = 0
        self.hot = [
            Probe("hot", self.core.url(f"{prefix}{name}", w=240, fmt="webp"), OK) for name in IMAGES
        ] + [Probe("hot", f"{prefix}logo.png", OK), Probe("hot", f"{prefix}landscape.jpg", OK)]
        self.resize = [
            Probe("resize", self.core.url(f"{prefix}{name}", w=w, fmt=fmt), OK)
            for name in IMAGES
            for w in (64, 128, 320, 480)
            for fmt in (None, "webp")
        ]
        clean = self.hot[0].target
        self.clean_etags: dict[str, str] = {}
        self.probes: dict[str, list[Probe]] = {
            "hot": self.hot,
            "resize": self.resize,
            "pass": [Probe("pass", spec.pass_path, OK)],
            "bad_signature": [
                Probe("bad_signature", _tamper(clean), frozenset({403}), frozenset({"bad_signature"})),
                Probe(
                    "bad_signature",
                    clean.replace("w=240", "w=241"),
                    frozenset({403}),
                    frozenset({"bad_signature"}),
                ),
                Probe(
                    "bad_signature",
                    clean.split("&s=")[0] + "&s=short",
                    frozenset({403}),
                    frozenset({"bad_signature"}),
                ),
            ],
            "unsigned": [
                Probe(
                    "unsigned",
                    f"{prefix}landscape.jpg?w=500",
                    frozenset({403}),
                    frozenset({"missing_signature"}),
                ),
                Probe(
                    "unsigned",
                    f"{prefix}logo.png?w=10&h=10&fit=cover",
                    frozenset({403}),
                    frozenset({"missing_signature"}),
                ),
            ],
            "traversal": [
                Probe(
                    "traversal", f"{prefix}../../../etc/passwd.png", frozenset({400}), frozenset({"bad_path"})
                ),
                Probe(
                    "traversal",
                    f"{prefix}%2e%2e/%2e%2e/etc/passwd.jpg",
                    frozenset({400}),
                    frozenset({"bad_path"}),
                ),
                Probe(
                    "traversal",
                    f"{prefix}..%2f..%2fetc%2fpasswd.jpg",
                    frozenset({400}),
                    frozenset({"bad_path"}),
                ),
                Probe(
                    "traversal", f"{prefix}..%5c..%5cwin.ini.png", frozenset({400}), frozenset({"bad_path"})
                ),
                Probe("traversal", f"{prefix}logo.png%00.jpg", frozenset({400}), frozenset({"bad_path"})),
                # Not an image: imageguard passes it on and the app's static files refuse it.
                Probe("traversal", f"{prefix}../../../etc/passwd", frozenset({404})),
                # An image path with something after the extension that the app's static
                # files strip: it must be refused, or at least not reach the file.
                *(
                    Probe(
                        "traversal",
                        f"{prefix}logo.png{tail}",
                        REFUSED_OR_ABSENT,
                        frozenset({"bad_path", None}),
                    )
                    for tail in ("/", "/.", "%2f.")
                ),
            ],
            "unknown_param": [
                Probe(
                    "unknown_param", f"{prefix}logo.png?foo=1", frozenset({400}), frozenset({"unknown_param"})
                ),
                Probe(
                    "unknown_param",
                    f"{prefix}logo.png?w=10&w=20",
                    frozenset({400}),
                    frozenset({"duplicate_param"}),
                ),
                Probe("unknown_param", f"{clean}&callback=x", frozenset({400}), frozenset({"unknown_param"})),
                Probe("unknown_param", f"{prefix}logo.png?w;x=1", frozenset({400}), frozenset({"bad_query"})),
            ],
        }

    def learn(self, target: str, etag: str) -> None:
        """Record the clean ETag of a hot target: conditional and forged probes are built from it."""
        self.clean_etags[target] = etag
        conditional = self.probes.setdefault("conditional", [])
        conditional.append(Probe("conditional", target, frozenset({304}), headers=(("If-None-Match", etag),)))
        forged = self.probes.setdefault("forged_headers", [])
        for headers in (
            (("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=198.51.100.9;host=evil.example")),
            (("X-Original-URL", "/admin/secret.png"), ("X-Rewrite-URL", "/etc/passwd.png")),
            (("Cookie", "session=attacker"), ("Authorization", "Bearer attacker")),
            (("Accept-Encoding", "gzip, br"), ("X-Forwarded-Host", "evil.example")),
        ):
            forged.append(Probe("forged_headers", target, OK, headers=headers, same_etag_as=target))
        forged.append(Probe("forged_headers", target, OK, host="evil.example", same_etag_as=target))
        # A repeated Host: imageguard refuses it under ASGI; gunicorn refuses it before the app.
        forged.append(
            Probe(
                "forged_headers",
                target,
                frozenset({400}),
                frozenset({"bad_header" if self.spec.name == "uvicorn" else None}),
                headers=(("Host", "127.0.0.1"), ("Host", "evil.example")),
                host=None,
            )
        )

    def cold(self) -> Probe:
        """A signed resize no earlier request asked for: image x fmt x w x q, 668k combinations."""
        n = self.cold_count
        self.cold_count += 1
        name = IMAGES[n % len(IMAGES)]
        n //= len(IMAGES)
        fmt = ("jpeg", "webp", "png")[n % 3]
        w = 32 + (n // 3) % 928
        q = 41 + (n // (3 * 928)) % 60
        return Probe("cold", self.core.url(f"{self.spec.prefix}{name}", w=w, q=q, fmt=fmt), OK)

    def pick(self, rng: random.Random) -> Probe:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "cold":
            return self.cold()
        choices = self.probes.get(kind) or self.hot
        return rng.choice(choices)


KINDS = list(MIX)
WEIGHTS = [MIX[k] for k in KINDS]


def _tamper(url: str) -> str:
    """The same URL with the signature's last characters changed (same length)."""
    head, _, signature = url.rpartition("s=")
    return f"{head}s={signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    reasons: Counter[tuple[int, str]] = field(default_factory=Counter)
    unexpected: Counter[tuple[str, str, int, str | None]] = field(default_factory=Counter)
    unguarded: Counter[str] = field(default_factory=Counter)  # images served without the guard's headers
    errors: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0

    def add(self, probe: Probe, answer: Answer, elapsed: float, clean_etag: str | None) -> None:
        self.latencies[probe.kind].append(elapsed)
        self.statuses[answer.status] += 1
        self.by_kind[probe.kind][answer.status] += 1
        self.bytes_in += answer.size
        if answer.reason is not None:
            self.reasons[(answer.status, answer.reason)] += 1
        if answer.status == 200 and answer.image and not answer.sandboxed:
            self.unguarded[probe.target] += 1
        expected = answer.status in probe.statuses and answer.reason in probe.reasons
        if probe.kind in FILLING and answer.status == 503 and answer.reason in SHED_REASONS:
            expected = True
        if expected and probe.same_etag_as is not None and answer.status == 200:
            expected = answer.etag == clean_etag  # a forged header must not change what is served
        if not expected or answer.status not in KNOWN_STATUSES:
            self.unexpected[(probe.kind, probe.target, answer.status, answer.reason)] += 1


async def _drive(
    plan: Plan, port: int, connections: int, seconds: float, tally: Tally | None, seed: int
) -> None:
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        connection: Connection | None = None
        while time.monotonic() < deadline:
            probe = plan.pick(rng)
            try:
                if connection is None or connection.closed:
                    connection = await _connect(port)
                started = time.perf_counter()
                answer = await connection.request(probe.raw)
            except (OSError, TimeoutError, ValueError) as exc:
                if tally is not None:
                    tally.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                if connection is not None:
                    connection.close()
                connection = None
                continue
            elapsed = time.perf_counter() - started
            if tally is not None:
                clean = plan.clean_etags.get(probe.same_etag_as) if probe.same_etag_as else None
                tally.add(probe, answer, elapsed, clean)
            if answer.close:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))


async def _get(port: int, target: str) -> tuple[Answer, bytes]:
    """One request on a fresh connection, with its body (pre-flight and stats)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    protocol = Connection()
    protocol.buffer += data
    answer = protocol._parse()
    if answer is None:
        raise ConnectionError(f"incomplete answer to {target}: {head[:200]!r}")
    return answer, body


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    l1: dict[int, list[tuple[int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # pid: (bytes, max)
    errors: int = 0


async def _sample_stats(server: Server, samples: Samples) -> None:
    try:
        _, body = await _get(server.port, STATS_PATH)
        stats = json.loads(body)
        samples.l1[int(stats["pid"])].append((int(stats["l1"]["bytes"]), int(stats["l1"]["maxbytes"])))
    except (OSError, ValueError, KeyError, TimeoutError, asyncio.TimeoutError):
        samples.errors += 1


async def _sampler(server: Server, samples: Samples, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.rss.append(server.rss())
        await _sample_stats(server, samples)
        await asyncio.sleep(SAMPLE_EVERY)


def _run_loop(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    uvloop.install()  # pragma: no cover - Python 3.10
    return asyncio.run(coroutine)


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def load_server(spec: ServerSpec, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start one server, warm it up, measure, check; the results as a JSON-able dict."""
    plan = Plan(spec)
    tally = Tally()
    samples = Samples()
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine shares its cores
    with running(spec, args, workdir) as server:
        processes = len(server.pids())
        rss_start = server.rss()

        async def session() -> dict[str, float]:
            for probe in plan.hot:  # pre-flight: the clean ETags (and the first fills)
                answer, _ = await _get(server.port, probe.target)
                if answer.status != 200 or answer.etag is None:
                    raise RuntimeError(f"pre-flight {probe.target}: {answer}")
                plan.learn(probe.target, answer.etag)
            await _drive(plan, server.port, args.connections, args.warmup, None, seed=1)
            marks = {
                "rss_warm": float(server.rss()),
                "server_cpu": server.cpu(),
                "client_cpu": time.process_time(),
            }
            started = time.monotonic()
            await asyncio.gather(
                _drive(plan, server.port, args.connections, args.seconds, tally, seed=2),
                _sampler(server, samples, args.seconds),
            )
            marks["elapsed"] = time.monotonic() - started
            marks["server_cpu"] = server.cpu() - marks["server_cpu"]
            marks["client_cpu"] = time.process_time() - marks["client_cpu"]
            for _ in range(10):  # the final L1 sizes, from as many workers as answer
                await _sample_stats(server, samples)
            return marks

        marks = _run_loop(session())
        marks["load_before"] = load_before
        rss_end = server.rss()
        if server.process.poll() is not None:
            raise RuntimeError(f"{spec.name} died during the test:\n{server.log_tail()}")
    return _report(spec, args, plan, tally, samples, marks, processes, rss_start, rss_end)


def _report(
    spec: ServerSpec,
    args: argparse.Namespace,
    plan: Plan,
    tally: Tally,
    samples: Samples,
    marks: dict[str, float],
    processes: int,
    rss_start: int,
    rss_end: int,
) -> dict[str, Any]:
    elapsed = marks["elapsed"]
    load_before = marks["load_before"]
    every = sorted(x for values in tally.latencies.values() for x in values)
    total = len(every)
    kinds = {}
    for kind in KINDS:
        values = sorted(tally.latencies.get(kind, []))
        kinds[kind] = {
            "count": len(values),
            "p50_ms": _percentile(values, 0.50) * 1e3,
            "p99_ms": _percentile(values, 0.99) * 1e3,
            "statuses": {str(k): v for k, v in sorted(tally.by_kind[kind].items())},
        }
    rss_warm = int(marks["rss_warm"])
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    l1_max = max((b for values in samples.l1.values() for b, _ in values), default=None)
    l1_bound = max((m for values in samples.l1.values() for _, m in values), default=None)
    server_errors = sum(
        n for status, n in tally.statuses.items() if status >= 500 and status not in (502, 503)
    )
    checks = [
        ("zero 500s", server_errors == 0, f"{server_errors} answers 5xx other than 502/503"),
        (
            "no unexpected statuses",
            not tally.unexpected,
            f"{sum(tally.unexpected.values())} answers outside their kind's expected status and reason",
        ),
        (
            "every image answer carries the guard's headers (none served around it)",
            not tally.unguarded,
            f"{sum(tally.unguarded.values())} image answers without imageguard's CSP"
            + (f", e.g. {', '.join(list(tally.unguarded)[:3])}" if tally.unguarded else ""),
        ),
        (
            "no connection errors or time-outs",
            not tally.errors,
            f"{sum(tally.errors.values())} failed requests",
        ),
        (
            f"RSS growth from the warm-up's end to the end < {RSS_GROWTH_LIMIT:.0%}",
            growth < RSS_GROWTH_LIMIT,
            f"{rss_warm / 2**20:.1f} MiB -> {rss_end / 2**20:.1f} MiB ({growth:+.1%})",
        ),
    ]
    if l1_max is not None and l1_bound is not None:
        count = sum(len(v) for v in samples.l1.values())
        checks.append(
            (
                "L1 never above its bound",
                l1_max <= l1_bound,
                f"max {l1_max} of {l1_bound} bytes in {count} samples from {len(samples.l1)} process(es)",
            )
        )
    return {
        "server": spec.name,
        "description": spec.description,
        "processes": processes,
        "connections": args.connections,
        "seconds": elapsed,
        "warmup_seconds": args.warmup,
        "environment": {
            "IMAGEGUARD_MISS_RATE": "off",
            "IMAGEGUARD_CACHE_BYTES": args.l1_bytes,
        },
        "load_average_before": load_before,
        "requests": total,
        "throughput_rps": total / elapsed,
        "p50_ms": _percentile(every, 0.50) * 1e3,
        "p99_ms": _percentile(every, 0.99) * 1e3,
        "bytes_received": tally.bytes_in,
        "kinds": kinds,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "reasons": {f"{s} {r}": n for (s, r), n in sorted(tally.reasons.items())},
        "unexpected": [
            {"kind": k, "target": t, "status": s, "reason": r, "count": n}
            for (k, t, s, r), n in tally.unexpected.most_common(20)
        ],
        "unguarded_images": dict(tally.unguarded.most_common(20)),
        "errors": dict(tally.errors.most_common(20)),
        "cold_fills_requested": plan.cold_count,
        "client_cpu_share": marks["client_cpu"] / elapsed,
        "server_cpu_cores": marks["server_cpu"] / elapsed,
        "rss_bytes": {
            "start": rss_start,
            "after_warmup": rss_warm,
            "end": rss_end,
            "peak": max([*samples.rss, rss_end]),
            "timeline": samples.rss,  # every SAMPLE_EVERY seconds of the measured run
        },
        "rss_growth": growth,
        "l1": {
            "max_bytes_seen": l1_max,
            "bound_bytes": l1_bound,
            "samples": sum(len(v) for v in samples.l1.values()),
            "processes_sampled": len(samples.l1),
            "failed_samples": samples.errors,
        },
        "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks],
    }


def print_report(result: dict[str, Any]) -> None:
    mib = 2**20
    env = result["environment"]
    print(f"\n== {result['server']}: {result['description']} ({result['processes']} process(es))")
    print(
        f"   IMAGEGUARD_MISS_RATE={env['IMAGEGUARD_MISS_RATE']} (else the test's own cold misses are "
        f"rate limited), IMAGEGUARD_CACHE_BYTES={env['IMAGEGUARD_CACHE_BYTES']}; "
        f"{result['connections']} connections, {result['seconds']:.1f} s measured after a "
        f"{result['warmup_seconds']:g} s warm-up"
    )
    print(
        f"throughput {result['throughput_rps']:,.0f} req/s ({result['requests']:,} answers, "
        f"{result['bytes_received'] / mib:,.0f} MiB); latency p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms"
    )
    print(
        f"CPU: server {result['server_cpu_cores']:.2f} cores, client {result['client_cpu_share']:.0%} "
        f"of one core (of {os.cpu_count()} cores; load average {result['load_average_before']} before)"
    )
    print(f"{'kind':<16}{'count':>9}{'p50 ms':>9}{'p99 ms':>9}  statuses")
    for kind, row in result["kinds"].items():
        statuses = ", ".join(f"{s}: {n:,}" for s, n in row["statuses"].items())
        print(f"{kind:<16}{row['count']:>9,}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}  {statuses}")
    print("by status:  " + ", ".join(f"{s}: {n:,}" for s, n in result["statuses"].items()))
    print(
        "refusals by X-ImageGuard-Reason:  " + ", ".join(f"{r}: {n:,}" for r, n in result["reasons"].items())
    )
    rss = result["rss_bytes"]
    print(
        f"RSS: start {rss['start'] / mib:.1f} MiB, after warm-up {rss['after_warmup'] / mib:.1f} MiB, "
        f"end {rss['end'] / mib:.1f} MiB, peak {rss['peak'] / mib:.1f} MiB"
    )
    timeline = rss["timeline"]
    if len(timeline) >= 4:
        marks = ", ".join(
            f"{q}% {timeline[min(len(timeline) - 1, len(timeline) * q // 100)] / mib:.1f}"
            for q in (25, 50, 75)
        )
        print(f"     during the run (MiB): {marks}")
    l1 = result["l1"]
    if l1["max_bytes_seen"] is not None:
        print(
            f"L1: at most {l1['max_bytes_seen'] / mib:.2f} MiB of its "
            f"{l1['bound_bytes'] / mib:.2f} MiB bound "
            f"({l1['samples']} samples, {l1['processes_sampled']} process(es) answered)"
        )
    else:
        print("L1: not measured (no stats sample answered)")
    for item in result["unexpected"]:
        print(f"  unexpected: {item}")
    for error, count in result["errors"].items():
        print(f"  client error x{count}: {error}")
    for check in result["checks"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per server (60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first (5)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (64)")
    parser.add_argument("--server", choices=("uvicorn", "gunicorn", "both"), default="both")
    parser.add_argument("--l1-bytes", default="2MiB", help="IMAGEGUARD_CACHE_BYTES of the servers (2MiB)")
    parser.add_argument("--uvicorn-workers", type=int, default=1, help="uvicorn --workers (1)")
    parser.add_argument("--gunicorn-workers", type=int, default=2, help="gunicorn --workers (2)")
    parser.add_argument("--gunicorn-threads", type=int, default=8, help="gunicorn --threads (8)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.connections < 1:
        parser.error("--seconds and --connections must be positive, --warmup not negative")
    return args


class HardTimeout(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = ["uvicorn", "gunicorn"] if args.server == "both" else [args.server]
    # Start-up, pre-flight, warm-up, measurement and shut-down of each server, with room to spare.
    budget = int(len(names) * (args.seconds + args.warmup + STARTUP_TIMEOUT + 60))

    def expired(signum: int, frame: object) -> None:
        raise HardTimeout(f"hard timeout of {budget} s reached")

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through running(): the servers are stopped

    signal.signal(signal.SIGALRM, expired)
    signal.signal(signal.SIGTERM, stopped)
    signal.alarm(budget)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="imageguard-load-") as workdir:
            for name in names:
                result = load_server(SERVERS[name], args, Path(workdir))
                print_report(result)
                results.append(result)
    except HardTimeout as exc:
        print(f"FAIL  {exc}: the servers were stopped", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mix_percent": MIX, "servers": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(c["passed"] for r in results for c in r["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
