"""The remote fetcher (imageguard.remote) against real origins on 127.0.0.0/8 and ::1.

No test sends a packet outside loopback: the autouse ``connections`` fixture wraps
httpcore's network backends, records every TCP connection and refuses (and fails
the test on) any address outside 127.0.0.0/8 and ::1. Every fetcher test runs
twice, through ``fetch`` (WSGI) and ``fetch_async`` (ASGI).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpcore
import pytest

import imageguard.remote
from imageguard.errors import Rejected
from imageguard.remote import (
    RemoteFetcher,
    RemotePolicy,
    address_blocked,
    check_url,
)
from tests.apps.remote_origin import HTML, HUGE, PNG, Origin
from tests.servers import free_port

pytestmark = pytest.mark.timeout(30)

UA = "imageguard-test/1.0"
#: Exactly what the fetcher sends (plus Host).
SENT = {"user-agent": UA, "accept": "image/*", "accept-encoding": "identity"}

Fetch = Callable[..., tuple[int, list[tuple[str, str]], bytes]]


def local(**overrides: Any) -> RemotePolicy:
    """The policy that may reach the loopback origin."""
    settings: dict[str, Any] = {
        "hosts": ("127.0.0.1",),
        "schemes": frozenset({"http"}),
        "allow_private": True,
        "user_agent": UA,
        "timeout": 10.0,
    }
    return RemotePolicy(**{**settings, **overrides})


def public(**overrides: Any) -> RemotePolicy:
    """The production-like policy: any host, private addresses refused."""
    settings: dict[str, Any] = {"hosts": ("*",), "schemes": frozenset({"http", "https"}), "user_agent": UA}
    return RemotePolicy(**{**settings, **overrides})


def refused(fetch: Fetch, policy: RemotePolicy, url: str) -> Rejected:
    with pytest.raises(Rejected) as info:
        fetch(policy, url)
    return info.value


# -- fixtures ---------------------------------------------------------------------------------


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every TCP connection attempted through httpcore; anything off loopback is refused."""
    seen: list[tuple[str, int]] = []
    sync_connect = httpcore.SyncBackend.connect_tcp
    async_connect = httpcore.AnyIOBackend.connect_tcp

    def guard(host: str, port: int) -> None:
        seen.append((host, port))
        if not _loopback(host):
            raise httpcore.ConnectError(f"test guard: {host} is not a loopback address")

    def connect(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        guard(host, port)
        return sync_connect(self, host, port, *args, **kwargs)

    async def aconnect(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        guard(host, port)
        return await async_connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", aconnect)
    yield seen
    assert [c for c in seen if not _loopback(c[0])] == [], "a connection left loopback"


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((host, port))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def origins() -> Iterator[dict[str, Origin | None]]:
    """Origins on 127.0.0.1, 127.0.0.2 and (when the host has IPv6) ::1, one port for all."""
    for _attempt in range(20):
        port = free_port()
        if _bindable("127.0.0.2", port):
            break
    else:  # pragma: no cover
        pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")
    started: dict[str, Origin | None] = {
        "127.0.0.1": Origin("127.0.0.1", port),
        "127.0.0.2": Origin("127.0.0.2", port),
        "::1": Origin("::1", port) if _bindable("::1", port) else None,
    }
    try:
        yield started
    finally:
        for origin in started.values():
            if origin is not None:
                origin.stop()


@pytest.fixture
def origin(origins: dict[str, Origin | None]) -> Origin:
    for started in origins.values():
        if started is not None:
            started.clear()
    first = origins["127.0.0.1"]
    assert first is not None
    return first


@pytest.fixture
def second(origins: dict[str, Origin | None], origin: Origin) -> Origin:
    started = origins["127.0.0.2"]
    assert started is not None
    return started


@pytest.fixture(params=["sync", "async"])
def fetch(request: pytest.FixtureRequest) -> Fetch:
    """``fetch(policy, url)`` through RemoteFetcher.fetch or, under anyio.run, fetch_async."""

    def run(policy: RemotePolicy, url: str) -> tuple[int, list[tuple[str, str]], bytes]:
        fetcher = RemoteFetcher(policy)
        if request.param == "sync":
            try:
                return fetcher.fetch(url)
            finally:
                fetcher.close()

        async def fetch_async() -> tuple[int, list[tuple[str, str]], bytes]:
            try:
                return await fetcher.fetch_async(url)
            finally:
                await fetcher.aclose()

        return anyio.run(fetch_async)

    run.mode = request.param  # type: ignore[attr-defined]
    return run


# -- a good fetch and what is sent ------------------------------------------------------------


def test_good_fetch_sends_exactly_our_headers(fetch: Fetch, origin: Origin) -> None:
    status, headers, body = fetch(local(), f"http://127.0.0.1:{origin.port}/good.png")
    assert (status, body) == (200, PNG)
    assert ("Content-Type", "image/png") in headers
    [seen] = origin.seen
    assert (seen.method, seen.path) == ("GET", "/good.png")
    assert seen.headers == {**SENT, "host": f"127.0.0.1:{origin.port}"}


def test_a_cookie_set_on_a_redirect_is_not_sent_on(fetch: Fetch, origin: Origin) -> None:
    status, _, body = fetch(local(), f"http://127.0.0.1:{origin.port}/cookie")
    assert (status, body) == (200, PNG)
    assert origin.paths() == ["/cookie", "/echo-headers"]
    for seen in origin.seen:
        assert seen.headers == {**SENT, "host": f"127.0.0.1:{origin.port}"}


def test_content_encoding_is_returned_untouched(fetch: Fetch, origin: Origin) -> None:
    # Accept-Encoding: identity was asked for; a gzip body comes back as sent
    # (headers and bytes), and the core refuses it.
    status, headers, body = fetch(local(), f"http://127.0.0.1:{origin.port}/gzip")
    assert status == 200
    assert ("Content-Encoding", "gzip") in headers
    assert body[:2] == b"\x1f\x8b"


def test_html_declared_as_png_is_returned(fetch: Fetch, origin: Origin) -> None:
    # The fetcher moves bytes; judging them is the core's job (it sniffs the
    # magic bytes and answers 502). Here it must come back unchanged.
    status, headers, body = fetch(local(), f"http://127.0.0.1:{origin.port}/html")
    assert (status, body) == (200, HTML)
    assert ("Content-Type", "image/png") in headers


# -- SSRF: every spelling of loopback and metadata is refused before connecting ------------

REFUSED = [
    ("http://127.0.0.1:{port}/good.png", 403, "remote_address_blocked"),
    ("http://localhost:{port}/good.png", 403, "remote_address_blocked"),
    ("http://[::1]:{port}/good.png", 403, "remote_address_blocked"),
    ("http://169.254.169.254/latest/meta-data/", 403, "remote_address_blocked"),
    ("http://0.0.0.0:{port}/good.png", 403, "remote_address_blocked"),
    ("http://[::ffff:127.0.0.1]:{port}/good.png", 403, "remote_address_blocked"),
    ("http://[::ffff:7f00:1]:{port}/good.png", 403, "remote_address_blocked"),
    ("http://[64:ff9b::7f00:1]:{port}/good.png", 403, "remote_address_blocked"),
    ("http://[fd00:ec2::254]/latest/meta-data/", 403, "remote_address_blocked"),
    (
        "http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11:{port}/good.png",
        403,
        "remote_address_blocked",
    ),
    ("http://2130706433:{port}/good.png", 400, "remote_url_invalid"),
    ("http://0x7f000001:{port}/good.png", 400, "remote_url_invalid"),
    ("http://017700000001:{port}/good.png", 400, "remote_url_invalid"),
    ("http://127.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://0177.0.0.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://127.0.0.01:{port}/good.png", 400, "remote_url_invalid"),
    ("http://0x7f.0.0.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://%31%32%37.0.0.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://[fe80::1%25lo]:{port}/good.png", 400, "remote_url_invalid"),
    ("https://good.com@127.0.0.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://user:pw@127.0.0.1:{port}/good.png", 400, "remote_url_invalid"),
    ("http://127.0.0.1:{port}\\@good.com/good.png", 400, "remote_url_invalid"),
    ("ftp://127.0.0.1:{port}/good.png", 403, "remote_scheme_not_allowed"),
    ("file:///etc/passwd", 400, "remote_url_invalid"),
    ("gopher://127.0.0.1:{port}/_", 403, "remote_scheme_not_allowed"),
]


@pytest.mark.parametrize(("url", "status", "reason"), REFUSED, ids=[case[0] for case in REFUSED])
def test_loopback_and_metadata_are_refused_without_a_connection(
    fetch: Fetch,
    origins: dict[str, Origin | None],
    origin: Origin,
    connections: list[tuple[str, int]],
    url: str,
    status: int,
    reason: str,
) -> None:
    error = refused(fetch, public(), url.format(port=origin.port))
    assert (error.status, error.reason) == (status, reason)
    assert connections == []
    assert all(o is None or o.seen == [] for o in origins.values())


ADDRESSES = [
    # (address, allow_private, why)
    ("8.8.8.8", False, None),
    ("2606:4700::1", False, None),
    ("64:ff9b::808:808", False, None),  # NAT64 of a public address
    ("2002:808:808::1", False, None),  # 6to4 of a public address
    ("127.0.0.1", False, "loopback"),
    ("127.255.0.1", False, "loopback"),
    ("::1", False, "loopback"),
    ("10.0.0.1", False, "private"),
    ("172.16.0.1", False, "private"),
    ("192.168.1.1", False, "private"),
    ("fc00::1", False, "private"),
    ("fd12:3456::1", False, "private"),
    ("fec0::1", False, "private"),
    ("100.64.0.1", False, "cgnat"),
    ("169.254.1.1", False, "link_local"),
    ("fe80::1", False, "link_local"),
    ("224.0.0.1", False, "multicast"),
    ("ff02::1", False, "multicast"),
    ("240.0.0.1", False, "reserved"),
    ("255.255.255.255", False, "reserved"),
    ("192.0.2.1", False, "private"),
    ("2001:db8::1", False, "private"),
    ("::ffff:10.0.0.1", False, "private"),
    ("::ffff:127.0.0.1", False, "loopback"),
    ("64:ff9b::7f00:1", False, "loopback"),
    ("2002:7f00:1::", False, "loopback"),
    ("::7f00:1", False, "loopback"),
    ("0.0.0.0", False, "unspecified"),
    ("0.1.2.3", False, "unspecified"),
    ("::", False, "unspecified"),
    ("169.254.169.254", False, "metadata"),
    ("fd00:ec2::254", False, "metadata"),
    ("not an address", False, "invalid"),
    # allow_private opens loopback and private networks, never metadata or unspecified
    ("127.0.0.1", True, None),
    ("::1", True, None),
    ("10.0.0.1", True, None),
    ("100.64.0.1", True, None),
    ("fc00::1", True, None),
    ("169.254.1.1", True, None),
    ("169.254.169.254", True, "metadata"),
    ("169.254.170.2", True, "metadata"),
    ("fd00:ec2::254", True, "metadata"),
    ("::ffff:169.254.169.254", True, "metadata"),
    ("64:ff9b::a9fe:a9fe", True, "metadata"),
    ("0.0.0.0", True, "unspecified"),
    ("::", True, "unspecified"),
    ("::ffff:0.0.0.0", True, "unspecified"),
]


@pytest.mark.parametrize(
    ("address", "allow_private", "why"),
    ADDRESSES,
    ids=[f"{a}-{'private' if p else 'public'}" for a, p, _ in ADDRESSES],
)
def test_address_policy(address: str, allow_private: bool, why: str | None) -> None:
    assert address_blocked(address, allow_private=allow_private) == why


# -- URL checks (no I/O) ------------------------------------------------------------------------

HOSTS = [
    # (allowlist, url, allowed)
    (("*.example.com",), "https://a.example.com/x.png", True),
    (("*.example.com",), "https://a.b.example.com/x.png", True),
    (("*.example.com",), "https://example.com/x.png", False),
    (("*.example.com",), "https://evilexample.com/x.png", False),
    (("*.example.com",), "https://a.example.com.evil.net/x.png", False),
    (("*.example.com",), "https://A.EXAMPLE.COM./x.png", True),
    (("*.EXAMPLE.com.",), "https://a.example.com/x.png", True),
    (("img.example.com",), "https://img.example.com/x.png", True),
    (("img.example.com",), "https://IMG.Example.Com:443/x.png", True),
    (("img.example.com",), "https://img.example.com./x.png", True),
    (("img.example.com",), "https://a.img.example.com/x.png", False),
    (("example.com.",), "https://example.com/x.png", True),
    (("*",), "https://anything.test/x.png", True),
    (("*",), "https://8.8.8.8/x.png", True),
    (("bücher.example",), "https://BÜCHER.example/x.png", True),
    (("xn--bcher-kva.example",), "https://bücher.example/x.png", True),
    (("*.bücher.example",), "https://img.xn--bcher-kva.example/x.png", True),
    (("8.8.8.8",), "https://8.8.8.8/x.png", True),
    (("2606:4700::1",), "https://[2606:4700:0::1]/x.png", True),
    (("[2606:4700::1]",), "https://[2606:4700::1]/x.png", True),
    (("*.example.com",), "https://8.8.8.8/x.png", False),
    ((), "https://img.example.com/x.png", False),
]


@pytest.mark.parametrize(("hosts", "url", "allowed"), HOSTS, ids=[f"{h}-{u}" for h, u, _ in HOSTS])
def test_host_allowlist(hosts: tuple[str, ...], url: str, allowed: bool) -> None:
    policy = RemotePolicy(hosts=hosts)
    if allowed:
        check_url(url, policy)
    else:
        with pytest.raises(Rejected) as info:
            check_url(url, policy)
        assert (info.value.status, info.value.reason) == (403, "remote_host_not_allowed")


NORMALISED = [
    ("HTTPS://IMG.Example.COM./a/b.png?x=1#frag", "https://img.example.com/a/b.png?x=1", 443, "/a/b.png?x=1"),
    ("https://img.example.com:443", "https://img.example.com/", 443, "/"),
    ("https://img.example.com:8443/a", "https://img.example.com:8443/a", 8443, "/a"),
    ("https://bücher.example/ä.png", "https://xn--bcher-kva.example/%C3%A4.png", 443, "/%C3%A4.png"),
    ("https://[2606:4700:0:0::1]/a", "https://[2606:4700::1]/a", 443, "/a"),
]


@pytest.mark.parametrize(("url", "normal", "port", "target"), NORMALISED, ids=[c[0] for c in NORMALISED])
def test_urls_are_normalised(url: str, normal: str, port: int, target: str) -> None:
    checked = check_url(url, public())
    assert (checked.url, checked.port, checked.target) == (normal, port, target)


INVALID = [
    "img.example.com/x.png",
    "//img.example.com/x.png",
    "#https://img.example.com/x.png",
    "https:///x.png",
    "https://",
    "https://img.example.com\\x.png",
    "https://img.example.com/x .png",
    "https://img.example.com/x\t.png",
    "https://img.example.com/x\n.png",
    " https://img.example.com/x.png",
    "https://img.example.com/x\x00.png",
    "https://img.example.com:99999/x.png",
    "https://img.example.com:0/x.png",
    "https://img.example.com:80x/x.png",
    "https://[::1/x.png",
    "https://[img.example.com]/x.png",
    "https://img..example.com/x.png",
    "https://-img.example.com/x.png",
    "https://img.example.123/x.png",
    "https://img.example.0x1f/x.png",
    "https://1.2.3.4.5/x.png",
    "https://good.com@img.example.com/x.png",
    "https://:pw@img.example.com/x.png",
    "https://img%2eexample.com/x.png",
]


@pytest.mark.parametrize("url", INVALID)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(Rejected) as info:
        check_url(url, public())
    assert (info.value.status, info.value.reason) == (400, "remote_url_invalid")


def test_policy_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RemotePolicy(hosts=("*",), schemes=frozenset({"ftp"}))
    with pytest.raises(ValueError, match="host pattern"):
        RemotePolicy(hosts=("*.127.0.0.1",))
    with pytest.raises(ValueError, match="host pattern"):
        RemotePolicy(hosts=("bad host",))
    with pytest.raises(ValueError):
        RemotePolicy(hosts=("*",), max_redirects=-1)


# -- redirects --------------------------------------------------------------------------------------


def test_a_redirect_chain_within_the_limit(fetch: Fetch, origin: Origin) -> None:
    status, _, body = fetch(local(max_redirects=3), f"http://127.0.0.1:{origin.port}/redirect/2")
    assert (status, body) == (200, PNG)
    assert origin.paths() == ["/redirect/2", "/redirect/1", "/redirect/0", "/good.png"]


def test_one_redirect_too_many(fetch: Fetch, origin: Origin) -> None:
    error = refused(fetch, local(max_redirects=3), f"http://127.0.0.1:{origin.port}/redirect/3")
    assert (error.status, error.reason) == (502, "remote_status")
    assert error.facts["redirects"] == 4
    assert len(origin.seen) == 4  # the fifth request is never made


def test_a_redirect_loop(fetch: Fetch, origin: Origin) -> None:
    error = refused(fetch, local(), f"http://127.0.0.1:{origin.port}/loop")
    assert (error.status, error.reason) == (502, "remote_status")
    assert origin.paths() == ["/loop"] * 4


def test_a_redirect_without_location(fetch: Fetch, origin: Origin) -> None:
    error = refused(fetch, local(), f"http://127.0.0.1:{origin.port}/no-location")
    assert (error.status, error.reason, error.facts["status"]) == (502, "remote_status", 302)


def test_a_final_status_other_than_200(fetch: Fetch, origin: Origin) -> None:
    error = refused(fetch, local(), f"http://127.0.0.1:{origin.port}/missing.png")
    assert (error.status, error.reason, error.facts["status"]) == (502, "remote_status", 404)


def to(origin: Origin, location: str) -> str:
    return f"http://127.0.0.1:{origin.port}/to?location={quote(location, safe='')}"


def test_a_redirect_to_metadata_is_refused(
    fetch: Fetch, origin: Origin, connections: list[tuple[str, int]]
) -> None:
    error = refused(fetch, local(hosts=("*",)), to(origin, "http://169.254.169.254/latest/meta-data/"))
    assert (error.status, error.reason) == (403, "remote_address_blocked")
    assert error.facts["why"] == "metadata"
    assert connections == [("127.0.0.1", origin.port)]


@pytest.fixture
def origin_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge 127.0.0.1 as a public address, so allow_private=False can reach the origin."""
    real = imageguard.remote.address_blocked

    def blocked(address: str, *, allow_private: bool) -> str | None:
        return None if address == "127.0.0.1" else real(address, allow_private=allow_private)

    monkeypatch.setattr(imageguard.remote, "address_blocked", blocked)


@pytest.mark.usefixtures("origin_is_public")
@pytest.mark.parametrize(
    ("location", "status", "reason"),
    [
        ("http://[::1]:{port}/good.png", 403, "remote_address_blocked"),
        ("http://127.0.0.2:{port}/good.png", 403, "remote_address_blocked"),
        ("http://[::ffff:127.0.0.2]:{port}/good.png", 403, "remote_address_blocked"),
        ("http://2130706434:{port}/good.png", 400, "remote_url_invalid"),
        ("ftp://127.0.0.1:{port}/good.png", 403, "remote_scheme_not_allowed"),
        ("http://127.0.0.1:{port}\\@evil/good.png", 400, "remote_url_invalid"),
    ],
)
def test_a_redirect_to_loopback_is_refused(
    fetch: Fetch,
    origins: dict[str, Origin | None],
    origin: Origin,
    connections: list[tuple[str, int]],
    location: str,
    status: int,
    reason: str,
) -> None:
    error = refused(fetch, public(), to(origin, location.format(port=origin.port)))
    assert (error.status, error.reason) == (status, reason)
    assert connections == [("127.0.0.1", origin.port)]
    assert origin.paths() == ["/to"]
    assert all(o is None or o.seen == [] for o in (origins["127.0.0.2"], origins["::1"]))


def test_a_redirect_to_a_host_not_allowed(
    fetch: Fetch, origin: Origin, monkeypatch: pytest.MonkeyPatch, connections: list[tuple[str, int]]
) -> None:
    looked_up: list[str] = []
    monkeypatch.setattr(imageguard.remote, "resolve", lambda host, port: looked_up.append(host) or [])
    error = refused(fetch, local(), to(origin, f"http://other.test:{origin.port}/good.png"))
    assert (error.status, error.reason) == (403, "remote_host_not_allowed")
    assert error.facts["host"] == "other.test"
    assert (looked_up, connections) == ([], [("127.0.0.1", origin.port)])


# -- limits and failures --------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_reading(fetch: Fetch, origin: Origin) -> None:
    # The origin sends 8 bytes of its 50 MB and stalls for 10 s: reading the body
    # would end in remote_timeout, not remote_too_large.
    error = refused(fetch, local(timeout=5.0), f"http://127.0.0.1:{origin.port}/huge")
    assert (error.status, error.reason) == (502, "remote_too_large")
    assert error.facts["size"] == HUGE


def test_a_streamed_body_over_the_limit_stops_reading(fetch: Fetch, origin: Origin) -> None:
    error = refused(fetch, local(max_bytes=100_000), f"http://127.0.0.1:{origin.port}/huge-chunked")
    assert (error.status, error.reason) == (502, "remote_too_large")
    assert 100_000 < int(str(error.facts["size"])) <= 100_000 + 65536 + 16384
    assert error.facts["limit"] == 100_000


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_the_total_timeout(fetch: Fetch, origin: Origin, path: str) -> None:
    # /slow-body sends a byte every 0.2 s: no read times out, the total does.
    error = refused(fetch, local(timeout=1.0), f"http://127.0.0.1:{origin.port}{path}")
    assert (error.status, error.reason) == (502, "remote_timeout")
    assert error.facts["host"] == "127.0.0.1"


def test_connection_refused(fetch: Fetch) -> None:
    port = free_port()  # nothing listens there
    error = refused(fetch, local(), f"http://127.0.0.1:{port}/good.png")
    assert (error.status, error.reason) == (502, "remote_error")


def test_a_name_that_does_not_resolve(fetch: Fetch, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(imageguard.remote, "resolve", fail)
    error = refused(fetch, local(hosts=("nowhere.test",)), "http://nowhere.test/good.png")
    assert (error.status, error.reason, error.facts["why"]) == (502, "remote_error", "dns")


# -- DNS: one lookup, every answer checked, the connection pinned -----------------------------------


class Rebinder:
    """A resolver that answers 127.0.0.1 first and 127.0.0.2 ever after (a rebinding attack)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []
        self.threads: set[int] = set()

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        self.threads.add(threading.get_ident())
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def test_the_connection_goes_to_the_checked_address(
    fetch: Fetch, origin: Origin, second: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    rebinder = Rebinder(["127.0.0.1"], ["127.0.0.2"])
    monkeypatch.setattr(imageguard.remote, "resolve", rebinder)
    status, _, body = fetch(local(hosts=("rebind.test",)), f"http://rebind.test:{origin.port}/good.png")
    assert (status, body) == (200, PNG)
    assert rebinder.calls == [("rebind.test", origin.port)]
    [seen] = origin.seen
    assert seen.headers["host"] == f"rebind.test:{origin.port}"
    assert second.seen == []
    if fetch.mode == "async":  # type: ignore[attr-defined]
        # The lookup ran in a worker thread, not on the event loop.
        assert threading.get_ident() not in rebinder.threads


def test_each_hop_is_resolved_once(
    fetch: Fetch, origin: Origin, second: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    rebinder = Rebinder(["127.0.0.1"], ["127.0.0.2"])
    monkeypatch.setattr(imageguard.remote, "resolve", rebinder)
    status, _, _ = fetch(local(hosts=("rebind.test",)), f"http://rebind.test:{origin.port}/redirect/0")
    assert status == 200
    # One lookup per hop, and each hop connects to what its lookup answered.
    assert rebinder.calls == [("rebind.test", origin.port)] * 2
    assert (origin.paths(), second.paths()) == (["/redirect/0"], ["/good.png"])


@pytest.mark.parametrize(
    ("answers", "allow_private", "why"),
    [
        (["127.0.0.1", "169.254.169.254"], True, "metadata"),
        (["8.8.8.8", "127.0.0.1"], False, "loopback"),
        (["2606:4700::1", "::ffff:10.0.0.1"], False, "private"),
        (["127.0.0.1", "0.0.0.0"], True, "unspecified"),
    ],
)
def test_one_blocked_answer_refuses_the_host(
    fetch: Fetch,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    connections: list[tuple[str, int]],
    answers: list[str],
    allow_private: bool,
    why: str,
) -> None:
    monkeypatch.setattr(imageguard.remote, "resolve", Rebinder(answers))
    policy = local(hosts=("mixed.test",), allow_private=allow_private)
    error = refused(fetch, policy, f"http://mixed.test:{origin.port}/good.png")
    assert (error.status, error.reason, error.facts["why"]) == (403, "remote_address_blocked", why)
    assert (connections, origin.seen) == ([], [])


# -- TLS: the pinned connection still verifies the name -------------------------------------------


def _certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a leaf certificate for *name*, signed by it: (ca.pem, leaf.pem, leaf.key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("imageguard test CA", ca_key, "imageguard test CA", ca_key, ca=True)
    leaf = build(name, leaf_key, "imageguard test CA", ca_key, ca=False)
    paths = (directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.mark.parametrize(("certificate_for", "verified"), [("rebind.test", True), ("other.test", False)])
def test_tls_verifies_the_name_not_the_pinned_address(
    fetch: Fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, certificate_for: str, verified: bool
) -> None:
    ca, leaf, key = _certificates(tmp_path, certificate_for)
    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)  # type: ignore[assignment, func-returns-value]
    server = Origin("127.0.0.1", free_port(), ssl_context=context)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # honoured by the fetcher's SSL context
        monkeypatch.setattr(imageguard.remote, "resolve", Rebinder(["127.0.0.1"]))
        policy = local(hosts=("rebind.test",), schemes=frozenset({"https"}))
        url = f"https://rebind.test:{server.port}/good.png"
        if verified:
            status, _, body = fetch(policy, url)
            assert (status, body) == (200, PNG)
            assert server.seen[0].headers["host"] == f"rebind.test:{server.port}"
        else:
            error = refused(fetch, policy, url)
            assert (error.status, error.reason, error.facts["why"]) == (502, "remote_error", "tls")
            assert "Hostname mismatch" in repr(error.original_error)
            assert server.seen == []
        assert server_names and set(server_names) == {"rebind.test"}  # SNI carries the name
    finally:
        server.stop()
