"""A FastAPI app whose images are served through imageguard, with a signed-URL API.

    export IMAGEGUARD_SECRET_KEY=$(imageguard keygen)
    uvicorn examples.fastapi_app:app

``GET /thumbnails`` returns signed thumbnail URLs for the example images;
``/static/...`` serves them validated and re-encoded. Change ``w`` in a URL and
imageguard answers 403.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles

from imageguard import ImageGuardMiddleware, Settings

IMAGES = Path(__file__).resolve().parent / "images"


def guard(request: Request) -> ImageGuardMiddleware:
    """FastAPI dependency: the middleware installed on this app (for ``guard.url``)."""
    return ImageGuardMiddleware.from_app(request.app)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The demo app; *settings* default to the IMAGEGUARD_* environment."""
    app = FastAPI(title="imageguard demo")
    app.mount("/static", StaticFiles(directory=IMAGES), name="static")

    @app.get("/thumbnails")
    async def thumbnails(
        images: Annotated[ImageGuardMiddleware, Depends(guard)], width: int = 240
    ) -> dict[str, str]:
        return {
            p.name: images.url(f"/static/{p.name}", w=width, fmt="webp")
            for p in sorted(IMAGES.iterdir())
            if p.suffix in {".jpg", ".png", ".gif", ".webp"}
        }

    app.add_middleware(ImageGuardMiddleware, settings=settings)
    return app


app = create_app()
