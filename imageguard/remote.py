"""Fetch images from remote hosts without becoming an SSRF proxy (a camo-like fetcher).

Use :class:`RemoteFetcher` when the source of a guarded image is a URL on another
host rather than the wrapped app. It returns the upstream's status, headers and
body for the core to validate and re-encode; it never judges the bytes itself
(an HTML page declared as ``image/png`` is returned, and the core refuses it).

Defences, each tested in ``tests/test_remote_fetch.py``:

* :func:`check_url` refuses what URL parsers disagree on (userinfo, backslashes,
  control characters, ambiguous IPv4 spellings such as ``2130706433`` or
  ``127.1`` that the WHATWG URL standard reads as IPv4), normalises the rest and
  checks scheme and host against :class:`RemotePolicy`.
* :func:`resolve` is the only DNS lookup. Every address it returns is checked
  by :func:`address_blocked` (one bad answer refuses the fetch: mixed answers are
  a rebinding trick), and the connection goes to a checked address: the network
  backend replaces the host name by the pinned address, while the URL, the
  ``Host`` header and TLS (SNI and certificate verification) keep the name. A
  second lookup, which a rebinding DNS server could answer differently, never
  happens.
* Redirects are followed here, not by httpx, and every hop goes through the
  same checks. Requests carry exactly ``User-Agent``, ``Accept: image/*`` and
  ``Accept-Encoding: identity`` (plus ``Host``): no cookies, no credentials,
  nothing from the client.
* Size, total time and redirect count are bounded; the body is streamed and
  reading stops at the first byte over the limit.

Every pool (and connection) lives for one hop: simplicity over connection reuse,
and a connection to one pinned address can never serve another hop.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import quote, urljoin, urlsplit

import anyio
import anyio.to_thread
import httpcore
import httpx
import idna

from .errors import BadRequest, Forbidden, InvalidImage

__all__ = [
    "RemoteFetcher",
    "RemotePolicy",
    "RemoteURL",
    "address_blocked",
    "check_url",
    "resolve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Fetched = tuple[int, list[tuple[str, str]], bytes]

#: Schemes the fetcher can speak at all; a policy may only narrow them.
SUPPORTED_SCHEMES: Final = frozenset({"http", "https"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: Redirects that are followed (always with GET); any other 3xx is a final status.
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
#: Longest URL accepted, in characters (browsers and CDNs stop around 8 KiB).
MAX_URL_LENGTH: Final = 8192

#: Cloud instance-metadata endpoints (AWS/GCP/Azure/OCI, AWS ECS task credentials,
#: Alibaba, AWS IPv6): credentials live there, so they stay refused with allow_private.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
#: "This network" (RFC 1122): Linux connects 0.0.0.0 to the local host.
THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
#: Shared address space (RFC 6598): carrier-grade NAT, often cloud-internal.
CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")
#: IPv6 prefixes that carry an IPv4 address a gateway or the kernel may reach.
NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")

# C0 and C1 controls, space, DEL and backslash: parsers disagree on all of them
# (WHATWG strips tabs and newlines and reads "\" as "/" in http(s) URLs).
_UNSAFE_URL = re.compile(r"[\x00-\x20\x7f-\x9f\\]|\s")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# The WHATWG "ends in a number" test: such a host is parsed as IPv4.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_DOTTED_QUAD_PART = re.compile(r"0|[1-9][0-9]{0,2}")


@dataclass(frozen=True)
class RemotePolicy:
    """What :class:`RemoteFetcher` may fetch.

    :param hosts: the allowlist: ``"img.example.com"`` (exactly that host),
        ``"*.example.com"`` (any subdomain, not the apex), ``"*"`` (any host, only
        when written explicitly). IP literals match only when listed exactly.
    :param schemes: ``http`` and/or ``https``.
    :param allow_private: allow loopback, private, link-local, CGNAT and ULA
        addresses (tests, intranets). Cloud metadata addresses and the
        unspecified address stay refused.
    :param max_bytes: largest body, in bytes.
    :param timeout: seconds for the whole fetch: every hop, every byte.
    :param connect_timeout: seconds for one TCP (and TLS) connection.
    :param max_redirects: redirects followed before giving up.
    :param user_agent: the ``User-Agent`` sent.
    :raises ValueError: a host pattern, scheme or limit that cannot work.

    .. versionadded:: 0.1
    """

    hosts: tuple[str, ...]
    schemes: frozenset[str] = frozenset({"https"})
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 20.0
    connect_timeout: float = 5.0
    max_redirects: int = 3
    user_agent: str = "imageguard (+https://github.com/imageguard)"

    def __post_init__(self) -> None:
        # Accept any iterable from callers, store hashable canonical forms.
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "schemes", frozenset(scheme.lower() for scheme in self.schemes))
        unsupported = self.schemes - SUPPORTED_SCHEMES
        if unsupported:
            raise ValueError(f"unsupported remote schemes {sorted(unsupported)}: expected http, https")
        _host_patterns(self.hosts)  # raises ValueError for a pattern that can never match
        if self.max_bytes <= 0 or self.timeout <= 0 or self.connect_timeout <= 0 or self.max_redirects < 0:
            raise ValueError("max_bytes, timeout and connect_timeout must be positive, max_redirects >= 0")
        if re.search(r"[\x00-\x1f\x7f]", self.user_agent):
            raise ValueError("user_agent must not contain control characters")


@dataclass(frozen=True)
class RemoteURL:
    """A URL :func:`check_url` accepted, in the form that is fetched."""

    #: Normalised absolute URL: scheme and host lower case, IDNA host, no
    #: userinfo, no fragment, default port dropped.
    url: str
    #: ``http`` or ``https``.
    scheme: str
    #: ASCII host name, or the IP address (IPv6 without brackets).
    host: str
    #: The port connected to (the default port when the URL has none).
    port: int
    #: ``path?query`` as sent in the request line.
    target: str


def check_url(url: str, policy: RemotePolicy) -> RemoteURL:
    """Parse and normalise *url*, and check it against *policy* (no I/O).

    :raises BadRequest: ``remote_url_invalid``: unparseable, no host, userinfo,
        backslashes, control characters or spaces, an ambiguous IPv4 spelling.
    :raises Forbidden: ``remote_scheme_not_allowed``, ``remote_host_not_allowed``,
        or ``remote_address_blocked`` for an IP literal :func:`address_blocked` refuses.
    """
    if len(url) > MAX_URL_LENGTH or _UNSAFE_URL.search(url):
        raise _invalid(url, "characters parsers disagree on")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _invalid(url, str(exc)) from exc
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise _invalid(url, "not an absolute URL with a host")
    if scheme not in policy.schemes:
        raise Forbidden(
            "remote_scheme_not_allowed",
            f"the scheme {scheme!r} is not allowed",
            facts={"scheme": scheme, "allowed": sorted(policy.schemes)},
        )
    if "@" in parts.netloc:
        # "https://good.com@evil/" sends credentials and fools readers: refuse.
        raise _invalid(url, "userinfo in the URL")
    host_text, port_text = _split_netloc(parts.netloc, url)
    try:
        host, literal = _normalise_host(host_text)
    except ValueError as exc:
        raise _invalid(url, str(exc)) from exc
    port = DEFAULT_PORTS[scheme] if not port_text else int(port_text)
    if not 0 < port < 65536:
        raise _invalid(url, "port out of range")
    if not _host_allowed(host, literal, policy.hosts):
        raise Forbidden(
            "remote_host_not_allowed", f"the host {host!r} is not allowed", facts={"host": host, "port": port}
        )
    if literal is not None:
        _check_addresses(host, [host], policy.allow_private)
    try:
        path = _encode_non_ascii(parts.path) or "/"
        query = _encode_non_ascii(parts.query)
    except UnicodeError as exc:
        raise _invalid(url, "unencodable path or query") from exc
    authority = f"[{host}]" if isinstance(literal, ipaddress.IPv6Address) else host
    if port != DEFAULT_PORTS[scheme]:
        authority = f"{authority}:{port}"
    text = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
    # httpx parses the URL again to send it: insist that it reads the same
    # scheme, host and port (a parser differential is an attack surface).
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise _invalid(url, str(exc)) from exc
    seen = (parsed.scheme, parsed.raw_host.decode("ascii"), parsed.port or DEFAULT_PORTS[scheme])
    if seen != (scheme, host, port):
        raise _invalid(url, "httpx reads this URL differently")
    return RemoteURL(str(parsed), scheme, host, port, parsed.raw_path.decode("ascii"))


def resolve(host: str, port: int) -> list[str]:
    """Look *host* up: every IPv4 and IPv6 address, in resolver order, without duplicates.

    The fetcher's only DNS lookup (tests replace it). Blocks: the async fetcher
    runs it in a worker thread.

    :raises OSError: ``socket.gaierror`` when the name does not resolve.
    """
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    return addresses


def address_blocked(address: str, *, allow_private: bool) -> str | None:
    """Why the fetcher must not connect to *address*, or ``None`` when it may.

    Refused unless *allow_private*: loopback, private (RFC 1918, ULA, site-local),
    link-local, CGNAT, multicast, reserved, and anything else not globally
    routable. IPv4 embedded in IPv6 (mapped ``::ffff:0:0/96``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``, compatible ``::/96``) is judged as that
    IPv4 address. Always refused: cloud metadata addresses and unspecified
    addresses (``0.0.0.0/8``, ``::``).

    :returns: a short reason: ``metadata``, ``unspecified``, ``loopback``,
        ``link_local``, ``cgnat``, ``multicast``, ``private``, ``reserved``,
        ``not_global`` or ``invalid``.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "invalid"
    return _blocked(ip, allow_private)


