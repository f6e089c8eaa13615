"""A remote image origin for the fetcher's tests: a werkzeug server in a thread that
records every request it receives (path and headers) and misbehaves on demand.

Routes::

    /good.png /echo-headers    a real PNG
    /html                      HTML declared as image/png
    /gzip                      the PNG gzipped, Content-Encoding: gzip
    /huge                      Content-Length 50 MB, body never sent
    /huge-chunked              chunked, (nearly) endless
    /slow-headers /slow-body   nothing for 5 s / one byte every 0.2 s
    /redirect/N                N relative 302s, then the PNG
    /loop                      302 to itself
    /to?location=URL           302 to URL
    /cookie                    Set-Cookie, then 302 to /echo-headers
    /no-location               302 without Location
    anything else              404

Every wait ends when the origin stops, so tests never hang on it.
"""

from __future__ import annotations

import gzip
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from werkzeug.serving import BaseWSGIServer, make_server

from tests.support import png

PNG = png(16, 16)
HTML = b"<!doctype html><script>alert(document.domain)</script>"
HUGE = 50_000_000  # bytes the /huge route declares


@dataclass(frozen=True)
class Seen:
    """One request as the origin received it."""

    method: str
    path: str
    #: Header names lower case, as sent (werkzeug's environ, Host included).
    headers: dict[str, str]


StartResponse = Callable[..., Any]


class Origin:
    """Serve the routes above on ``host:port`` until :meth:`stop`."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: BaseWSGIServer = make_server(
            host, port, self.app, threaded=True, ssl_context=ssl_context
        )
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def paths(self) -> list[str]:
        with self._lock:
            return [seen.path for seen in self.seen]

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        path = environ["PATH_INFO"]
        with self._lock:
            self.seen.append(Seen(environ["REQUEST_METHOD"], path, headers))
        query = parse_qs(environ.get("QUERY_STRING", ""))

        if path in ("/good.png", "/echo-headers"):
            return self._send(start_response, "200 OK", PNG)
        if path == "/html":
            return self._send(start_response, "200 OK", HTML)
        if path == "/gzip":
            return self._send(start_response, "200 OK", gzip.compress(PNG), [("Content-Encoding", "gzip")])
        if path == "/huge":
            start_response("200 OK", [("Content-Type", "image/png"), ("Content-Length", str(HUGE))])
            return self._stalled(PNG[:8])
        if path == "/huge-chunked":
            start_response("200 OK", [("Content-Type", "image/png")])
            return self._endless()
        if path == "/slow-headers":
            self._stopping.wait(5)
            return self._send(start_response, "200 OK", PNG)
        if path == "/slow-body":
            start_response("200 OK", [("Content-Type", "image/png")])
            return self._drip()
        if path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            location = f"/redirect/{left - 1}" if left > 0 else "/good.png"
            return self._redirect(start_response, location)
        if path == "/loop":
            return self._redirect(start_response, "/loop")
        if path == "/to":
            return self._redirect(start_response, query["location"][0])
        if path == "/cookie":
            start_response(
                "302 Found",
                [
                    ("Location", "/echo-headers"),
                    ("Set-Cookie", "session=secret; Path=/"),
                    ("Content-Length", "0"),
                ],
            )
            return [b""]
        if path == "/no-location":
            start_response("302 Found", [("Content-Length", "0")])
            return [b""]
        return self._send(start_response, "404 Not Found", b"not found", content_type="text/plain")

    @staticmethod
    def _send(
        start_response: StartResponse,
        status: str,
        body: bytes,
        extra: list[tuple[str, str]] | None = None,
        content_type: str = "image/png",
    ) -> list[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(extra or [])]
        start_response(status, headers)
        return [body]

    @staticmethod
    def _redirect(start_response: StartResponse, location: str) -> list[bytes]:
        start_response("302 Found", [("Location", location), ("Content-Length", "0")])
        return [b""]

    def _stalled(self, first: bytes) -> Iterator[bytes]:
        yield first  # headers go out with the first chunk
        self._stopping.wait(10)

    def _endless(self) -> Iterator[bytes]:
        chunk = b"\0" * 65536
        for _ in range(1000):  # 64 MB at most: bounded even if a client kept reading
            if self._stopping.is_set():
                return
            yield chunk

    def _drip(self) -> Iterator[bytes]:
        for _ in range(100):
            if self._stopping.wait(0.2):
                return
            yield b"x"
