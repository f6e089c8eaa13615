"""What only the ASGI adapter has to prove: it never blocks the loop, passes other
scopes through, shares fills across tasks, survives cancellation, works with
FastAPI/Starlette upstreams of every kind, and under a real uvicorn."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from imageguard import ImageGuardMiddleware, Settings
from imageguard.asgi import image_url
from imageguard.raster import RasterLimits, sanitize_raster
from tests.servers import free_port, running, uvicorn
from tests.support import SECRET, Upstream, jpeg, png, reopen, starlette_app
from tests.test_server import fetch

pytestmark = pytest.mark.anyio
SETTINGS = Settings(secret_key=SECRET)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # fills are asyncio tasks (documented): uvicorn, hypercorn-asyncio


def photo(width: int, height: int) -> bytes:
    """A noisy photo-like JPEG: slow enough to encode that loop blocking would show."""
    image = Image.merge("RGB", [Image.effect_noise((width, height), 60 + 20 * i) for i in range(3)])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def guarded(upstream: Upstream, **settings: Any) -> Starlette:
    app = starlette_app(upstream)
    app.add_middleware(ImageGuardMiddleware, settings=Settings(secret_key=SECRET, **settings))
    return app


# -- the event loop ------------------------------------------------------------------


async def test_event_loop_never_blocked_while_sanitizing() -> None:
    big = photo(4000, 3000)
    started = time.perf_counter()
    sanitize_raster(big, RasterLimits())
    one_sanitization = time.perf_counter() - started

    upstream = Upstream()
    path = upstream.add("big.jpg", big, "image/jpeg")
    app = guarded(upstream)
    guard = ImageGuardMiddleware.from_app(app)
    worst_lag = 0.0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal worst_lag
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.002)
            worst_lag = max(worst_lag, time.perf_counter() - before - 0.002)

    async with client_for(app) as client:
        beat = asyncio.create_task(heartbeat())
        image = asyncio.create_task(client.get(path))
        while guard._inflight == 0 and not image.done():
            await asyncio.sleep(0.001)
        other = await client.get("/api/data.json")  # answered while Pillow works
        assert other.status_code == 200
        assert guard._inflight == 1, "the JSON answer came while the image was being sanitized"
        response = await image
        stop.set()
        await beat
    assert response.status_code == 200
    assert worst_lag < one_sanitization / 3, (worst_lag, one_sanitization)


# -- scopes and upstream kinds ----------------------------------------------------------


async def test_lifespan_and_bare_asgi_app_pass_through() -> None:
    events: list[str] = []
    body = png(10, 10)

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"image/png"), (b"set-cookie", b"a=b")],
            }
        )
        await send({"type": "http.response.body", "body": body + b"<script>"})

    app = ImageGuardMiddleware(bare, settings=SETTINGS)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        queue.put_nowait({"type": kind})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, queue.get, send)
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    async with client_for(app) as client:
        response = await client.get("/any.png")
    assert response.status_code == 200 and b"<script>" not in response.content
    assert "set-cookie" not in response.headers
    assert reopen(response.content).size == (10, 10)


def test_websocket_passes_through() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws.png", echo)])
    app.add_middleware(ImageGuardMiddleware, settings=SETTINGS)
    with TestClient(app).websocket_connect("/ws.png") as websocket:
        websocket.send_text("hello")
        assert websocket.receive_text() == "hello"


@pytest.fixture
def fastapi_app(tmp_path: Path) -> tuple[FastAPI, dict[str, bool]]:
    folder = tmp_path / "static"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(jpeg(300, 200) + b"<script>alert(1)</script>")
    (folder / "fake.png").write_bytes(b"<html><script>alert(1)</script></html>")
    closed = {"stream": False}
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=folder), name="static")

    @app.get("/file/{name}")
    async def file(name: str) -> FileResponse:
        return FileResponse(folder / name)

    @app.get("/stream/small.png")
    async def small_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            data = png(20, 20)
            for i in range(0, len(data), 10):
                yield data[i : i + 10]

        return StreamingResponse(chunks(), media_type="image/png")

    @app.get("/stream/huge.png")
    async def huge_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield png(20, 20)
                while True:
                    yield b"\0" * 65536
                    await asyncio.sleep(0)
            finally:
                closed["stream"] = True

        return StreamingResponse(chunks(), media_type="image/png")

    @app.get("/api/items")
    async def items() -> dict[str, object]:
        return {"items": [1, 2, 3]}

    app.add_middleware(ImageGuardMiddleware, settings=Settings(secret_key=SECRET, max_bytes="1MiB"))
    return app, closed


async def test_fastapi_static_files_file_response_and_streaming(fastapi_app: tuple[FastAPI, Any]) -> None:
    app, _ = fastapi_app
    guard = ImageGuardMiddleware.from_app(app)
    async with client_for(app) as client:
        for url in ("/static/photo.jpg", "/file/photo.jpg", guard.url("/static/photo.jpg", w=30)):
            response = await client.get(url)
            assert response.status_code == 200, url
            assert b"<script>" not in response.content
            assert response.headers["x-content-type-options"] == "nosniff"
        assert reopen((await client.get(guard.url("/file/photo.jpg", w=30))).content).size == (30, 20)
        small = await client.get("/stream/small.png")
        assert small.status_code == 200 and reopen(small.content).size == (20, 20)
        fake = await client.get("/static/fake.png")
        assert (fake.status_code, fake.headers["x-imageguard-reason"]) == (502, "not_image")
        conditional = await client.get(
            "/static/photo.jpg",
            headers={"Range": "bytes=0-1", "If-Modified-Since": "Wed, 21 Oct 2099 07:28:00 GMT"},
        )
        assert conditional.status_code == 200  # StaticFiles never saw them: no 206, no 304


async def test_streaming_upstream_over_max_bytes_is_502_and_closed(fastapi_app: tuple[FastAPI, Any]) -> None:
    app, closed = fastapi_app
    async with client_for(app) as client:
        response = await client.get("/stream/huge.png")
    assert (response.status_code, response.headers["x-imageguard-reason"]) == (502, "too_large")
    assert response.headers["cache-control"] == "no-store"
    for _ in range(200):  # the generator is finalised (aclose) once the response is dropped
        if closed["stream"]:
            break
        await asyncio.sleep(0.01)
    assert closed["stream"]


async def test_non_image_routes_unchanged(fastapi_app: tuple[FastAPI, Any]) -> None:
    app, _ = fastapi_app
    bare = FastAPI()

    @bare.get("/api/items")
    async def items() -> dict[str, object]:
        return {"items": [1, 2, 3]}

    async with client_for(app) as guarded_client, client_for(bare) as bare_client:
        for url in ("/api/items", "/api/items?x=1;y", "/nowhere"):
            a, b = await bare_client.get(url), await guarded_client.get(url)
            assert (a.status_code, a.content, sorted(a.headers.items())) == (
                b.status_code,
                b.content,
                sorted(b.headers.items()),
            ), url


# -- single-flight, cancellation, shedding --------------------------------------------------


async def test_single_flight_64_concurrent_requests() -> None:
    upstream = Upstream()
    path = upstream.add("cold.jpg", jpeg(400, 300), "image/jpeg")
    upstream.slow["cold.jpg"] = 0.2
    async with client_for(guarded(upstream)) as client:
        responses = await asyncio.gather(*(client.get(path) for _ in range(64)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert upstream.calls_to(path) == 1


async def test_leader_cancellation_does_not_strand_followers() -> None:
    upstream = Upstream()
    path = upstream.add("cold.jpg", jpeg(400, 300), "image/jpeg")
    upstream.slow["cold.jpg"] = 0.3
    app = guarded(upstream)
    async with client_for(app) as client:
        leader = asyncio.create_task(client.get(path))
        await asyncio.sleep(0.05)
        followers = [asyncio.create_task(client.get(path)) for _ in range(5)]
        await asyncio.sleep(0.05)
        leader.cancel()  # the client that started the fill goes away
        results = await asyncio.gather(*followers)
        assert {r.status_code for r in results} == {200}
        assert upstream.calls_to(path) == 1
        again = await client.get(path)  # nothing wedged: a plain hit now
        assert again.status_code == 200 and upstream.calls_to(path) == 1


async def test_leader_failure_answers_every_follower() -> None:
    upstream = Upstream()
    path = upstream.add("fake.png", b"<html>nope</html>", "image/png")
    upstream.slow["fake.png"] = 0.2
    async with client_for(guarded(upstream)) as client:
        responses = await asyncio.gather(*(client.get(path) for _ in range(8)))
        assert [r.headers["x-imageguard-reason"] for r in responses] == ["not_image"] * 8
        upstream.files["fake.png"] = (png(5, 5), "image/png")
        assert (await client.get(path)).status_code == 200  # a failure is never cached


async def test_client_disconnect_mid_fill_caches_nothing_bad() -> None:
    upstream = Upstream()
    path = upstream.add("cold.jpg", jpeg(400, 300) + b"<script>x</script>", "image/jpeg")
    upstream.slow["cold.jpg"] = 0.2
    async with client_for(guarded(upstream)) as client:
        only = asyncio.create_task(client.get(path))
        await asyncio.sleep(0.05)
        only.cancel()
        await asyncio.sleep(0.4)  # the fill finishes on its own
        response = await client.get(path)
    assert response.status_code == 200 and b"<script>" not in response.content
    assert upstream.calls_to(path) == 1  # the completed fill was kept, once


async def test_queue_full_is_503_while_hits_are_served() -> None:
    upstream = Upstream()
    hot = upstream.add("hot.png", png(8, 8), "image/png")
    paths = [upstream.add(f"big{i}.jpg", photo(2000, 1500), "image/jpeg") for i in range(4)]
    async with client_for(guarded(upstream, workers=1, queue=0)) as client:
        assert (await client.get(hot)).status_code == 200
        tasks = [asyncio.create_task(client.get(p)) for p in paths]
        hit = await client.get(hot)
        results = await asyncio.gather(*tasks)
    assert hit.status_code == 200
    statuses = sorted(r.status_code for r in results)
    assert 200 in statuses and 503 in statuses, statuses
    for shed in (r for r in results if r.status_code == 503):
        assert shed.headers["retry-after"] == "1" and shed.headers["cache-control"] == "no-store"
        assert shed.headers["x-imageguard-reason"] == "overloaded"


# -- helpers for templates and FastAPI ------------------------------------------------------------


async def test_image_url_helper_from_request() -> None:
    from starlette.requests import Request

    upstream = Upstream()
    upstream.add("a.jpg", jpeg(200, 100), "image/jpeg")
    app = starlette_app(upstream)

    async def page(request: Request) -> Response:
        return Response(image_url(request, "/static/a.jpg", w=50, fmt="png"), media_type="text/plain")

    app.add_route("/page.html", page)
    app.add_middleware(ImageGuardMiddleware, settings=SETTINGS)
    async with client_for(app) as client:
        url = (await client.get("/page.html")).text
        assert url.startswith("/static/a.jpg?fmt=png&w=50&s=")
        response = await client.get(url)
    assert response.status_code == 200 and reopen(response.content).size == (50, 25)
    assert app.state.imageguard is ImageGuardMiddleware.from_app(app)


def test_from_app_before_any_request() -> None:
    app = FastAPI()
    app.add_middleware(ImageGuardMiddleware, settings=SETTINGS)
    guard = ImageGuardMiddleware.from_app(app)
    assert guard.url("/a.png", w=3).startswith("/a.png?w=3&s=")
    with pytest.raises(LookupError):
        ImageGuardMiddleware.from_app(FastAPI())


# -- a real uvicorn -------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.timeout(120)
def test_real_uvicorn_single_flight_and_hardening() -> None:
    port = free_port()
    with running(uvicorn("tests.apps.uvicorn_app:app", port), port):
        status, headers, body = fetch(port, "/static/polyglot.png")
        assert status == 200 and b"<script>" not in body and "set-cookie" not in headers
        assert fetch(port, "/static/a%2fb.png")[0] == 400
        before = int(fetch(port, "/_calls")[2])
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: fetch(port, "/static/slow.jpg"), range(64)))
        assert {r[0] for r in results} == {200}
        assert len({r[2] for r in results}) == 1
        assert int(fetch(port, "/_calls")[2]) - before == 1
        # [CPDoS] HHO/HMC/HMO against uvicorn: the next normal request still gets the image.
        for name, value in (
            ("X-Oversized-Header", "A" * 20_000),
            ("X-Metachar", "\x07"),
            ("X-HTTP-Method-Override", "DELETE"),
        ):
            attacked = fetch(port, "/static/polyglot.png", {name: value})
            if attacked[0] != 200 and "x-imageguard-reason" in attacked[1]:
                assert attacked[1]["cache-control"] == "no-store"
            assert fetch(port, "/static/polyglot.png")[0] == 200


async def test_hung_upstream_times_out_and_frees_the_key() -> None:
    upstream = Upstream()
    path = upstream.add("slow.png", png(4, 4), "image/png")
    upstream.slow["slow.png"] = 5.0
    app = guarded(upstream)
    guard = ImageGuardMiddleware.from_app(app)
    guard.upstream_timeout = 0.2
    async with client_for(app) as client:
        results = await asyncio.gather(*(client.get(path) for _ in range(3)))
        assert [r.headers["x-imageguard-reason"] for r in results] == ["upstream_timeout"] * 3
        assert all(r.headers["cache-control"] == "no-store" for r in results)
        upstream.slow.clear()
        assert (await client.get(path)).status_code == 200  # the key was not left wedged


@pytest.mark.parametrize("name", ["Host", "If-None-Match"])
async def test_a_repeated_host_or_validator_is_400_not_a_crash(name: str) -> None:
    # ASGI hands repeated headers over as they came; two Hosts (or two
    # If-None-Match) could key one request two ways: refused, never guessed.
    from tests.drivers import assert_rejected, call_asgi

    upstream = Upstream()
    path = upstream.add("a.png", png(8, 8), "image/png")
    result = await call_asgi(guarded(upstream), path, headers=[(name, "a"), (name, "b")])
    assert_rejected(result, 400, "bad_header")
    assert upstream.calls == []