def _blocked(ip: IPAddress, allow_private: bool) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).partition("%")[0])
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if ip.is_unspecified or ip in THIS_NETWORK:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return _blocked(embedded, allow_private)
    if allow_private:
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip in CGNAT:
        return "cgnat"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "private"
    if not ip.is_global:
        return "not_global"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and not ip.is_loopback):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class RemoteFetcher:
    """Fetch one image per call under a :class:`RemotePolicy`; thread-safe.

    ``fetch`` is for WSGI (blocks), ``fetch_async`` for ASGI (never blocks the
    event loop: the DNS lookup runs in a worker thread). Both return
    ``(200, headers, body)`` of the final response; headers keep their case.

    :raises BadRequest: ``remote_url_invalid`` (400).
    :raises Forbidden: ``remote_scheme_not_allowed``, ``remote_host_not_allowed``,
        ``remote_address_blocked`` (403), before any connection is made.
    :raises InvalidImage: ``remote_timeout``, ``remote_status``,
        ``remote_too_large``, ``remote_error`` (502).

    .. versionadded:: 0.1
    """

    def __init__(self, policy: RemotePolicy) -> None:
        self.policy = policy
        # Loading the CA bundle is the expensive part: once per fetcher, shared.
        self._ssl_context = httpx.create_ssl_context() if "https" in policy.schemes else None
        self._closed = False

    def fetch(self, url: str) -> Fetched:
        """Fetch *url*, following at most ``max_redirects`` checked redirects.

        Every socket operation is bounded by the time left; the total is checked
        between hops and chunks. A body that trickles in just under the read
        timeout can therefore overrun ``timeout`` by one read (at most twice
        ``timeout`` in all); the DNS lookup itself cannot be interrupted.
        """
        self._check_open()
        deadline = time.monotonic() + self.policy.timeout
        remote = check_url(url, self.policy)
        for _hop in range(self.policy.max_redirects + 1):
            _remaining(deadline, remote, self.policy)
            if _literal(remote.host):
                answers = [remote.host]
            else:
                try:
                    answers = resolve(remote.host, remote.port)
                except OSError as exc:
                    raise _dns_error(remote, exc) from exc
            addresses = _check_addresses(remote.host, answers, self.policy.allow_private)
            outcome = self._exchange(remote, addresses, deadline)
            if isinstance(outcome, RemoteURL):
                remote = outcome
                continue
            return outcome
        raise _too_many_redirects(remote, self.policy)

    async def fetch_async(self, url: str) -> Fetched:
        """Like :meth:`fetch`, for an event loop (asyncio or trio via anyio)."""
        self._check_open()
        hops: list[RemoteURL] = []
        try:
            with anyio.fail_after(self.policy.timeout):
                return await self._fetch_async(url, hops)
        except TimeoutError as exc:
            raise _timeout(hops[-1] if hops else None, self.policy, exc) from exc

    def close(self) -> None:
        """Refuse further fetches (pools live for one hop: nothing else to release)."""
        self._closed = True

    async def aclose(self) -> None:
        """Like :meth:`close`."""
        self._closed = True

    async def _fetch_async(self, url: str, hops: list[RemoteURL]) -> Fetched:
        deadline = time.monotonic() + self.policy.timeout
        remote = check_url(url, self.policy)
        for _hop in range(self.policy.max_redirects + 1):
            hops.append(remote)
            if _literal(remote.host):
                answers = [remote.host]
            else:
                try:
                    # resolve is looked up at call time, so a patched one is used.
                    answers = await anyio.to_thread.run_sync(
                        resolve, remote.host, remote.port, abandon_on_cancel=True
                    )
                except OSError as exc:
                    raise _dns_error(remote, exc) from exc
            addresses = _check_addresses(remote.host, answers, self.policy.allow_private)
            outcome = await self._exchange_async(remote, addresses, deadline)
            if isinstance(outcome, RemoteURL):
                remote = outcome
                continue
            return outcome
        raise _too_many_redirects(remote, self.policy)

    def _exchange(self, remote: RemoteURL, addresses: list[str], deadline: float) -> Fetched | RemoteURL:
        pool = httpcore.ConnectionPool(
            ssl_context=self._ssl_context,
            network_backend=_PinnedBackend(remote.host, addresses),
            http1=True,
            http2=False,
            max_connections=1,
        )
        try:
            with httpx.Client(transport=_PinnedTransport(pool), trust_env=False) as client:
                response = client.send(_request(remote, deadline, self.policy), stream=True)
                try:
                    following = _follow(remote, response, self.policy)
                    if following is not None:
                        return following
                    budget = _Budget(remote, self.policy)
                    budget.declared(response)
                    for chunk in response.iter_raw():
                        budget.add(chunk)
                        # Read timeouts restart per chunk: the total is checked here.
                        _remaining(deadline, remote, self.policy)
                    return 200, _headers(response), budget.body()
                finally:
                    response.close()
        except _FAILURES as exc:
            raise _transport_error(remote, addresses, self.policy, exc) from exc

    async def _exchange_async(
        self, remote: RemoteURL, addresses: list[str], deadline: float
    ) -> Fetched | RemoteURL:
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._ssl_context,
            network_backend=_PinnedAsyncBackend(remote.host, addresses),
            http1=True,
            http2=False,
            max_connections=1,
        )
        try:
            transport = _PinnedAsyncTransport(pool)
            async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                response = await client.send(_request(remote, deadline, self.policy), stream=True)
                try:
                    following = _follow(remote, response, self.policy)
                    if following is not None:
                        return following
                    budget = _Budget(remote, self.policy)
                    budget.declared(response)
                    async for chunk in response.aiter_raw():
                        budget.add(chunk)
                    return 200, _headers(response), budget.body()
                finally:
                    await response.aclose()
        except _FAILURES as exc:
            raise _transport_error(remote, addresses, self.policy, exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RemoteFetcher is closed")


# -- pinning: connect to the checked address, keep the name everywhere else --------------


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the checked addresses of one host, never to anything it looks up."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host
        self._addresses = addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if host != self._host:
            raise httpcore.ConnectError(f"refusing to connect to unchecked host {host!r}")
        failure: httpcore.ConnectError | None = None
        for address in self._addresses:  # the next checked address only when one refuses
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError("no address")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")


class _PinnedAsyncBackend(httpcore.AnyIOBackend):
    """The async twin of :class:`_PinnedBackend`."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host
        self._addresses = addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host != self._host:
            raise httpcore.ConnectError(f"refusing to connect to unchecked host {host!r}")
        failure: httpcore.ConnectError | None = None
        for address in self._addresses:
            try:
                return await super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError("no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")


def _core_request(request: httpx.Request) -> httpcore.Request:
    # What httpx.HTTPTransport does, minus proxies: the request has no body (GET).
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        extensions=request.extensions,
    )


class _PinnedTransport(httpx.BaseTransport):
    def __init__(self, pool: httpcore.ConnectionPool) -> None:
        self._pool = pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._pool.handle_request(_core_request(request))
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


class _PinnedAsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:
        self._pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._pool.handle_async_request(_core_request(request))
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_AsyncResponseStream(response),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class _AsyncResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_stream():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


# -- one hop --------------------------------------------------------------------------------


def _request(remote: RemoteURL, deadline: float, policy: RemotePolicy) -> httpx.Request:
    remaining = _remaining(deadline, remote, policy)
    # Built directly (not client.build_request): no client default headers, no
    # cookie jar, no auth. httpx adds Host only.
    return httpx.Request(
        "GET",
        remote.url,
        headers=[
            ("User-Agent", policy.user_agent),
            ("Accept", "image/*"),
            ("Accept-Encoding", "identity"),
        ],
        extensions={
            "timeout": {
                "connect": min(policy.connect_timeout, remaining),
                "read": remaining,
                "write": remaining,
                "pool": remaining,
            }
        },
    )


def _follow(remote: RemoteURL, response: httpx.Response, policy: RemotePolicy) -> RemoteURL | None:
    """The checked next hop of a redirect, ``None`` for a 200; raises for anything else."""
    status = response.status_code
    if status in REDIRECT_STATUSES:
        location = response.headers.get("location", "").strip()
        if not location:
            raise InvalidImage(
                "remote_status",
                f"the remote host answered {status} without a Location",
                facts={"host": remote.host, "status": status, "why": "no_location"},
            )
        return check_url(urljoin(remote.url, location), policy)
    if status != 200:
        raise InvalidImage(
            "remote_status",
            f"the remote host answered {status}",
            facts={"host": remote.host, "status": status},
        )
    return None


class _Budget:
    """Counts the body against ``max_bytes`` (as core.BodyLimit does for app fills)."""

    def __init__(self, remote: RemoteURL, policy: RemotePolicy) -> None:
        self._host = remote.host
        self._limit = policy.max_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def declared(self, response: httpx.Response) -> None:
        length = response.headers.get("content-length", "").strip()
        if length.isascii() and length.isdigit() and int(length) > self._limit:
            raise self._too_large(int(length))

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            raise self._too_large(self._size)
        self._chunks.append(chunk)

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def _too_large(self, size: int) -> InvalidImage:
        return InvalidImage(
            "remote_too_large",
            "the remote body exceeds the size limit",
            facts={"host": self._host, "size": size, "limit": self._limit},
        )


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    # Latin-1 maps every byte: nothing is lost or invented.
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]


# -- hosts and addresses ----------------------------------------------------------------------


def _split_netloc(netloc: str, url: str) -> tuple[str, str]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _invalid(url, "unterminated IPv6 literal")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
    else:
        host, colon, port = netloc.partition(":")
        rest = colon + port
    if not rest:
        return host, ""
    if not rest.startswith(":"):
        raise _invalid(url, "garbage after the host")
    port_text = rest[1:]
    if port_text and not _PORT.fullmatch(port_text):
        raise _invalid(url, "invalid port")
    return host, port_text


def _normalise_host(text: str) -> tuple[str, IPAddress | None]:
    """The canonical host and, for an IP literal, its address; ValueError when ambiguous."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError as exc:
            raise ValueError("invalid IPv6 literal") from exc
        if ip6.scope_id:
            raise ValueError("IPv6 zone identifiers are not fetched")
        return str(ip6), ip6
    host = text
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError("invalid internationalised host name") from exc
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]  # the root label: "example.com." is "example.com"
    labels = host.split(".")
    # Checked after IDNA: UTS 46 maps full-width digits and dots to ASCII ones.
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # WHATWG reads such a host as IPv4 (2130706433, 0x7f000001, 0177.0.0.1,
        # 127.1); other parsers do not. Only the canonical dotted quad is accepted.
        if len(labels) != 4 or not all(_DOTTED_QUAD_PART.fullmatch(label) for label in labels):
            raise ValueError("ambiguous IPv4 address: only a canonical dotted quad is accepted")
        ip4 = ipaddress.IPv4Address(host)
        return str(ip4), ip4
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    return host, None


