"""``imageguard serve DIR``: a hardened image server for one folder.

The folder is served by Starlette's ``StaticFiles`` (which refuses paths outside
the folder) behind :class:`~imageguard.ImageGuardMiddleware`, under uvicorn,
bound to 127.0.0.1 by default. ``/`` shows an index with signed thumbnails.

Why the ASGI adapter under uvicorn rather than the WSGI one: uvicorn is a
production HTTP server (werkzeug's is a development server), hits are answered
on the event loop without a thread per connection, and Pillow runs in the
middleware's bounded worker pool, so slow clients and slow re-encodes cannot
exhaust a thread pool. Forwarded headers are not trusted (``proxy_headers``
off): put the server behind a reverse proxy or CDN for the internet.
"""

from __future__ import annotations

import html
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from .asgi import ImageGuardMiddleware, image_url
from .config import Settings
from .core import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

#: Width of the thumbnails on the index page, in pixels.
THUMBNAIL_WIDTH = 320
#: The index page loads only our own images and inline styles.
INDEX_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


def _images(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


def build_app(directory: Path, settings: Settings | None = None) -> Starlette:
    """The guarded folder app (what ``imageguard serve`` runs)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    root = directory.resolve()

    async def index(request: Request) -> Response:
        items = []
        for name in _images(root):
            full = "/" + name
            thumb = image_url(request, full, w=THUMBNAIL_WIDTH)
            items.append(
                f'<li><a href="{html.escape(full)}"><img src="{html.escape(thumb)}" '
                f'alt="{html.escape(name)}"></a>'
                f"<br><code>{html.escape(name)}</code></li>"
            )
        page = (
            "<!doctype html><meta charset=utf-8><title>imageguard</title>"
            "<style>body{font-family:sans-serif}ul{display:flex;flex-wrap:wrap;gap:1em;"
            "list-style:none;padding:0}</style>"
            f"<h1>imageguard: {html.escape(root.name)}</h1><ul>{''.join(items)}</ul>"
        )
        return HTMLResponse(
            page, headers={"Content-Security-Policy": INDEX_CSP, "X-Content-Type-Options": "nosniff"}
        )

    app = Starlette(routes=[Route("/", index), Mount("/", StaticFiles(directory=root))])
    app.add_middleware(ImageGuardMiddleware, settings=settings or Settings.from_env())
    ImageGuardMiddleware.from_app(app)  # build now: a bad setting fails at start-up
    return app


def serve(
    directory: Path, host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None
) -> None:
    """Serve *directory* until interrupted; prints the URL first."""
    import uvicorn

    settings = settings or Settings.from_env()
    app = build_app(directory, settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"imageguard serving {directory} on http://{shown}:{bound}/", flush=True)
    config = uvicorn.Config(
        app,
        proxy_headers=False,
        server_header=False,
        log_level="info",
        # JSON: uvicorn's own loggers go through the root handler configure_root() set
        # up, instead of uvicorn's plain-text dictConfig.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    uvicorn.Server(config).run(sockets=[sock])
