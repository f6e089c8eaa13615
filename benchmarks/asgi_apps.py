"""The apps benchmarks/bench_asgi.py serves with uvicorn (one module, one app each).

uvicorn benchmarks.asgi_apps:bare      # Starlette returning the bytes from memory
uvicorn benchmarks.asgi_apps:static    # Starlette StaticFiles serving the file
uvicorn benchmarks.asgi_apps:guarded   # StaticFiles behind ImageGuardMiddleware (L1 hits)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from imageguard import ImageGuardMiddleware, Settings
from imageguard.raster import RasterLimits, sanitize_raster

SECRET = "benchmark-secret-key-0123456789"
FOLDER = Path(os.environ.get("IMAGEGUARD_BENCH_DIR", "/tmp/imageguard-bench"))


def _prepare() -> bytes:
    """Write the source photo and return the bytes imageguard serves for it."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    source = FOLDER / "photo.jpg"
    if not source.exists():
        out = io.BytesIO()
        Image.radial_gradient("L").resize((640, 480)).convert("RGB").save(out, "JPEG", quality=85)
        source.write_bytes(out.getvalue())
    served = sanitize_raster(source.read_bytes(), RasterLimits()).body
    (FOLDER / "served.jpg").write_bytes(served)  # what StaticFiles serves: the same bytes
    return served


SERVED = _prepare()


async def memory(request: Request) -> Response:
    return Response(SERVED, media_type="image/jpeg")


#: The headers imageguard puts on every served image (DESIGN §3), for a baseline
#: that pays the server's per-header cost too.
IMAGE_HEADERS = {
    "ETag": '"0123456789abcdef0123456789abcdef"',
    "Last-Modified": "Fri, 04 Dec 2026 16:10:51 GMT",
    "Cache-Control": "public, max-age=60",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
    "Cross-Origin-Resource-Policy": "same-site",
    "Accept-Ranges": "none",
}


async def memory_with_headers(request: Request) -> Response:
    return Response(SERVED, media_type="image/jpeg", headers=IMAGE_HEADERS)


async def data(request: Request) -> Response:
    return JSONResponse({"items": [1, 2, 3], "ok": True})


bare = Starlette(
    routes=[
        Route("/img/photo.jpg", memory),
        Route("/img/headers.jpg", memory_with_headers),
        Route("/api/data", data),
    ]
)
static = Starlette(routes=[Route("/api/data", data), Mount("/img", StaticFiles(directory=FOLDER))])
guarded = Starlette(routes=[Route("/api/data", data), Mount("/img", StaticFiles(directory=FOLDER))])
guarded.add_middleware(
    ImageGuardMiddleware,
    settings=Settings(secret_key=SECRET, paths="/img/", cache_control="public, max-age=60"),
)