@lru_cache(maxsize=64)
def _host_patterns(hosts: tuple[str, ...]) -> tuple[bool, frozenset[str], tuple[str, ...]]:
    any_host = False
    exact: set[str] = set()
    suffixes: list[str] = []
    for raw in hosts:
        pattern = raw.strip()
        if pattern == "*":
            any_host = True
        elif pattern.startswith("*."):
            suffix, literal = _normalise_host(pattern[2:])
            if literal is not None:
                raise ValueError(f"host pattern {raw!r}: wildcards apply to names, not addresses")
            suffixes.append("." + suffix)
        else:
            if ":" in pattern and not pattern.startswith("["):
                pattern = f"[{pattern}]"  # a bare IPv6 literal
            try:
                exact.add(_normalise_host(pattern)[0])
            except ValueError as exc:
                raise ValueError(f"host pattern {raw!r}: {exc}") from exc
    return any_host, frozenset(exact), tuple(suffixes)


def _host_allowed(host: str, literal: IPAddress | None, hosts: tuple[str, ...]) -> bool:
    any_host, exact, suffixes = _host_patterns(hosts)
    if any_host or host in exact:
        return True
    return literal is None and any(host.endswith(suffix) for suffix in suffixes)


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_addresses(host: str, answers: list[str], allow_private: bool) -> list[str]:
    """All of *answers*, when every one is allowed: one bad answer refuses the host."""
    if not answers:
        raise InvalidImage(
            "remote_error", f"{host!r} has no address", facts={"host": host, "why": "no_address"}
        )
    for address in answers:
        why = address_blocked(address, allow_private=allow_private)
        if why is not None:
            raise Forbidden(
                "remote_address_blocked",
                f"{host!r} resolves to a blocked address",
                facts={"host": host, "address": address, "addresses": list(answers), "why": why},
            )
    return answers


