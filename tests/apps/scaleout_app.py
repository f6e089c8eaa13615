"""Guarded apps over one image folder, for the scale-out tests (real server processes).

``gunicorn 'tests.apps.scaleout_app:make_wsgi()'`` (Flask + ``ImageGuard``) and
``uvicorn --factory tests.apps.scaleout_app:make_asgi`` (Starlette +
``ImageGuardMiddleware``); factories, so each process builds only its own guard.
Both read ``SCALEOUT_IMAGES`` (the folder, read afresh on every upstream call,
so a test changes an image by writing the file) and every ``IMAGEGUARD_*``
variable. ``/_calls`` counts the upstream calls of this process; ``/_purge``
(``?path=``, ``?key=`` or ``?all=1``) calls the guard's purge API; ``/_stats``
returns ``guard.stats()``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from imageguard import ImageGuard, ImageGuardMiddleware

IMAGES = Path(os.environ.get("SCALEOUT_IMAGES", "."))
_calls = 0
_lock = threading.Lock()


def _read(name: str) -> bytes | None:
    global _calls
    with _lock:
        _calls += 1
    file = IMAGES / name
    return file.read_bytes() if file.is_file() else None


def _purge(guard: Any, args: Any) -> str:
    if args.get("all"):
        guard.purge_all()
        return "all"
    if args.get("key"):
        return str(guard.purge(key=args["key"]))
    return str(guard.purge(path=args["path"]))


# -- WSGI ---------------------------------------------------------------------------


def make_wsgi() -> Flask:
    flask_app = Flask("scaleout", static_folder=None)
    guard = ImageGuard(flask_app)

    @flask_app.route("/img/<name>")
    def image(name: str) -> Response:
        body = _read(name)
        if body is None:
            return Response("no such image", status=404)
        return Response(body, content_type="image/png")

    @flask_app.route("/_calls")
    def calls() -> Response:
        return Response(str(_calls), content_type="text/plain")

    @flask_app.route("/_purge")
    def purge() -> Response:
        return Response(_purge(guard, request.args), content_type="text/plain")

    @flask_app.route("/_stats")
    def stats() -> Response:
        return Response(json.dumps(guard.stats(), default=str), content_type="application/json")

    return flask_app


# -- ASGI ---------------------------------------------------------------------------


async def starlette_image(request: Request) -> StarletteResponse:
    body = _read(request.path_params["name"])
    if body is None:
        return PlainTextResponse("no such image", status_code=404)
    return StarletteResponse(body, media_type="image/png")


async def starlette_calls(request: Request) -> StarletteResponse:
    return PlainTextResponse(str(_calls))


async def starlette_purge(request: Request) -> StarletteResponse:
    guard = ImageGuardMiddleware.from_app(request.app)
    return PlainTextResponse(_purge(guard, request.query_params))


async def starlette_stats(request: Request) -> StarletteResponse:
    return JSONResponse(
        json.loads(json.dumps(ImageGuardMiddleware.from_app(request.app).stats(), default=str))
    )


def make_asgi() -> Starlette:
    app = Starlette(
        routes=[
            Route("/img/{name}", starlette_image),
            Route("/_calls", starlette_calls),
            Route("/_purge", starlette_purge),
            Route("/_stats", starlette_stats),
        ]
    )
    app.add_middleware(ImageGuardMiddleware)
    return app
