"""The ASGI adapter: :class:`ImageGuardMiddleware` for Starlette, FastAPI and any ASGI app.

Use it to guard the images an ASGI app serves::

    app.add_middleware(ImageGuardMiddleware)                     # settings from the environment
    app.add_middleware(ImageGuardMiddleware, settings=Settings(...))
    app = ImageGuardMiddleware(app)                              # a bare ASGI app

It is a pure ASGI middleware (no ``BaseHTTPMiddleware``): non-HTTP scopes and
requests it does not guard go to the app untouched, with no buffering. A
guarded miss calls the app with a cleaned scope, captures its response up to
``IMAGEGUARD_MAX_BYTES`` and lets :mod:`imageguard.core` judge it; Pillow runs
in a bounded pool of worker threads, never on the event loop.

Fills run as tasks of their own, shared by every request for the same key
(single-flight): a client that disconnects, or a request task that is
cancelled, does not cancel the fill the others wait for, and a fill that fails
hands its rejection to every waiter. This needs asyncio (uvicorn, hypercorn's
asyncio worker, daphne).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import Settings
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
from .errors import BadRequest, InvalidImage, Overloaded, RateLimited, Rejected
from .events import logger
from .facade import GuardFacade, warn_about
from .flight import RETRY_AFTER
from .logs import configure as configure_logging

__all__ = ["ImageGuardMiddleware", "image_url"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds the upstream app has to produce a fill's whole response.
UPSTREAM_TIMEOUT = 60.0
#: Request headers the fill sees: only the Host the core chose.
_HOST = b"host"


class ImageGuardMiddleware(GuardFacade):
    """ASGI middleware that guards the images an app serves.

    :param app: the ASGI app to wrap.
    :param settings: explicit settings; by default :meth:`Settings.from_env`.
    :raises ConfigError: a setting is invalid (raised when the middleware is
        built: for Starlette, at start-up).
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings if settings is not None else Settings.from_env()
        self.core = Core(self.settings)
        self._fills: dict[str, asyncio.Task[Outcome]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._inflight = 0  # sanitizations running or waiting for a worker
        self._registered = False
        #: Seconds the upstream app has to answer a fill (then 502 ``upstream_timeout``).
        self.upstream_timeout = UPSTREAM_TIMEOUT
        warn_about(self.settings)
        configure_logging(self.settings)

    @classmethod
    def from_app(cls, app: Any) -> ImageGuardMiddleware:
        """The middleware installed on a Starlette/FastAPI *app* (builds its stack if needed).

        Also stored as ``app.state.imageguard`` once found.
        """
        state = getattr(app, "state", None)
        found = getattr(state, "imageguard", None) if state is not None else None
        if isinstance(found, cls):
            return found
        node = app
        if getattr(app, "middleware_stack", "missing") is None:
            app.middleware_stack = app.build_middleware_stack()
        node = getattr(app, "middleware_stack", None) or app
        seen = 0
        while node is not None and seen < 100:
            if isinstance(node, cls):
                if state is not None:
                    state.imageguard = node
                return node
            node = getattr(node, "app", None)
            seen += 1
        raise LookupError("no ImageGuardMiddleware is installed on this app")

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan, websocket: not ours
            return
        core = self._core()
        path = _full_path(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        if not core.is_guarded(path, query):
            await self.app(scope, receive, send)
            return
        if not self._registered:
            self._register(scope)
        peer = scope.get("client")
        remote = peer[0] if peer else None
        method = scope.get("method", "GET").upper()
        request = Request(method=method, path=path, query=query, client=remote)  # until headers are read
        key = None
        try:
            headers = _request_headers(scope)
            request = Request(
                method=method,
                path=path,
                query=query,
                raw_path=_raw_path(scope),
                host=_header(headers, b"host"),
                if_none_match=_header(headers, b"if-none-match"),
                client=core.client_address(
                    remote, _header(headers, b"x-forwarded-for"), _header(headers, b"forwarded")
                ),
                accept=_header(headers, b"accept"),
            )
            decision = core.decide(request, guarded=True)
            if decision is PASS:
                await self.app(scope, receive, send)
                return
            if isinstance(decision, Hit):
                await _send_entry(send, decision.entry, decision.not_modified, decision.head)
                return
            assert isinstance(decision, FillPlan)
            key = decision.key
            outcome = await self._follow(scope, decision)
            core.served(outcome)
        except Rejected as error:
            await _send_reply(send, core.reject(error, request, key=key), request.method == "HEAD")
            return
        if isinstance(outcome, Entry):
            await _send_entry(send, outcome, outcome.matches(decision.if_none_match), decision.head)
        else:
            await _send_reply(send, outcome, decision.head)

    def _register(self, scope: Scope) -> None:
        # request.app.state.imageguard, for image_url() and endpoints (once).
        self._registered = True
        owner = scope.get("app")
        state = getattr(owner, "state", None)
        if state is not None and getattr(state, "imageguard", None) is None:
            with contextlib.suppress(AttributeError):
                state.imageguard = self

    # -- fills ------------------------------------------------------------------------

    async def _follow(self, scope: Scope, plan: FillPlan) -> Outcome:
        """Wait for the fill of ``plan.key``, starting it if nobody has (single-flight).

        A fill refused because *its* client is over the miss rate limit does
        not limit the other clients that waited on it: they try again, once
        per attempt, leading the next fill themselves.
        """
        for attempt in range(FOLLOW_ATTEMPTS):
            try:
                return await self._follow_once(scope, plan)
            except RateLimited as error:
                if not Core.retries_fill(error, plan, attempt):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _follow_once(self, scope: Scope, plan: FillPlan) -> Outcome:
        task = self._fills.get(plan.key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(scope, plan))
            self._fills[plan.key] = task
            task.add_done_callback(functools.partial(self._forget, plan.key))
        try:
            # shield: a waiter that is cancelled (client gone) must not cancel
            # the fill that the other waiters share.
            return await asyncio.wait_for(asyncio.shield(task), FOLLOWER_TIMEOUT)
        except asyncio.TimeoutError as exc:
            raise Overloaded(
                "fill_timeout", "the image is still being prepared", retry_after=RETRY_AFTER
            ) from exc

    def _forget(self, key: str, task: asyncio.Task[Outcome]) -> None:
        if self._fills.get(key) is task:
            del self._fills[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it; no "never retrieved" noise

    async def _fill(self, scope: Scope, plan: FillPlan) -> Outcome:
        core = self._core()
        entry = core.lookup(plan.key)
        if entry is not None:
            return entry
        if core.lower:  # disk and Redis block: never on the event loop
            entry = await asyncio.to_thread(core.lookup_lower, plan)
            if entry is not None:
                return entry
        if core.limiter is not None and core.limiter.blocking:
            await asyncio.to_thread(core.charge_fill, plan)  # a Redis round trip: off the loop
        else:
            core.charge_fill(plan)
        core.metrics.fill_started()
        try:
            try:
                if plan.remote:  # the proxy route: bounded by IMAGEGUARD_REMOTE_TIMEOUT itself
                    status, headers, body = await core.remote_fetcher.fetch_async(plan.path)
                else:
                    status, headers, body = await asyncio.wait_for(
                        self._call_upstream(scope, plan), self.upstream_timeout
                    )
            except asyncio.TimeoutError:
                # A hung upstream must not hold the key's fill (and its waiters) forever.
                raise InvalidImage("upstream_timeout", "the upstream app did not answer in time") from None
            return await self._sanitize(plan, status, headers, body)
        finally:
            core.metrics.fill_finished()

    async def _sanitize(
        self, plan: FillPlan, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> Outcome:
        """Run :meth:`Core.complete` in a worker thread; shed load past the queue bound."""
        if status != 200:
            return self._core().complete(plan, status, headers, body)  # no CPU work: pass on
        settings = self.settings
        if self._inflight >= settings.workers + settings.queue:
            raise Overloaded("overloaded", "too many images are being prepared", retry_after=RETRY_AFTER)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="imageguard")
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, self._core().complete, plan, status, headers, body
            )
        finally:
            self._inflight -= 1

    async def _call_upstream(self, scope: Scope, plan: FillPlan) -> tuple[int, list[tuple[str, str]], bytes]:
        budget = BodyLimit(self.settings.max_bytes)
        started: list[tuple[int, list[tuple[str, str]]]] = []
        chunks: list[bytes] = []
        finished = asyncio.Event()
        requested = False

        async def receive() -> Message:
            # The fill has no body; after it, the "client" is gone once we are done.
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                budget.declared(headers)
                started.append((int(message["status"]), headers))
            elif kind == "http.response.body":
                chunk = bytes(message.get("body", b""))
                budget.add(chunk)  # past the limit the app's send() fails and its stream ends
                chunks.append(chunk)
                if not message.get("more_body", False):
                    finished.set()

        failure: Rejected | None = None
        try:
            await self.app(_upstream_scope(scope, plan), receive, send)
        except Rejected as error:
            failure = error
        except Exception:
            logger.exception("upstream app raised while filling %s", plan.path)
            failure = InvalidImage("upstream_error", "the upstream app failed")
        finally:
            finished.set()
        if failure is not None:
            # Raised without the app's frames: nothing keeps its body iterator
            # alive, so a StreamingResponse generator is finalised (closed) now,
            # not whenever the last reference to this exception goes.
            failure.__traceback__ = failure.__context__ = failure.__cause__ = None
            raise failure
        if not started:
            raise InvalidImage("upstream_error", "the upstream app sent no response")
        status, headers = started[-1]
        return status, headers, b"".join(chunks)

    def close(self) -> None:
        """Stop the worker threads and close the disk and Redis tiers (tests, reloads)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self.close_tiers()


def image_url(
    request: Any, path: str | None = None, /, *, remote: str | None = None, **params: object
) -> str:
    """A signed image URL from a Starlette/FastAPI ``request`` (templates, endpoints).

    ``templates.env.globals["image_url"] = image_url``, then in Jinja:
    ``{{ image_url(request, url_for('static', path='cat.jpg').path, w=320) }}``.
    """
    return ImageGuardMiddleware.from_app(request.app).url(path, remote=remote, **params)


def _full_path(scope: Scope) -> str:
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    # Servers differ on whether path already includes root_path (ASGI spec 2.x).
    if root and not path.startswith(root):
        path = root + path
    return path


def _raw_path(scope: Scope) -> str | None:
    raw = scope.get("raw_path")
    if not raw:
        return None
    # Only inspected for forbidden encodings (%2f, %252e, ...), never routed on.
    return bytes(raw).decode("latin-1")


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    return headers.get(name, b"").decode("latin-1") or None


def _request_headers(scope: Scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        if name in (b"accept", b"x-forwarded-for", b"forwarded"):
            # List-valued headers: repeated fields combine in order (RFC 9110 §5.3).
            headers[name] = headers[name] + b", " + value if name in headers else value
        elif name in (b"host", b"if-none-match"):
            if name in headers:
                raise BadRequest("bad_header", f"duplicate {name.decode()} header")
            headers[name] = value
    return headers


def _upstream_scope(scope: Scope, plan: FillPlan) -> dict[str, Any]:
    """The scope of the fill: a bare GET of the path and keyed query, no client header."""
    upstream = {
        key: value
        for key, value in scope.items()
        if key in ("type", "asgi", "http_version", "scheme", "root_path", "client", "server", "state", "app")
    }
    upstream["method"] = "GET"
    upstream["path"] = plan.path
    upstream["raw_path"] = plan.raw_path.encode("ascii")
    root = scope.get("root_path", "")
    if root and plan.path.startswith(root) and not scope.get("path", "").startswith(root):
        upstream["path"] = plan.path[len(root) :]  # this server keeps path relative to root_path
    upstream["query_string"] = plan.upstream_query.encode("ascii")
    server = scope.get("server") or ("localhost", None)
    host = plan.host(server[0], server[1])
    upstream["headers"] = [(_HOST, host.encode("latin-1"))]
    upstream["extensions"] = {}
    return upstream


async def _send_entry(send: Send, entry: Entry, not_modified: bool, head: bool) -> None:
    if not_modified:
        await send({"type": "http.response.start", "status": 304, "headers": entry.raw_headers_304})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": entry.raw_headers})
    await send({"type": "http.response.body", "body": b"" if head else entry.body})


async def _send_reply(send: Send, reply: Reply, head: bool) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})
