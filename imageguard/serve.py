"""``imageguard serve DIR``: a hardened image server for one folder.

The folder is served by a minimal WSGI app (werkzeug's ``send_from_directory``,
which refuses paths outside the folder) wrapped in :class:`ImageGuard`, so every
image leaves validated and re-encoded. ``/`` shows an index with signed
thumbnails. It runs on werkzeug's threaded WSGI server, bound to 127.0.0.1 by
default; put a reverse proxy or CDN in front for the internet.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings
from .core import IMAGE_EXTENSIONS
from .wsgi import ImageGuard

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: Width of the thumbnails on the index page, in pixels.
THUMBNAIL_WIDTH = 320


def folder_app(directory: Path) -> WSGIApplication:
    """A WSGI app that serves the files of *directory* (no listing of other paths)."""
    from werkzeug.exceptions import HTTPException, NotFound
    from werkzeug.utils import send_from_directory
    from werkzeug.wrappers import Request

    root = directory.resolve()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            if request.path == "/":
                guard: ImageGuard | None = environ.get("imageguard.index")
                return _index(root, guard)(environ, start_response)
            if request.method not in ("GET", "HEAD"):
                raise NotFound()
            response = send_from_directory(root, request.path.lstrip("/"), environ)
        except HTTPException as exc:
            return exc(environ, start_response)
        return response(environ, start_response)

    return app


def _images(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


def _index(root: Path, guard: ImageGuard | None) -> WSGIApplication:
    from werkzeug.wrappers import Response

    items = []
    for name in _images(root):
        full = "/" + name
        thumb = guard.url(full, w=THUMBNAIL_WIDTH) if guard else full
        items.append(
            f'<li><a href="{html.escape(full)}"><img src="{html.escape(thumb)}" '
            f'alt="{html.escape(name)}" width="{THUMBNAIL_WIDTH}"></a>'
            f"<br><code>{html.escape(name)}</code></li>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>imageguard</title>"
        "<style>body{font-family:sans-serif}ul{display:flex;flex-wrap:wrap;gap:1em;"
        "list-style:none;padding:0}</style>"
        f"<h1>imageguard: {html.escape(root.name)}</h1><ul>{''.join(items)}</ul>"
    )
    response = Response(page, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def build_app(directory: Path, settings: Settings | None = None) -> ImageGuard:
    """The guarded folder app (what ``imageguard serve`` runs)."""
    guard = ImageGuard(folder_app(directory), settings=settings or Settings.from_env())
    inner = guard.app
    assert inner is not None

    def with_index(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["imageguard.index"] = guard
        return inner(environ, start_response)

    guard.app = with_index
    return guard


def serve(
    directory: Path, host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None
) -> None:
    """Serve *directory* until interrupted."""
    from werkzeug.serving import make_server

    app = build_app(directory, settings)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"imageguard serving {directory} on http://{shown}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
