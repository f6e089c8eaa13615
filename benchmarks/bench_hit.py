"""L1 hit through ImageGuard vs the bare Flask app returning the same bytes.

Both are called in process as WSGI callables with the same environ, so the
ratio measures only what the middleware adds (or saves: a hit never enters the
app). Run: ``python benchmarks/bench_hit.py``.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response
from PIL import Image

from imageguard import ImageGuard, Settings

SECRET = "benchmark-secret-key-0123456789"
ROUNDS = 7
CALLS = 3000


def _photo() -> bytes:
    image = Image.radial_gradient("L").resize((640, 480)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def _environ(path: str, query: str = "") -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    return None


def _time(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> float:
    """Median seconds per request over ROUNDS rounds of CALLS calls."""
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            body = app(dict(environ), _start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close:
                close()
        samples.append((time.perf_counter() - started) / CALLS)
    return statistics.median(samples)


def run() -> list[dict[str, object]]:
    """Measure; return one row per comparison."""
    source = _photo()
    upstream = Flask("upstream")

    @upstream.route("/static/photo.jpg")
    def photo() -> Response:
        return Response(source, content_type="image/jpeg")

    guard = ImageGuard(upstream, settings=Settings(secret_key=SECRET))
    signed_path, _, signed_query = guard.url("/static/photo.jpg", w=320).partition("?")
    served = b"".join(guard(_environ("/static/photo.jpg"), _start_response))
    b"".join(guard(_environ(signed_path, signed_query), _start_response))

    bare = Flask("bare")

    @bare.route("/static/photo.jpg")
    def bare_photo() -> Response:
        return Response(served, content_type="image/jpeg")

    bare_time = _time(bare.wsgi_app, _environ("/static/photo.jpg"))
    hit_time = _time(guard, _environ("/static/photo.jpg"))
    signed_hit_time = _time(guard, _environ(signed_path, signed_query))
    return [
        {
            "name": "L1 hit vs bare Flask app",
            "baseline_s": bare_time,
            "imageguard_s": hit_time,
            "ratio": hit_time / bare_time,
            "target": "<= 1.2x",
        },
        {
            "name": "L1 hit (signed w=320) vs bare Flask app",
            "baseline_s": bare_time,
            "imageguard_s": signed_hit_time,
            "ratio": signed_hit_time / bare_time,
            "target": "<= 1.2x",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(
            f"{row['name']:<45} bare {row['baseline_s'] * 1e6:8.1f} us   imageguard "
            f"{row['imageguard_s'] * 1e6:8.1f} us   ratio {row['ratio']:.2f}x  (target {row['target']})"
        )
