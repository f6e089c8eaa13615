"""What a request imageguard does not guard costs: a JSON route through each adapter vs the bare app.

WSGI: a Flask app's ``/api/data`` called in process as a WSGI callable, bare and
wrapped in ``ImageGuard``. ASGI: a Starlette app's ``/api/data`` called in process
(a scope, a ``receive`` and a ``send`` that keeps nothing), bare and with
``ImageGuardMiddleware`` added. The path is not an image, so imageguard's work is
the look at the path and query that decides so. Calls alternate in short blocks
and each ratio is the median of the per-block ratios. Target: at most 1.05x.
Run: ``python benchmarks/bench_passthrough.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# Run as a script (python benchmarks/bench_x.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_hit import _environ
from imageguard import ImageGuard, ImageGuardMiddleware, Settings

SECRET = "benchmark-secret-key-0123456789"
TARGET = 1.05  # pass-through may cost at most this many times the bare app
BLOCKS = 21
CALLS = {"wsgi": 1000, "asgi": 2000}
PAYLOAD = {"items": [1, 2, 3], "ok": True}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    assert status.startswith("200"), status


def _wsgi_caller(app: Callable[..., Iterable[bytes]]) -> Callable[[], None]:
    environ = _environ("/api/data")

    def call() -> None:
        body = app(dict(environ), _start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close:
            close()

    return call


def _flask() -> Flask:
    app = Flask("passthrough")

    @app.route("/api/data")
    def data() -> ResponseReturnValue:
        return jsonify(PAYLOAD)

    return app


async def _data(request: Request) -> Response:
    return JSONResponse(PAYLOAD)


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/data",
        "raw_path": b"/api/data",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def _asgi_block(app: Any, loop: asyncio.AbstractEventLoop, calls: int) -> Callable[[], float]:
    """A function that makes *calls* in-process ASGI calls and returns seconds per call."""
    scope = _scope()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    async def many() -> None:
        for _ in range(calls):
            await app(dict(scope), receive, send)

    def block() -> float:
        started = time.perf_counter()
        loop.run_until_complete(many())
        return (time.perf_counter() - started) / calls

    return block


def _paired(baseline: Callable[[], float], candidate: Callable[[], float]) -> tuple[float, float, float]:
    """(median baseline s, median candidate s, median per-block ratio) over alternating blocks."""
    base: list[float] = []
    cand: list[float] = []
    baseline(), candidate()  # warm-up: imports, routing caches, the middleware stack
    for _ in range(BLOCKS):
        base.append(baseline())
        cand.append(candidate())
    ratio = statistics.median(c / b for c, b in zip(cand, base, strict=True))
    return statistics.median(base), statistics.median(cand), ratio


def _wsgi_block(app: Callable[..., Iterable[bytes]], calls: int) -> Callable[[], float]:
    call = _wsgi_caller(app)

    def block() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - started) / calls

    return block


def _row(name: str, measured: tuple[float, float, float]) -> dict[str, object]:
    base, mine, ratio = measured
    return {
        "name": name,
        "baseline_s": base,
        "imageguard_s": mine,
        "ratio": ratio,
        "target": f"<= {TARGET:g}x",
        "passed": ratio <= TARGET,
    }


def run() -> list[dict[str, object]]:
    """Measure; one row per adapter (``ratio`` is imageguard / the bare app)."""
    settings = Settings(secret_key=SECRET)
    flask_app = _flask()
    bare_wsgi = flask_app.wsgi_app
    guarded_wsgi = ImageGuard(flask_app.wsgi_app, settings=settings)
    wsgi = _paired(_wsgi_block(bare_wsgi, CALLS["wsgi"]), _wsgi_block(guarded_wsgi, CALLS["wsgi"]))

    bare_asgi = Starlette(routes=[Route("/api/data", _data)])
    guarded_asgi = Starlette(routes=[Route("/api/data", _data)])
    guarded_asgi.add_middleware(ImageGuardMiddleware, settings=settings)
    loop = asyncio.new_event_loop()
    try:
        asgi = _paired(
            _asgi_block(bare_asgi, loop, CALLS["asgi"]), _asgi_block(guarded_asgi, loop, CALLS["asgi"])
        )
    finally:
        loop.close()
    return [
        _row("WSGI pass-through (JSON route) vs bare Flask app", wsgi),
        _row("ASGI pass-through (JSON route) vs bare Starlette app", asgi),
    ]


if __name__ == "__main__":
    for row in run():
        base, mine = float(row["baseline_s"]), float(row["imageguard_s"])  # type: ignore[arg-type]
        print(
            f"{row['name']}: bare {base * 1e6:.2f} us, imageguard {mine * 1e6:.2f} us, "
            f"ratio {float(row['ratio']):.3f}x (target {row['target']})"  # type: ignore[arg-type]
        )
