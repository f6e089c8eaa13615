"""The WSGI adapter: :class:`ImageGuard` for Flask, Django and any WSGI app.

Use it to wrap an app so that every image it serves on a guarded path is
validated, re-encoded and cached::

    app.wsgi_app = ImageGuard(app.wsgi_app)        # any WSGI app
    guard = ImageGuard(flask_app)                  # Flask: also registers image_url()

It only translates between WSGI and :mod:`imageguard.core`, and does the I/O:
calling the upstream app, reading its body (bounded), and writing responses.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import VARIABLES, Settings
from .core import (
    FOLLOW_ATTEMPTS,
    FOLLOWER_TIMEOUT,
    PASS,
    BodyLimit,
    Core,
    Entry,
    FillPlan,
    Hit,
    Outcome,
    Reply,
    Request,
)
from .errors import BadRequest, ConfigError, InvalidImage, RateLimited, Rejected
from .events import logger
from .facade import GuardFacade, warn_about
from .flight import ThreadFlights, ThreadGate
from .logs import configure as configure_logging

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ImageGuard"]

_STATUS_200 = "200 OK"
_STATUS_304 = "304 Not Modified"
# Per-request headers of the client that a fill must not see (every HTTP_*),
# and the body: a fill is a bare GET.
_DROPPED_ENVIRON = frozenset(("CONTENT_TYPE", "CONTENT_LENGTH", "REMOTE_USER", "AUTH_TYPE"))


class ImageGuard(GuardFacade):
    """WSGI middleware that guards the images an app serves.

    :param app: a WSGI callable, or a Flask app (then ``app.wsgi_app`` is wrapped
        and the template global ``image_url()`` registered), or ``None`` to call
        :meth:`init_app` later.
    :param settings: explicit settings; by default :meth:`Settings.from_env`
        (for Flask, ``IMAGEGUARD_*`` keys of ``app.config`` override the environment).
    :raises ConfigError: a setting is invalid; the middleware never starts half-configured.
    """

    def __init__(self, app: Any = None, *, settings: Settings | None = None) -> None:
        self._explicit_settings = settings
        self.app: WSGIApplication | None = None
        self.core: Core | None = None
        if app is None:
            return
        if _is_flask(app):
            self.init_app(app)
        else:
            self._setup(app, settings if settings is not None else Settings.from_env())

    def init_app(self, flask_app: Any) -> ImageGuard:
        """Install into a Flask app: wrap ``wsgi_app``, add ``image_url()`` to templates."""
        settings = self._explicit_settings
        if settings is None:
            overrides = {}
            for name, value in flask_app.config.items():
                if not name.startswith("IMAGEGUARD_"):
                    continue
                field = name[len("IMAGEGUARD_") :].lower()
                if field not in VARIABLES:
                    raise ConfigError(name, value, "a known IMAGEGUARD_ variable")
                overrides[field] = value
            settings = Settings.from_env(**overrides)
        self._setup(flask_app.wsgi_app, settings)
        flask_app.wsgi_app = self
        flask_app.add_template_global(self.url, "image_url")
        flask_app.extensions["imageguard"] = self
        return self

    def _setup(self, app: WSGIApplication, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.core = Core(settings)
        self._flights: ThreadFlights[Outcome] = ThreadFlights()
        self._gate = ThreadGate(settings.workers, settings.queue)
        warn_about(settings)
        configure_logging(settings)

    def close(self) -> None:
        """Close the disk and Redis tiers (tests, reloads)."""
        self.close_tiers()

    # -- WSGI ------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        core = self.core
        app = self.app
        if core is None or app is None:
            raise RuntimeError("ImageGuard has no app yet: call init_app(app) first")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if not core.is_guarded(path, query):
            return app(environ, start_response)
        request = Request(
            method=environ.get("REQUEST_METHOD", "GET").upper(),
            path=path,
            query=query,
            raw_path=_raw_path(environ),
            host=environ.get("HTTP_HOST"),
            if_none_match=environ.get("HTTP_IF_NONE_MATCH"),
            client=core.client_address(
                environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), environ.get("HTTP_FORWARDED")
            ),
            accept=environ.get("HTTP_ACCEPT"),
        )
        key = None
        try:
            request = _decode_path(request)
            decision = core.decide(request, guarded=True)
            if decision is PASS:
                return app(environ, start_response)
            if isinstance(decision, Hit):
                return _send_entry(decision.entry, decision.not_modified, decision.head, start_response)
            assert isinstance(decision, FillPlan)
            key = decision.key
            outcome = self._follow(environ, decision)
            core.served(outcome)
        except Rejected as error:
            return _send_reply(core.reject(error, request, key=key), request.method == "HEAD", start_response)
        if isinstance(outcome, Entry):
            return _send_entry(
                outcome, outcome.matches(decision.if_none_match), decision.head, start_response
            )
        return _send_reply(outcome, decision.head, start_response)

    def _follow(self, environ: WSGIEnvironment, plan: FillPlan) -> Outcome:
        """Lead or wait for the fill of ``plan.key`` (single flight across threads).

        A fill refused because *its* client is over the miss rate limit does
        not limit the other clients that waited on it: they try again.
        """

        def fill() -> Outcome:
            return self._fill(environ, plan)

        for attempt in range(FOLLOW_ATTEMPTS):
            try:
                return self._flights.run(plan.key, fill, timeout=FOLLOWER_TIMEOUT)
            except RateLimited as error:
                if not Core.retries_fill(error, plan, attempt):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _fill(self, environ: WSGIEnvironment, plan: FillPlan) -> Outcome:
        core = self._core()
        entry = core.lookup(plan.key)  # filled while we waited for the lead
        if entry is None and core.lower:
            entry = core.lookup_lower(plan)  # L2, then L3
        if entry is not None:
            return entry
        core.charge_fill(plan)  # only now is it a miss that costs the upstream and the CPU
        core.metrics.fill_started()
        try:
            if plan.remote:  # the proxy route: the network, with every SSRF check
                status, headers, body = core.remote_fetcher.fetch(plan.path)
            else:
                status, headers, body = self._call_upstream(environ, plan)
            with self._gate.slot():
                return core.complete(plan, status, headers, body)
        finally:
            core.metrics.fill_finished()

    def _call_upstream(
        self, environ: WSGIEnvironment, plan: FillPlan
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self.app is not None
        budget = BodyLimit(self.settings.max_bytes)
        started: list[tuple[str, list[tuple[str, str]]]] = []
        chunks: list[bytes] = []

        def write(data: bytes) -> None:  # the legacy write() callable of PEP 3333
            budget.add(data)
            chunks.append(data)

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started.append((status, headers))
            return write

        upstream_environ = _upstream_environ(environ, plan)
        try:
            iterable = self.app(upstream_environ, start_response)
        except Exception as exc:
            logger.exception("upstream app raised while filling %s", plan.path)
            raise InvalidImage("upstream_error", "the upstream app failed", original_error=exc) from exc
        try:
            if started:
                budget.declared(started[-1][1])
            for chunk in iterable:
                if not chunks and started:
                    budget.declared(started[-1][1])
                budget.add(chunk)
                chunks.append(chunk)
        except Rejected:
            raise
        except Exception as exc:
            logger.exception("upstream app raised while filling %s", plan.path)
            raise InvalidImage("upstream_error", "the upstream app failed", original_error=exc) from exc
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        if not started:
            raise InvalidImage("upstream_error", "the upstream app never called start_response")
        status_text, headers = started[-1]
        try:
            status = int(status_text.split(" ", 1)[0])
        except ValueError as exc:
            raise InvalidImage("upstream_error", "the upstream sent a bad status") from exc
        return status, headers, b"".join(chunks)


def _send_entry(
    entry: Entry, not_modified: bool, head: bool, start_response: StartResponse
) -> Iterable[bytes]:
    if not_modified:
        start_response(_STATUS_304, list(entry.headers_304))
        return []
    start_response(_STATUS_200, list(entry.headers))
    return [] if head else [entry.body]


def _send_reply(reply: Reply, head: bool, start_response: StartResponse) -> Iterable[bytes]:
    start_response(reply.status_line, list(reply.headers))
    return [] if head else [reply.body]


def _raw_path(environ: Mapping[str, Any]) -> str | None:
    raw = str(environ.get("REQUEST_URI") or environ.get("RAW_URI") or "")
    if not raw:
        return None
    target = raw.split("?", 1)[0]
    if "://" in target:
        return urlsplit(raw).path  # absolute-form request target
    return target


def _decode_path(request: Request) -> Request:
    # WSGI strings are bytes decoded as latin-1 (PEP 3333); paths are UTF-8.
    try:
        path = request.path.encode("latin-1").decode("utf-8")
    except UnicodeError as exc:
        raise BadRequest("bad_path", "the path is not UTF-8", original_error=exc) from exc
    if path == request.path:
        return request
    return dataclasses.replace(request, path=path)


def _upstream_environ(environ: Mapping[str, Any], plan: FillPlan) -> dict[str, Any]:
    """The environ of the fill: a bare GET of the path and keyed query, no client header.

    Kept: the server's CGI variables and ``wsgi.*``. Dropped: every ``HTTP_*``
    header, the body, ``REMOTE_USER``/``AUTH_TYPE`` (per-user, not keyed), and
    side data that outer middleware derived from the client's request
    (``werkzeug.request``, ``werkzeug.proxy_fix.orig``, ...).
    """
    upstream = {
        key: value
        for key, value in environ.items()
        if (key.startswith("wsgi.") or "." not in key)
        and not key.startswith("HTTP_")
        and key not in _DROPPED_ENVIRON
    }
    upstream["REQUEST_METHOD"] = "GET"
    upstream["QUERY_STRING"] = plan.upstream_query
    upstream["wsgi.input"] = io.BytesIO(b"")
    upstream["CONTENT_LENGTH"] = "0"
    upstream["HTTP_HOST"] = plan.host(environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT"))
    target = plan.raw_path + ("?" + plan.upstream_query if plan.upstream_query else "")
    for name in ("REQUEST_URI", "RAW_URI"):
        if name in upstream:
            upstream[name] = target
    upstream["imageguard.fill"] = True
    return upstream


def _is_flask(app: Any) -> bool:
    return hasattr(app, "wsgi_app") and hasattr(app, "add_template_global")


logging.getLogger("imageguard").addHandler(logging.NullHandler())
