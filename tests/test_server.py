"""A real gunicorn on 127.0.0.1 serving a guarded Flask app."""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.servers import free_port, gunicorn, running

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    with running(gunicorn("tests.apps.gunicorn_app:app", port), port):
        yield port


def fetch(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        # skip_host: the raw target and headers go out exactly as written.
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"127.0.0.1:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_polyglot_is_reencoded_over_http(port: int) -> None:
    status, headers, body = fetch(port, "/static/polyglot.png")
    assert status == 200
    assert headers["content-type"] == "image/png"
    assert headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in headers
    assert b"<script>" not in body
    assert Image.open(io.BytesIO(body)).size == (40, 30)


def test_html_declared_png_is_502_over_http(port: int) -> None:
    status, headers, _ = fetch(port, "/static/fake.png")
    assert (status, headers["x-imageguard-reason"], headers["cache-control"]) == (
        502,
        "not_image",
        "no-store",
    )


@pytest.mark.parametrize("target", ["/static/a%2fb.png", "/static/%2e%2e/x.png", "/static/a%252e.png"])
def test_encoded_paths_are_400_over_http(port: int, target: str) -> None:
    status, headers, _ = fetch(port, target)
    assert (status, headers["x-imageguard-reason"]) == (400, "bad_path")


def test_non_image_route_passes(port: int) -> None:
    status, headers, body = fetch(port, "/page")
    assert status == 200 and body == b"<h1>hello</h1>" and "set-cookie" in headers


def test_single_flight_across_server_threads(port: int) -> None:
    before = int(fetch(port, "/_calls")[2])
    with ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(lambda _: fetch(port, "/static/slow.jpg", {"X-Forwarded-Host": "evil"}), range(32))
        )
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1
    assert int(fetch(port, "/_calls")[2]) - before == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Oversized-Header", "A" * 20_000), ("X-Metachar", "\x07"), ("X-HTTP-Method-Override", "DELETE")],
    ids=["HHO", "HMC", "HMO"],
)
def test_cpdos_against_a_real_server(port: int, name: str, value: str) -> None:
    """[CPDoS] (Nguyen et al., CCS 2019) against gunicorn: whatever the server answers to an
    oversize header, a meta character or a method override, an answer from imageguard on a
    guarded path is no-store, and the next normal request gets the image."""
    status, headers, _ = fetch(port, "/static/polyglot.png", {name: value})
    if status != 200 and "x-imageguard-reason" in headers:
        assert headers["cache-control"] == "no-store"
    normal_status, normal_headers, body = fetch(port, "/static/polyglot.png")
    assert normal_status == 200 and normal_headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (40, 30)
