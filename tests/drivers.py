"""Adapter drivers for the behavioural suites: one request API, one result shape.

``WSGIDriver`` runs a Flask upstream under ``ImageGuard``; ``ASGIDriver`` a
FastAPI upstream under ``ImageGuardMiddleware``. Tests get them through the
``make_client`` fixture (conftest.py), parametrised over ``ADAPTERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from PIL import Image

from imageguard import ImageGuard, ImageGuardMiddleware, Settings
from tests.support import Upstream, reopen, starlette_app


@dataclass
class Result:
    status: int
    headers: Any  # case-insensitive mapping
    body: bytes

    @property
    def reason(self) -> str | None:
        return self.headers.get("X-ImageGuard-Reason")


class Driver:
    """What every adapter driver offers a test: request/get and the guard's url()."""

    guard: Any
    request: Callable[..., Result]  # each driver's own: request(url, *, method, headers, data)

    def get(self, url: str, **kwargs: Any) -> Result:
        return self.request(url, **kwargs)

    def url(self, path: str | None = None, **params: Any) -> str:
        return str(self.guard.url(path, **params))


class WSGIDriver(Driver):
    """Drives ``ImageGuard(flask_app)`` with werkzeug's test client (real WSGI environ,
    including REQUEST_URI, so encoded paths arrive as a server would pass them)."""

    name = "wsgi"

    def __init__(self, upstream: Upstream, settings: Settings) -> None:
        self.upstream = upstream
        self.flask = upstream.app()
        self.guard = ImageGuard(self.flask, settings=settings)

    def request(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        client: str = "127.0.0.1",
    ) -> Result:
        response = self.flask.test_client().open(
            url, method=method, headers=headers or {}, data=data, environ_overrides={"REMOTE_ADDR": client}
        )
        return Result(response.status_code, response.headers, response.get_data())


class ASGIDriver(Driver):
    """Drives a FastAPI app with ``add_middleware(ImageGuardMiddleware)`` by calling it
    with hand-built ASGI scopes on one event loop (a blocking portal), so raw paths
    arrive exactly as written and many threads can share the loop."""

    name = "asgi"

    def __init__(self, upstream: Upstream, settings: Settings) -> None:
        from anyio.from_thread import start_blocking_portal

        self.upstream = upstream
        from fastapi import FastAPI

        self.app = starlette_app(upstream, FastAPI)
        self.app.add_middleware(ImageGuardMiddleware, settings=settings)
        self.guard = ImageGuardMiddleware.from_app(self.app)
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()

    def close(self) -> None:
        self.guard.close()
        self._portal_cm.__exit__(None, None, None)

    def request(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        client: str = "127.0.0.1",
    ) -> Result:
        return self.portal.call(call_asgi, self.app, url, method, headers or {}, data or b"", client)


async def call_asgi(
    app: Any,
    url: str,
    method: str = "GET",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    data: bytes = b"",
    client: str = "127.0.0.1",
) -> Result:
    """One request through an ASGI app, with the scope built the way uvicorn builds it."""
    import anyio
    import httpx

    raw_path, _, query = url.partition("?")
    pairs = headers.items() if isinstance(headers, dict) else headers or []  # a list may repeat a name
    header_list = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    if not any(name == b"host" for name, _ in header_list):
        header_list.insert(0, (b"host", b"testserver"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("utf-8"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": header_list,
        "client": (client, 50000),
        "server": ("testserver", 80),
    }
    sent = False
    done = anyio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]]
    return Result(start["status"], httpx.Headers(decoded), body)


ADAPTERS: dict[str, Any] = {"wsgi": WSGIDriver, "asgi": ASGIDriver}
MakeClient = Callable[..., Any]


def assert_rejected(result: Result, status: int, reason: str | set[str]) -> None:
    assert result.status == status, (result.status, result.body)
    reasons = {reason} if isinstance(reason, str) else reason
    assert result.reason in reasons, result.reason
    assert result.headers["Cache-Control"] == "no-store"
    assert result.headers["X-Content-Type-Options"] == "nosniff"
    assert result.headers["Content-Type"].startswith("text/plain")
    assert "Set-Cookie" not in result.headers


def assert_clean_image(result: Result, fmt: str) -> Image.Image:
    assert result.status == 200, (result.status, result.reason, result.body[:200])
    assert result.headers["Content-Type"] == f"image/{fmt}"
    assert result.headers["X-Content-Type-Options"] == "nosniff"
    assert result.headers["Content-Security-Policy"].endswith("sandbox")
    assert result.headers["Content-Length"] == str(len(result.body))
    assert result.headers["ETag"].startswith('"')
    assert result.headers["Cache-Control"] == "public, max-age=86400"
    assert "Set-Cookie" not in result.headers
    assert "X-Upstream-Secret" not in result.headers
    image = reopen(result.body)
    assert image.format == {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP"}[fmt]
    return image