# -- errors -------------------------------------------------------------------------------------


def _encode_non_ascii(text: str) -> str:
    return "".join(char if char.isascii() else quote(char, safe="") for char in text)


def _invalid(url: str, why: str) -> BadRequest:
    return BadRequest(
        "remote_url_invalid", f"the remote URL is invalid: {why}", facts={"url": url[:200], "why": why}
    )


def _remaining(deadline: float, remote: RemoteURL, policy: RemotePolicy) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(remote, policy)
    return remaining


def _timeout(
    remote: RemoteURL | None, policy: RemotePolicy, exc: BaseException | None = None
) -> InvalidImage:
    return InvalidImage(
        "remote_timeout",
        "the remote host did not answer in time",
        original_error=exc,
        facts={"host": remote.host if remote else None, "timeout": policy.timeout},
    )


def _too_many_redirects(remote: RemoteURL, policy: RemotePolicy) -> InvalidImage:
    return InvalidImage(
        "remote_status",
        "too many redirects",
        facts={"host": remote.host, "redirects": policy.max_redirects + 1, "limit": policy.max_redirects},
    )


def _dns_error(remote: RemoteURL, exc: OSError) -> InvalidImage:
    return InvalidImage(
        "remote_error",
        f"{remote.host!r} does not resolve",
        original_error=exc,
        facts={"host": remote.host, "why": "dns"},
    )


_TIMEOUTS: Final = (httpx.TimeoutException, httpcore.TimeoutException, TimeoutError)
#: What a broken or hostile remote host can raise (ssl.SSLError is an OSError).
_FAILURES: Final = (
    httpx.HTTPError,
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    OSError,
)


def _transport_error(
    remote: RemoteURL, addresses: list[str], policy: RemotePolicy, exc: Exception
) -> InvalidImage:
    if isinstance(exc, _TIMEOUTS):
        return _timeout(remote, policy, exc)
    # Connection refused, TLS failure, protocol error, reset: the host is unusable.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    return InvalidImage(
        "remote_error",
        "the remote host could not be fetched",
        original_error=exc,
        facts={"host": remote.host, "addresses": addresses, "why": "tls" if cause else type(exc).__name__},
    )
