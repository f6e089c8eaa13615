"""A Starlette app whose images are served through imageguard.

    export IMAGEGUARD_SECRET_KEY=$(imageguard keygen)
    uvicorn examples.starlette_app:app

Open http://127.0.0.1:8000/: thumbnails with signed URLs from ``image_url(request, ...)``.
"""

from __future__ import annotations

import html
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from imageguard import ImageGuardMiddleware, Settings
from imageguard.asgi import image_url

IMAGES = Path(__file__).resolve().parent / "images"


async def index(request: Request) -> HTMLResponse:
    items = []
    for image in sorted(IMAGES.iterdir()):
        if image.suffix not in {".jpg", ".png", ".gif", ".webp"}:
            continue
        full = f"/static/{image.name}"
        thumb = image_url(request, full, w=240, fmt="webp")
        link, src = html.escape(full), html.escape(thumb)
        items.append(f'<li><a href="{link}"><img src="{src}" width="240"></a></li>')
    return HTMLResponse(f"<!doctype html><title>imageguard + Starlette</title><ul>{''.join(items)}</ul>")


def create_app(settings: Settings | None = None) -> Starlette:
    """The demo app; *settings* default to the IMAGEGUARD_* environment."""
    static = Mount("/static", StaticFiles(directory=IMAGES), name="static")
    app = Starlette(routes=[Route("/", index), static])
    app.add_middleware(ImageGuardMiddleware, settings=settings)
    return app


app = create_app()
