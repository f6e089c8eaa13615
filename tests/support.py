"""Test helpers: image builders and a real Flask upstream that records what it sees."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request
from PIL import Image

#: A key long enough for the settings' minimum.
SECRET = "test-secret-key-0123456789abcdef"
OLD_SECRET = "old-secret-key-0123456789abcdef"


def png(width: int = 64, height: int = 48, mode: str = "RGB", colour: Any = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), colour).save(out, "PNG")
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48, **save: Any) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (width, height), (30, 120, 200))
    for x in range(0, width, 4):
        image.putpixel((x, x % height), (255, 255, 0))
    image.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def gif(width: int = 32, height: int = 32, frames: int = 1) -> bytes:
    """A GIF of *frames* frames that really differ (Pillow merges identical ones)."""
    out = io.BytesIO()
    images = [Image.new("L", (width, height), (i % 2) * 255) for i in range(frames)]
    images[0].save(out, "GIF", save_all=frames > 1, append_images=images[1:], duration=50, loop=0)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height but whose data is a few KB (never decode it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@dataclass
class Upstream:
    """A real Flask app that serves in-memory files and records every request it gets."""

    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    delay: threading.Event | None = None
    slow: dict[str, float] = field(default_factory=dict)
    strict: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, body: bytes, content_type: str) -> str:
        self.files[name] = (body, content_type)
        return "/static/" + name

    def calls_to(self, path: str) -> int:
        return sum(1 for call in self.calls if call["path"] == path)

    def record(self, **call: Any) -> None:
        with self.lock:
            self.calls.append(call)

    def answer(self, name: str, headers: Any) -> tuple[int, bytes, str, dict[str, str]]:
        """(status, body, content type, headers) for a file; the same for every framework.

        With :attr:`strict`, it fails like the origins of the CPDoS paper do on
        oversize headers, meta characters and method overrides.
        """
        if self.strict:
            for value in headers.values():
                if len(value) > 4096 or any(ord(ch) < 32 and ch != "\t" for ch in value):
                    return 400, b"bad header", "text/plain", {}
            if any(h in headers for h in ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")):
                return 405, b"method not allowed", "text/plain", {}
        if name not in self.files:
            return 404, b"no such image", "text/plain", {"Set-Cookie": "session=on-a-404; Path=/"}
        body, content_type = self.files[name]
        # Reflect unkeyed inputs the way vulnerable apps do: if any of them
        # reached us, the served bytes would differ.
        reflected = headers.get("X-Forwarded-Host", "") + headers.get("X-Original-URL", "")
        if reflected and content_type.startswith("image/"):
            body = body + reflected.encode()
        extra = {"Set-Cookie": "session=upstream-secret; Path=/", "X-Upstream-Secret": "leak"}
        return 200, body, content_type, {**extra, **self.extra_headers}

    def app(self) -> Flask:
        app = Flask("upstream", static_folder=None)
        app.config["TESTING"] = True

        @app.route("/static/<path:name>")
        def static_file(name: str) -> Response:
            self.record(
                path=request.path,
                query=request.query_string.decode(),
                method=request.method,
                headers=dict(request.headers),
                body=request.get_data(),
                host=request.host,
            )
            if self.delay is not None:
                self.delay.wait(10)
            if name in self.slow:
                time.sleep(self.slow[name])
            status, body, content_type, headers = self.answer(name, request.headers)
            return Response(body, status=status, content_type=content_type, headers=headers)

        @app.route("/_calls")
        def calls() -> Response:
            return Response(str(len(self.calls)), content_type="text/plain")

        @app.route("/raise.png")
        def raise_png() -> Response:
            raise RuntimeError("the app failed")

        @app.route("/page")
        def page() -> Response:
            response = Response("<h1>hello</h1>", content_type="text/html; charset=utf-8")
            response.set_cookie("page", "1")
            return response

        @app.route("/api/data.json", methods=["GET", "POST"])
        def data() -> Response:
            return Response('{"ok": true}', content_type="application/json")

        return app


def starlette_app(upstream: Upstream, app_class: Any = None) -> Any:
    """The same upstream as :meth:`Upstream.app`, as a real Starlette app
    (or a FastAPI one: pass ``app_class=FastAPI``)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import PlainTextResponse
    from starlette.responses import Response as StarletteResponse
    from starlette.routing import Route

    async def static_file(request: StarletteRequest) -> StarletteResponse:
        name = request.path_params["name"]
        upstream.record(
            path=request.url.path,
            query=request.scope["query_string"].decode(),
            method=request.method,
            headers=dict(request.headers),
            body=await request.body(),
            host=request.headers.get("host", ""),
        )
        if upstream.delay is not None:
            await anyio.to_thread.run_sync(upstream.delay.wait, 10)
        if name in upstream.slow:
            await anyio.sleep(upstream.slow[name])
        status, body, content_type, headers = upstream.answer(name, request.headers)
        return StarletteResponse(body, status_code=status, media_type=content_type, headers=headers)

    async def calls(request: StarletteRequest) -> StarletteResponse:
        return PlainTextResponse(str(len(upstream.calls)))

    async def raise_png(request: StarletteRequest) -> StarletteResponse:
        raise RuntimeError("the app failed")

    async def page(request: StarletteRequest) -> StarletteResponse:
        response = StarletteResponse("<h1>hello</h1>", media_type="text/html")
        response.set_cookie("page", "1")
        return response

    async def data(request: StarletteRequest) -> StarletteResponse:
        return StarletteResponse('{"ok": true}', media_type="application/json")

    return (app_class or Starlette)(
        routes=[
            Route("/static/{name:path}", static_file),
            Route("/_calls", calls),
            Route("/raise.png", raise_png),
            Route("/page", page),
            Route("/api/data.json", data, methods=["GET", "POST"]),
        ]
    )


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make *folder* and everything in it refuse changes for real, even to root.

    As root, permission bits do not stop writes, so the tree is made immutable
    (``chattr -R +i``): ``mkdir``, ``open(O_CREAT)``, ``unlink`` and ``rename``
    in it fail with EPERM, as on a read-only mount. Not root: mode 0500 on
    every directory gives EACCES.
    """
    folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() != 0:
        for path in folders:
            os.chmod(path, 0o500)
        try:
            yield
        finally:
            for path in folders:
                os.chmod(path, 0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not installed: no way to make a directory read-only for root")
    done = subprocess.run([chattr, "-R", "+i", os.fspath(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run([chattr, "-R", "-i", os.fspath(folder)], capture_output=True)
        pytest.skip(f"chattr +i fails here ({done.stderr.strip()}): no read-only directory for root")
    try:
        yield
    finally:
        subprocess.run([chattr, "-R", "-i", os.fspath(folder)], check=True)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll *check* until it is true; fail after *timeout* seconds (a bound, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.02)


#: The reason codes sanitize_raster may raise (tests check refusals against them).
RASTER_REASONS = frozenset(
    {
        "not_image",
        "format_not_allowed",
        "side_too_large",
        "too_many_pixels",
        "too_many_frames",
        "truncated_image",
        "corrupt_image",
    }
)
#: The reason codes for which sanitize_svg refuses a whole SVG.
SVG_REFUSALS = frozenset(
    {
        "too_large",
        "svg_malformed",
        "svg_entities_forbidden",
        "svg_dtd_forbidden",
        "svg_not_svg",
        "svg_too_many_nodes",
        "svg_too_deep",
        "svg_use_limit",
        "svg_css_limit",
    }
)
#: Pillow's format name for each output format.
PIL_NAMES = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}
