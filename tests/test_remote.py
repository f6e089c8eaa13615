"""The remote (proxy) route through both adapters, against a real origin on 127.0.0.1.

A signed ``url`` is fetched (SSRF checks in ``imageguard.remote``, tested on
their own in tests/test_remote_fetch.py), then goes through the same pipeline
and tiers as a local image. Nothing here sends traffic outside 127.0.0.0/8.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request as WerkzeugRequest
from werkzeug.wrappers import Response as WerkzeugResponse

from imageguard.cli import main
from tests.drivers import MakeClient, assert_clean_image, assert_rejected
from tests.servers import free_port
from tests.support import SECRET, Upstream, png

pytestmark = pytest.mark.timeout(60)

HTML = b"<html><script>alert(document.domain)</script></html>"


@dataclass
class Origin:
    """A real HTTP server on 127.0.0.1 that records what it is asked."""

    port: int
    seen: list[str] = field(default_factory=list)
    files: dict[str, tuple[bytes, str, int]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = WerkzeugRequest(environ)
        self.seen.append(request.path)
        name = request.path.lstrip("/")
        if name == "slow.png":
            time.sleep(3)
        body, content_type, status = self.files.get(name, (b"not here", "text/plain", 404))
        return WerkzeugResponse(body, status=status, content_type=content_type)(environ, start_response)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    served = Origin(free_port())
    served.files.update(
        {
            "red.png": (png(40, 20, colour=(255, 0, 0)), "image/png", 200),
            "html.png": (HTML, "image/png", 200),
            "big.png": (png(10, 10) + b"\0" * 300_000, "image/png", 200),
            "slow.png": (png(10, 10), "image/png", 200),
        }
    )
    server = make_server("127.0.0.1", served.port, served, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served
    server.shutdown()


def remote_client(make_client: MakeClient, **settings: Any) -> Any:
    settings = {
        "remote_hosts": "127.0.0.1",
        "remote_schemes": "http",
        "remote_allow_private": True,
        **settings,
    }
    return make_client(Upstream(), **settings)


def test_a_signed_remote_image_is_fetched_reencoded_and_cached(
    make_client: MakeClient, origin: Origin
) -> None:
    client = remote_client(make_client)
    url = client.url(remote=origin.url("red.png"), w=20)
    assert url.startswith("/_imageguard/remote?url=http%3A%2F%2F127.0.0.1%3A")
    before = len(origin.seen)
    image = assert_clean_image(client.get(url), "png")
    assert image.size == (20, 10) and image.convert("RGB").getpixel((1, 1)) == (255, 0, 0)
    assert_clean_image(client.get(url), "png")
    assert origin.seen[before:] == ["/red.png"]  # one fetch; the second request was a hit


@pytest.mark.parametrize("signing", ["transforms", "off"])
def test_the_remote_url_is_always_signed(make_client: MakeClient, origin: Origin, signing: str) -> None:
    client = remote_client(make_client, signing=signing)
    signed = client.url(remote=origin.url("red.png"))
    assert "&s=" in signed or "?s=" in signed
    before = len(origin.seen)
    unsigned = signed.split("&s=")[0]
    assert_rejected(client.get(unsigned), 403, "missing_signature")
    tampered = signed.replace("red.png", "html.png")
    assert_rejected(client.get(tampered), 403, "bad_signature")
    other = client.url(remote=origin.url("red.png"), w=10).replace("w=10", "w=11")
    assert_rejected(client.get(other), 403, "bad_signature")
    assert origin.seen[before:] == []


def test_a_host_off_the_allowlist_is_refused(make_client: MakeClient, origin: Origin) -> None:
    broad = remote_client(make_client, remote_hosts="127.0.0.1,*.example.com")
    narrow = remote_client(make_client, remote_hosts="img.example.com")
    with pytest.raises(ValueError, match="remote_host_not_allowed"):
        narrow.url(remote=origin.url("red.png"))
    before = len(origin.seen)
    assert_rejected(narrow.get(broad.url(remote=origin.url("red.png"))), 403, "remote_host_not_allowed")
    assert origin.seen[before:] == []


def test_a_private_address_is_refused_without_a_connection(make_client: MakeClient, origin: Origin) -> None:
    permissive = remote_client(make_client, remote_hosts="*")
    strict = remote_client(make_client, remote_hosts="*", remote_allow_private=False)
    before = len(origin.seen)
    for url in (origin.url("red.png"), f"http://localhost:{origin.port}/red.png"):
        assert_rejected(strict.get(permissive.url(remote=url)), 403, "remote_address_blocked")
    assert origin.seen[before:] == []


@pytest.mark.parametrize(
    ("name", "status", "reasons", "settings"),
    [
        pytest.param("html.png", 502, {"not_image", "type_mismatch"}, {}, id="html-as-png"),
        pytest.param("missing.png", 502, {"remote_status"}, {}, id="404"),
        pytest.param("big.png", 502, {"remote_too_large"}, {"max_bytes": "100KiB"}, id="too-large"),
        pytest.param("slow.png", 502, {"remote_timeout"}, {"remote_timeout": 1}, id="slow"),
    ],
)
def test_bad_remote_answers_are_502_and_never_cached(
    make_client: MakeClient,
    origin: Origin,
    name: str,
    status: int,
    reasons: set[str],
    settings: dict[str, Any],
) -> None:
    client = remote_client(make_client, **settings)
    url = client.url(remote=origin.url(name))
    first = client.get(url)
    assert_rejected(first, status, reasons)
    assert HTML not in first.body
    assert_rejected(client.get(url), status, reasons)  # refused again, not served from a cache


def test_purge_a_remote_image(make_client: MakeClient, origin: Origin) -> None:
    client = remote_client(make_client)
    url = client.url(remote=origin.url("red.png"), w=8)
    assert_clean_image(client.get(url), "png")
    assert client.guard.purge(remote=origin.url("red.png")) == 1
    before = len(origin.seen)
    assert_clean_image(client.get(url), "png")
    assert origin.seen[before:] == ["/red.png"]


def test_without_remote_hosts_the_route_is_not_ours(make_client: MakeClient, origin: Origin) -> None:
    client = make_client(Upstream())  # IMAGEGUARD_REMOTE_HOSTS unset
    with pytest.raises(ValueError, match="not enabled"):
        client.url(remote=origin.url("red.png"))
    answer = client.get("/_imageguard/remote?url=x")
    assert answer.status == 404 and answer.reason is None  # the app's own 404, not imageguard's


def test_sign_remote_on_the_command_line(
    origin: Origin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from imageguard import Settings
    from imageguard.core import Core

    for name, value in {
        "IMAGEGUARD_SECRET_KEY": SECRET,
        "IMAGEGUARD_REMOTE_HOSTS": "127.0.0.1",
        "IMAGEGUARD_REMOTE_SCHEMES": "http",
        "IMAGEGUARD_REMOTE_ALLOW_PRIVATE": "on",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["sign", "--remote", origin.url("red.png"), "--w", "20"]) == 0
    settings = Settings(
        secret_key=SECRET, remote_hosts="127.0.0.1", remote_schemes="http", remote_allow_private=True
    )
    assert capsys.readouterr().out.strip() == Core(settings, lower=()).url(remote=origin.url("red.png"), w=20)
    assert main(["sign"]) == 2
