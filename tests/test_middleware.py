"""The behavioural suite: what a client of a guarded app receives.

One suite for every adapter: each test takes ``make_client`` and runs once per
adapter in ``ADAPTERS`` (the ASGI adapter joins with its own driver), so the
adapters cannot drift. Upstreams are real Flask and Starlette apps; assertions are on the
status, headers and bytes the client gets, re-parsed with Pillow.
"""

from __future__ import annotations

import io
import mimetypes
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, render_template_string
from PIL import Image

from imageguard import ImageGuard, Settings
from tests.drivers import MakeClient, Result, assert_clean_image, assert_rejected
from tests.support import OLD_SECRET, SECRET, Upstream, gif, jpeg, png, png_bomb, reopen

# -- serving -----------------------------------------------------------------------


def test_serves_a_reencoded_image_with_hardened_headers(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("red.png", png(64, 48), "image/png")
    client = make_client(upstream)
    result = client.get(path)
    image = assert_clean_image(result, "png")
    assert image.size == (64, 48)
    assert result.headers["Cross-Origin-Resource-Policy"] == "same-site"
    assert result.headers["Accept-Ranges"] == "none"


def test_second_request_is_a_hit(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.jpg", jpeg(), "image/jpeg")
    client = make_client(upstream)
    first, second = client.get(path), client.get(path)
    assert first.body == second.body
    assert first.headers["ETag"] == second.headers["ETag"]
    assert upstream.calls_to(path) == 1


def test_etag_304_and_head(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    head = client.request(path, method="HEAD")
    assert head.status == 200 and head.body == b""
    full = client.get(path)
    assert head.headers["Content-Length"] == str(len(full.body))
    assert head.headers["ETag"] == full.headers["ETag"]
    etag = full.headers["ETag"]
    for inm in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        cached = client.get(path, headers={"If-None-Match": inm})
        assert cached.status == 304, inm
        assert cached.body == b""
        assert cached.headers["ETag"] == etag
    assert client.get(path, headers={"If-None-Match": '"nope"'}).status == 200
    assert upstream.calls_to(path) == 1


def test_head_miss_fills_with_get(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    head = client.request(path, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert upstream.calls[-1]["method"] == "GET"
    assert client.get(path).headers["Content-Length"] == head.headers["Content-Length"]


def test_same_bytes_and_etag_across_instances(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.jpg", jpeg(200, 100), "image/jpeg")
    one, two = make_client(upstream), make_client(upstream)
    url = one.url(path, w=50)
    assert url == two.url(path, w=50)
    a, b = one.get(url), two.get(url)
    assert a.body == b.body and a.headers["ETag"] == b.headers["ETag"]


# -- polyglots and payloads ---------------------------------------------------------

HTML_PAYLOAD = b"<html><script>alert(document.domain)</script></html>"
JS_PAYLOAD = b"/*\x00*/alert('imageguard-js-payload')//"


def _jpeg_with_payloads() -> bytes:
    image = Image.new("RGB", (40, 30), (10, 200, 10))
    exif = Image.Exif()
    exif[0x010E] = "<script>alert('exif')</script>"  # ImageDescription
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), comment=b"<script>alert('com')</script>")
    data = out.getvalue()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><script>alert('xmp')</script></x:xmpmeta>"
    segment = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    return data[:2] + segment + data[2:]


def _gif_with_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("META-INF/MANIFEST.MF", "Main-Class: Evil\n")
        zf.writestr("Evil.class", b"\xca\xfe\xba\xbeimageguard-gifar")
    return gif(30, 20) + archive.getvalue()


POLYGLOTS = [
    pytest.param(
        "png+html.png",
        png(30, 20) + HTML_PAYLOAD,
        "image/png",
        "png",
        (30, 20),
        [HTML_PAYLOAD, b"<script>"],
        id="png-trailing-html",
    ),
    pytest.param(
        "png+js.png",
        png(30, 20) + JS_PAYLOAD,
        "image/png",
        "png",
        (30, 20),
        [JS_PAYLOAD, b"imageguard-js-payload"],
        id="png-trailing-js",
    ),
    pytest.param(
        "meta.jpg",
        _jpeg_with_payloads(),
        "image/jpeg",
        "jpeg",
        (40, 30),
        [b"alert('exif')", b"alert('com')", b"alert('xmp')", b"xmpmeta"],
        id="jpeg-exif-xmp-com",
    ),
    pytest.param(
        "gifar.gif",
        _gif_with_zip(),
        "image/gif",
        "gif",
        (30, 20),
        [b"PK\x03\x04", b"META-INF", b"imageguard-gifar"],
        id="gif-appended-zip",
    ),
]


@pytest.mark.parametrize(("name", "body", "declared", "fmt", "size", "payloads"), POLYGLOTS)
def test_polyglot_payloads_are_gone(
    make_client: MakeClient,
    upstream: Upstream,
    name: str,
    body: bytes,
    declared: str,
    fmt: str,
    size: tuple[int, int],
    payloads: list[bytes],
) -> None:
    for payload in payloads:
        assert payload in body  # the test input really carries it
    client = make_client(upstream)
    result = client.get(upstream.add(name, body, declared))
    image = assert_clean_image(result, fmt)
    assert image.size == size
    for payload in payloads:
        assert payload not in result.body
    assert not image.info.get("exif") and "comment" not in image.info and "xmp" not in image.info


# -- format confusion ----------------------------------------------------------------


def _tiff() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    return out.getvalue()


def _bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "BMP")
    return out.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    ("name", "body", "declared", "reason"),
    [
        pytest.param("x.png", HTML_PAYLOAD, "image/png", "not_image", id="html-as-png"),
        pytest.param("x.png", JS_PAYLOAD, "image/png", "not_image", id="js-as-png"),
        pytest.param("x.png", b"", "image/png", "not_image", id="empty"),
        pytest.param("x.jpg", png(), "image/jpeg", "type_mismatch", id="png-declared-jpeg"),
        pytest.param("x.png", png(), "text/html", "type_mismatch", id="png-declared-html"),
        pytest.param("x.png", png(), "application/octet-stream", "type_mismatch", id="png-declared-octets"),
        pytest.param("x.gif", jpeg(), "image/gif", "type_mismatch", id="jpeg-named-gif"),
        pytest.param("x.tif", _tiff(), "image/tiff", "format_not_allowed", id="tiff"),
        pytest.param("x.bmp", _bmp(), "image/bmp", "format_not_allowed", id="bmp"),
        pytest.param("x.png", _bmp(), "image/png", "format_not_allowed", id="bmp-declared-png"),
        pytest.param("x.eps", EPS, "application/postscript", "format_not_allowed", id="eps"),
        pytest.param("x.jpg", EPS, "image/jpeg", "format_not_allowed", id="eps-declared-jpeg"),
    ],
)
def test_format_confusion_is_refused(
    make_client: MakeClient, upstream: Upstream, name: str, body: bytes, declared: str, reason: str
) -> None:
    client = make_client(upstream)
    assert_rejected(client.get(upstream.add(name, body, declared)), 502, reason)


def test_format_outside_configured_allowlist(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, formats="jpeg,png")
    assert_rejected(client.get(upstream.add("a.gif", gif(), "image/gif")), 502, "format_not_allowed")
    assert client.get(upstream.add("a.png", png(), "image/png")).status == 200


# -- bombs and limits ---------------------------------------------------------------


def test_pixel_bomb_is_refused(make_client: MakeClient, upstream: Upstream) -> None:
    body = png_bomb(30000, 30000)
    assert len(body) < 5000
    client = make_client(upstream)
    assert_rejected(
        client.get(upstream.add("bomb.png", body, "image/png")), 502, {"too_many_pixels", "side_too_large"}
    )


def test_frame_bomb_is_refused(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    assert_rejected(
        client.get(upstream.add("frames.gif", gif(2, 2, frames=10_000), "image/gif")), 502, "too_many_frames"
    )


def test_second_frame_bomb_is_refused(make_client: MakeClient, upstream: Upstream, corpus_dir: Path) -> None:
    body = (corpus_dir / "pillow-tests-images/bombs/decompression_bomb_extents.gif").read_bytes()
    client = make_client(upstream)
    assert_rejected(
        client.get(upstream.add("extents.gif", body, "image/gif")), 502, {"too_many_pixels", "side_too_large"}
    )


def test_body_over_max_bytes(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, max_bytes="1KiB")
    big = jpeg(400, 400)
    assert len(big) > 1024
    assert_rejected(client.get(upstream.add("big.jpg", big, "image/jpeg")), 502, "too_large")
    assert client.get(upstream.add("small.png", png(4, 4), "image/png")).status == 200


def test_configured_pixel_limit(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, max_pixels=100 * 100)
    assert_rejected(client.get(upstream.add("a.png", png(101, 100), "image/png")), 502, "too_many_pixels")
    assert client.get(upstream.add("b.png", png(100, 100), "image/png")).status == 200


# -- query and path discipline --------------------------------------------------------


def test_signed_transform(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("wide.jpg", jpeg(400, 200), "image/jpeg")
    client = make_client(upstream)
    url = client.url(path, w=100, fmt="webp")
    image = assert_clean_image(client.get(url), "webp")
    assert image.size == (100, 50)
    assert upstream.calls[-1]["query"] == ""  # transforms never reach the app


def test_source_params_are_forwarded_keyed_and_nothing_else(
    make_client: MakeClient, upstream: Upstream
) -> None:
    # IMAGEGUARD_SOURCE_PARAMS: the named upstream parameters reach the app in one
    # canonical spelling and are part of the key; any other name is refused.
    path = upstream.add("v.png", png(40, 20), "image/png")
    client = make_client(upstream, source_params="v,lang")
    assert_clean_image(client.get(path + "?v=a+b%2Fc&lang=de"), "png")
    assert upstream.calls[-1]["query"] == "lang=de&v=a%20b%2Fc"  # sorted, one encoding
    assert_clean_image(client.get(path + "?lang=de&v=a%20b/c"), "png")  # the same value, spelled otherwise
    assert upstream.calls_to(path) == 1  # ... is the same entry
    assert_clean_image(client.get(path + "?v=2&lang=de"), "png")
    assert upstream.calls_to(path) == 2  # another value is another entry
    assert upstream.calls[-1]["query"] == "lang=de&v=2"
    assert_rejected(client.get(path + "?v=2&utm_source=x"), 400, "unknown_param")
    assert_rejected(client.get(path + "?v=2&v=3"), 400, "duplicate_param")
    signed = client.url(path, w=20, v="2")
    image = assert_clean_image(client.get(signed), "png")
    assert image.size == (20, 10)
    assert upstream.calls[-1]["query"] == "v=2"  # transforms stay out, the source value goes on
    assert_rejected(client.get(signed.replace("v=2", "v=3")), 403, "bad_signature")  # v is signed
    assert upstream.calls_to(path) == 3


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        pytest.param(lambda url: url.split("&s=")[0], "missing_signature", id="unsigned"),
        pytest.param(lambda url: url.replace("w=100", "w=101"), "bad_signature", id="tampered-w"),
        pytest.param(lambda url: url.replace("fmt=webp", "fmt=png"), "bad_signature", id="tampered-fmt"),
        pytest.param(
            lambda url: url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"),
            "bad_signature",
            id="forged-signature",
        ),
        pytest.param(lambda url: url.replace("/wide.jpg", "/other.jpg"), "bad_signature", id="other-path"),
    ],
)
def test_bad_signatures_are_403(
    make_client: MakeClient, upstream: Upstream, mutate: Callable[[str], str], reason: str
) -> None:
    path = upstream.add("wide.jpg", jpeg(400, 200), "image/jpeg")
    upstream.add("other.jpg", jpeg(10, 10), "image/jpeg")
    client = make_client(upstream)
    assert_rejected(client.get(mutate(client.url(path, w=100, fmt="webp"))), 403, reason)
    assert upstream.calls == []


def test_key_rotation_and_expiry(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.jpg", jpeg(200, 100), "image/jpeg")
    old = make_client(upstream, secret_key=OLD_SECRET)
    rotated = make_client(upstream, secret_key=f"{SECRET},{OLD_SECRET}")
    assert rotated.get(old.url(path, w=20)).status == 200
    assert rotated.url(path, w=20) != old.url(path, w=20)  # the new key signs
    assert_rejected(old.get(rotated.url(path, w=20)), 403, "bad_signature")
    assert_rejected(rotated.get(rotated.url(path, w=20, e=1_000_000_000)), 403, "expired_signature")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("utm_source=x", "unknown_param", id="unknown"),
        pytest.param("cb=123", "unknown_param", id="cache-buster"),
        pytest.param("W=100", "unknown_param", id="mixed-case-name"),
        pytest.param("w=100&w=100", "duplicate_param", id="duplicate"),
        pytest.param("w=100;h=100", "bad_query", id="semicolon"),
        pytest.param("w=100&amp;h=100", "bad_query", id="amp-entity"),
        pytest.param("w=100%26h=100", "bad_param_value", id="encoded-ampersand"),
        pytest.param("%77=100", "bad_query", id="encoded-name"),
        pytest.param("w", "bad_query", id="valueless"),
        pytest.param("w=100&", "bad_query", id="trailing-ampersand"),
        pytest.param("w=0320", "bad_param_value", id="non-canonical-int"),
        pytest.param("w=0", "bad_param_value", id="zero"),
        pytest.param("w=99999", "bad_param_value", id="over-max-side"),
        pytest.param("q=101", "bad_param_value", id="quality-range"),
        pytest.param("fmt=tiff", "bad_param_value", id="bad-format"),
        pytest.param("fit=cover", "bad_param_value", id="fit-without-box"),
    ],
)
def test_malformed_queries_are_400(
    make_client: MakeClient, upstream: Upstream, query: str, reason: str
) -> None:
    path = upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    assert_rejected(client.get(f"{path}?{query}"), 400, reason)
    assert upstream.calls == []


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/static/../static/a.png", id="dotdot"),
        pytest.param("/static/%2e%2e/static/a.png", id="encoded-dotdot"),
        pytest.param("/static/%2E%2E/static/a.png", id="encoded-dotdot-upper"),
        pytest.param("/static/a%2fb.png", id="encoded-slash"),
        pytest.param("/static/a%5cb.png", id="encoded-backslash"),
        pytest.param("/static/a%252e.png", id="double-encoding"),
        pytest.param("/static/a%00.png", id="nul"),
        pytest.param("/static/%61.png", id="encoded-unreserved"),
        pytest.param("/static//a.png", id="double-slash"),
        pytest.param("/static/a.png.", id="trailing-dot-segment"),
        pytest.param("/static/./a.png", id="dot-segment"),
        pytest.param("/static/a\\b.png", id="backslash"),
        pytest.param("/static/%ff.png", id="not-utf8"),
        pytest.param("/static/%zz.png", id="malformed-escape"),
        # Found by benchmarks/load.py: the app's own path joining (StaticFiles,
        # safe_join) reads these as /static/a.png, so they must not pass unguarded.
        pytest.param("/static/a.png/", id="trailing-slash"),
        pytest.param("/static/a.png/.", id="trailing-dot-segment-after-slash"),
        pytest.param("/static/a.png//", id="trailing-double-slash"),
        pytest.param("/static/a.png/%2e", id="trailing-encoded-dot"),
        pytest.param("/static/a.png%2f.", id="encoded-slash-then-dot"),
        pytest.param("/static/x/../a.png/.", id="dotdot-and-trailing-dot"),
    ],
)
def test_path_tricks_are_400(make_client: MakeClient, upstream: Upstream, raw: str) -> None:
    upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    assert_rejected(client.get(raw), 400, "bad_path")
    assert upstream.calls == []


def test_unicode_path_is_served(make_client: MakeClient, upstream: Upstream) -> None:
    upstream.add("café.png", png(), "image/png")
    client = make_client(upstream)
    assert client.get("/static/caf%C3%A9.png").status == 200


# -- unkeyed inputs never reach the upstream ----------------------------------------------

HOSTILE_HEADERS = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Scheme": "nothttps",
    "X-Forwarded-Proto": "http",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Host": "evil.example",
    "Forwarded": "host=evil.example",
    "X-HTTP-Method-Override": "POST",
    "X-Method-Override": "DELETE",
    "Cookie": "session=victim",
    "Authorization": "Bearer victim",
    "Range": "bytes=0-10",
    "If-Modified-Since": "Wed, 21 Oct 2015 07:28:00 GMT",
    "Accept-Encoding": "gzip",
    "Host": "evil.example",
}


def test_unkeyed_headers_never_reach_the_upstream(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(20, 20), "image/png")
    client = make_client(upstream)
    attacked = client.get(path, headers=HOSTILE_HEADERS)
    assert attacked.status == 200
    seen = {k.lower() for k in upstream.calls[0]["headers"]}
    for name in HOSTILE_HEADERS:
        if name != "Host":
            assert name.lower() not in seen, name
    assert upstream.calls[0]["host"] != "evil.example"
    assert upstream.calls[0]["method"] == "GET"
    clean = client.get(path)
    assert clean.body == attacked.body  # the poisoned-looking request cached clean bytes
    reference = make_client(Upstream(files=dict(upstream.files))).get(path)
    assert reference.body == clean.body


def test_fat_get_body_never_reaches_the_upstream(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    assert (
        client.request(path, data=b"x=1&_method=POST", headers={"Content-Type": "text/plain"}).status == 200
    )
    assert upstream.calls[0]["body"] == b""


def test_other_methods_pass_through(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.png", png(), "image/png")
    client = make_client(upstream)
    assert client.request(path, method="POST").status == 405  # the app's own answer
    assert client.request(path, method="DELETE").status == 405


# -- upstream answers that are not images --------------------------------------------------


def test_upstream_404_passes_with_no_store(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    result = client.get("/static/missing.png")
    assert result.status == 404
    assert result.body == b"no such image"
    assert result.headers["Cache-Control"] == "no-store"
    assert result.headers["X-Content-Type-Options"] == "nosniff"
    assert "Set-Cookie" not in result.headers  # the app set one: a guarded path never does
    client.get("/static/missing.png")
    assert upstream.calls_to("/static/missing.png") == 2  # never cached


def test_upstream_exception_is_502(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    assert_rejected(client.get("/raise.png"), 502, "upstream_error")


def test_content_encoded_upstream_is_refused(make_client: MakeClient, upstream: Upstream) -> None:
    upstream.extra_headers["Content-Encoding"] = "gzip"
    client = make_client(upstream)
    assert_rejected(client.get(upstream.add("a.png", png(), "image/png")), 502, "unsupported_encoding")


def test_last_modified_is_the_only_upstream_header_kept(make_client: MakeClient, upstream: Upstream) -> None:
    upstream.extra_headers.update(
        {
            "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
            "X-Powered-By": "php",
            "Content-Disposition": "attachment; filename=x.html",
        }
    )
    client = make_client(upstream)
    result = client.get(upstream.add("a.png", png(), "image/png"))
    assert result.headers["Last-Modified"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert "X-Powered-By" not in result.headers
    assert "Content-Disposition" not in result.headers


# -- concurrency ----------------------------------------------------------------------------


def test_single_flight_32_threads(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("cold.jpg", jpeg(300, 200), "image/jpeg")
    upstream.delay = threading.Event()
    client = make_client(upstream)
    barrier = threading.Barrier(33)
    results: list[Result] = []
    lock = threading.Lock()

    def fetch() -> None:
        barrier.wait()
        result = client.get(path)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=fetch) for _ in range(32)]
    for thread in threads:
        thread.start()
    barrier.wait()
    threading.Timer(0.5, upstream.delay.set).start()  # let every thread reach the flight
    for thread in threads:
        thread.join(30)
    assert len(results) == 32
    assert {r.status for r in results} == {200}
    assert len({r.body for r in results}) == 1
    assert upstream.calls_to(path) == 1


def test_single_flight_shares_a_rejection(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("bad.png", HTML_PAYLOAD, "image/png")
    upstream.delay = threading.Event()
    client = make_client(upstream)
    results: list[Result] = []
    threads = [threading.Thread(target=lambda: results.append(client.get(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    threading.Timer(0.3, upstream.delay.set).start()
    for thread in threads:
        thread.join(30)
    assert [r.reason for r in results] == ["not_image"] * 8


# -- purge -------------------------------------------------------------------------------


def test_purge_path_and_all(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.jpg", jpeg(200, 100), "image/jpeg")
    client = make_client(upstream)
    plain, small = path, client.url(path, w=20)
    client.get(plain), client.get(small)
    assert upstream.calls_to(path) == 2
    assert client.guard.purge(path=path) == 2
    client.get(plain), client.get(small)
    assert upstream.calls_to(path) == 4
    client.guard.purge_all()
    client.get(small)
    assert upstream.calls_to(path) == 5


# -- Flask integration ------------------------------------------------------------------


def test_non_image_routes_are_byte_for_byte_unchanged(upstream: Upstream) -> None:
    bare = upstream.app().test_client()
    guarded_app = upstream.app()
    ImageGuard(guarded_app, settings=Settings(secret_key=SECRET))
    guarded = guarded_app.test_client()
    for method, url in [
        ("GET", "/page"),
        ("GET", "/page?x=1&y=;"),
        ("GET", "/api/data.json"),
        ("POST", "/api/data.json"),
        ("GET", "/nowhere"),
        ("GET", "/_calls"),
    ]:
        a, b = bare.open(url, method=method), guarded.open(url, method=method)
        assert (a.status, a.get_data()) == (b.status, b.get_data()), url
        assert sorted(a.headers.items()) == sorted(b.headers.items()), url


def test_flask_init_app_template_global_and_app_config(upstream: Upstream) -> None:
    app = upstream.app()
    app.config["IMAGEGUARD_SECRET_KEY"] = SECRET
    app.config["IMAGEGUARD_PATHS"] = "/static/"
    guard = ImageGuard()
    guard.init_app(app)
    assert app.extensions["imageguard"] is guard
    upstream.add("a.jpg", jpeg(200, 100), "image/jpeg")
    with app.test_request_context():
        url = render_template_string("{{ image_url('/static/a.jpg', w=50, fmt='png') }}")
    assert url.startswith("/static/a.jpg?fmt=png&amp;w=50&amp;s=")  # autoescaped in HTML
    response = app.test_client().get(url.replace("&amp;", "&"))
    assert response.status_code == 200
    assert reopen(response.get_data()).size == (50, 25)


def test_paths_setting_limits_what_is_guarded(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, paths="/media/")
    path = upstream.add("x.png", HTML_PAYLOAD, "image/png")
    assert client.get(path).body == HTML_PAYLOAD  # outside the guarded prefix: not ours


def test_flask_run_style_app_module(tmp_path: Path) -> None:
    # What `flask --app app run` imports: a module-level Flask app wrapped by ImageGuard.
    from examples.flask_app import create_app

    app: Flask = create_app(Settings(secret_key=SECRET))
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and b"landscape.jpg" in page.get_data()
    guard = app.extensions["imageguard"]
    response = client.get(guard.url("/static/images/landscape.jpg", w=160, fmt="webp"))
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/webp"
    assert reopen(response.get_data()).size[0] == 160


# -- the shared corpus, end to end ---------------------------------------------------------

RASTER_SETS = [
    "pillow-tests-images",
    "pngsuite",
    "image-png-bugfixes",
    "payloadsallthethings",
    "h5sc-html5sec/attachments",
]
RASTER_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".ico",
    ".icns",
    ".psd",
    ".eps",
    ".blp",
    ".dds",
    ".fli",
    ".sgi",
    ".pcx",
    ".tga",
    ".jp2",
    ".j2k",
    ".avif",
    ".mpo",
    ".rgb",
    ".bw",
    ".ras",
    ".xbm",
    ".ppm",
    ".pgm",
    ".im",
}


def _corpus_files(corpus: Path) -> Iterator[Path]:
    for name in RASTER_SETS:
        for path in sorted((corpus / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in RASTER_SUFFIXES:
                yield path


@pytest.mark.corpus
@pytest.mark.timeout(600)
def test_every_corpus_raster_is_clean_or_refused(make_client: MakeClient, corpus_dir: Path) -> None:
    from PIL import EpsImagePlugin

    EpsImagePlugin.gs_binary = False  # corpus rule 3: never run Ghostscript
    upstream = Upstream()
    client = make_client(upstream)
    seen = 0
    for path in _corpus_files(corpus_dir):
        declared = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        name = f"{seen}{path.suffix.lower()}"
        result = client.get(upstream.add(name, path.read_bytes(), declared))
        seen += 1
        label = path.relative_to(corpus_dir)
        assert result.status in (200, 502), (label, result.status)
        if result.status == 502:
            assert result.reason, label
            assert result.headers["Cache-Control"] == "no-store", label
            continue
        assert result.headers["X-Content-Type-Options"] == "nosniff", label
        image = reopen(result.body)
        assert result.headers["Content-Type"] == Image.MIME[image.format], label
        for marker in (b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"Exif\x00\x00", b"<x:xmpmeta"):
            assert marker not in result.body, (label, marker)
    assert seen > 300


PLUGIN_PROBE = r"""
import json, sys
from pathlib import Path
from PIL import BmpImagePlugin, PpmImagePlugin
opened = []
def spy_on(cls, name):
    original = cls._open
    def spy(self):
        opened.append(name)
        return original(self)
    cls._open = spy
# Pillow imports these two itself (Image.preinit); every other plugin must not even load.
spy_on(BmpImagePlugin.BmpImageFile, "BMP")
spy_on(PpmImagePlugin.PpmImageFile, "PPM")
from imageguard import ImageGuard, Settings
payloads = {p.name: p.read_bytes() for p in Path(sys.argv[1]).iterdir()}
def upstream(environ, start_response):
    start_response("200 OK", [("Content-Type", "image/png")])
    return [payloads[environ["PATH_INFO"].lstrip("/")[:-4]]]
guard = ImageGuard(upstream, settings=Settings(secret_key="probe-secret-key-0123456789"))
statuses = {}
for name in payloads:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/" + name + ".png", "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.input": None}
    seen = []
    b"".join(guard(environ, lambda status, headers, exc=None: seen.append((status, dict(headers)))))
    statuses[name] = [seen[0][0], seen[0][1].get("X-ImageGuard-Reason")]
plugins = sorted(m for m in sys.modules if m.startswith("PIL.") and m.endswith("ImagePlugin"))
print(json.dumps({"statuses": statuses, "plugins": plugins, "opened": opened}))
"""


#: Formats Pillow can write that imageguard never reads; each is served as ``x.png``.
FOREIGN_FORMATS = (
    "TIFF", "ICO", "BMP", "BLP", "DDS", "ICNS", "IM", "JPEG2000", "MSP", "PCX", "PPM", "QOI", "SGI",
    "SPIDER", "TGA", "XBM", "PDF",
)  # fmt: skip


def test_other_pillow_plugins_never_run(tmp_path: Path) -> None:
    # In a fresh interpreter: serve bytes of every format Pillow writes but we do not
    # read, plus hand-made EPS, PSD and FLI headers, all declared as PNG under a .png
    # name; every one is refused, and no plugin of those formats is imported or run.
    import json
    import subprocess
    import sys

    def written(fmt: str) -> bytes:
        for mode in ("RGB", "P", "L", "1"):  # the first mode the writer takes
            out = io.BytesIO()
            try:
                Image.new(mode, (16, 16)).save(out, fmt)
            except (OSError, ValueError, KeyError):
                continue
            return out.getvalue()
        raise AssertionError(f"Pillow cannot write {fmt} here")

    payloads = {fmt.lower(): written(fmt) for fmt in FOREIGN_FORMATS}
    payloads["eps"] = EPS
    payloads["psd"] = (
        b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03"
    )
    # FLI: a 128-byte header with the magic 0xAF11 at offset 4 (Pillow cannot write one).
    payloads["fli"] = (
        (128).to_bytes(4, "little") + b"\x11\xaf" + b"\x01\x00\x10\x00\x10\x00\x08\x00" + b"\x00" * 118
    )
    folder = tmp_path / "payloads"
    folder.mkdir()
    for name, body in payloads.items():
        (folder / name).write_bytes(body)
    done = subprocess.run(
        [sys.executable, "-c", PLUGIN_PROBE, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in payloads:  # recognised but not allowed, or not recognised at all
        status, reason = report["statuses"][name]
        assert status == "502 Bad Gateway" and reason in {"format_not_allowed", "not_image"}, (name, reason)
    # Only the plugins of the formats we read (and Pillow's own preinit set) are loaded.
    allowed = {f"PIL.{p}ImagePlugin" for p in ("Bmp", "Gif", "Jpeg", "Ppm", "Png", "WebP", "Avif")}
    assert set(report["plugins"]) <= allowed, sorted(set(report["plugins"]) - allowed)
    assert report["opened"] == []  # BMP's and PPM's plugins are imported by Pillow, but never ran


def test_outer_middleware_side_data_never_reaches_the_fill(upstream: Upstream) -> None:
    # An outer layer (auth, ProxyFix) leaves per-client data in the environ; the
    # fill must not carry it, or it could change an entry that does not key it.
    seen: list[dict[str, Any]] = []
    body = png(8, 8)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "image/png")])
        return [body]

    guard = ImageGuard(app, settings=Settings(secret_key=SECRET))

    def outer(environ: dict[str, Any], start_response: Any) -> Any:
        environ["REMOTE_USER"] = "alice"
        environ["werkzeug.proxy_fix.orig"] = {"HTTP_X_FORWARDED_HOST": "evil"}
        environ["myauth.user"] = "alice"
        return guard(environ, start_response)

    from werkzeug.test import Client

    assert Client(outer).get("/a.png").status_code == 200
    (environ,) = seen
    assert "REMOTE_USER" not in environ and "myauth.user" not in environ
    assert "werkzeug.proxy_fix.orig" not in environ
    assert environ["REQUEST_METHOD"] == "GET" and environ["wsgi.url_scheme"] == "http"


# -- SVG ----------------------------------------------------------------------------------

SCRIPTED_SVG = (
    b'<?xml version="1.0"?>\n'
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
    b'width="10" height="10" onload="alert(1)">'
    b"<script>alert(document.cookie)</script>"
    b'<rect id="r" width="10" height="10" fill="red" onclick="alert(2)"/>'
    b'<a xlink:href="javascript:alert(3)"><use xlink:href="#r"/></a>'
    b'<foreignObject><body xmlns="http://www.w3.org/1999/xhtml"><img src="x" onerror="alert(4)"/></body>'
    b"</foreignObject></svg>"
)


def test_svg_is_sanitized_and_sandboxed(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    result = client.get(upstream.add("x.svg", SCRIPTED_SVG, "image/svg+xml"))
    assert result.status == 200, (result.status, result.reason)
    assert result.headers["Content-Type"] == "image/svg+xml"
    assert result.headers["X-Content-Type-Options"] == "nosniff"
    assert (
        result.headers["Content-Security-Policy"] == "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    )
    body = result.body.lower()
    for forbidden in (
        b"<script",
        b"onload",
        b"onclick",
        b"onerror",
        b"javascript:",
        b"foreignobject",
        b"<!doctype",
        b"alert(",
    ):
        assert forbidden not in body, forbidden
    assert b"<rect" in body and b'href="#r"' in body  # the drawing survives
    from xml.etree import ElementTree

    assert ElementTree.fromstring(result.body).tag == "{http://www.w3.org/2000/svg}svg"


def test_svg_reject_mode(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, svg="reject")
    assert_rejected(client.get(upstream.add("x.svg", SCRIPTED_SVG, "image/svg+xml")), 502, "svg_not_allowed")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(
            b'<!DOCTYPE svg [<!ENTITY x "y">]><svg xmlns="http://www.w3.org/2000/svg">&x;</svg>',
            "svg_entities_forbidden",
            id="entity",
        ),
        pytest.param(
            b'<svg xmlns="http://www.w3.org/2000/svg"><rect></svg>', "svg_malformed", id="malformed"
        ),
        pytest.param(
            b'<svg xmlns="http://www.w3.org/1999/xhtml"><rect/></svg>', "svg_not_svg", id="xhtml-root"
        ),
        pytest.param(b"<html><svg/></html>", "not_image", id="html-root"),
    ],
)
def test_bad_svg_is_refused(make_client: MakeClient, upstream: Upstream, body: bytes, reason: str) -> None:
    client = make_client(upstream)
    assert_rejected(client.get(upstream.add("x.svg", body, "image/svg+xml")), 502, reason)


def test_svg_limits_and_transforms(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream, max_svg_bytes="1KiB")
    big = b'<svg xmlns="http://www.w3.org/2000/svg">' + b"<g/>" * 400 + b"</svg>"
    assert_rejected(client.get(upstream.add("big.svg", big, "image/svg+xml")), 502, "too_large")
    small = upstream.add("small.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><g/></svg>', "image/svg+xml")
    assert client.get(small).status == 200
    assert_rejected(client.get(client.url(small, w=10)), 502, "svg_transform_unsupported")


def test_svg_without_xmlns_is_read_as_svg(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    body = b'<svg width="4" height="4" onload="alert(1)"><rect width="4" height="4" aria-label="x"/></svg>'
    result = client.get(upstream.add("bare.svg", body, "image/svg+xml"))
    assert result.status == 200
    assert result.body.startswith(b'<svg xmlns="http://www.w3.org/2000/svg"')
    assert b"onload" not in result.body and b'aria-label="x"' in result.body


def test_svg_declared_as_png_is_a_mismatch(make_client: MakeClient, upstream: Upstream) -> None:
    client = make_client(upstream)
    assert_rejected(client.get(upstream.add("x.png", SCRIPTED_SVG, "image/png")), 502, "type_mismatch")


# -- IMAGEGUARD_NEGOTIATE ----------------------------------------------------------------


def test_negotiated_format_is_keyed_and_varies(make_client: MakeClient, upstream: Upstream) -> None:
    from imageguard.raster import OUTPUT_AVAILABLE

    path = upstream.add("a.jpg", jpeg(60, 40), "image/jpeg")
    client = make_client(upstream, negotiate=True)
    best = "avif" if "avif" in OUTPUT_AVAILABLE else "webp"
    cases = [
        ("image/avif,image/webp,image/*,*/*;q=0.8", f"image/{best}"),
        ("image/webp,*/*", "image/webp"),
        ("image/avif;q=0,image/webp;q=0.5", "image/webp"),
        ("image/*,*/*", "image/jpeg"),
        (None, "image/jpeg"),
    ]
    for accept, expected in cases:
        result = client.get(path, headers={"Accept": accept} if accept else {})
        assert result.status == 200, accept
        assert result.headers["Content-Type"] == expected, accept
        assert result.headers["Vary"] == "Accept"
        assert reopen(result.body).size == (60, 40)
    calls = upstream.calls_to(path)
    assert calls == len({expected for _, expected in cases})  # one fill per variant, not per header
    again = client.get(path, headers={"Accept": "image/webp,*/*"})
    assert again.headers["Content-Type"] == "image/webp" and upstream.calls_to(path) == calls
    etag = again.headers["ETag"]
    assert client.get(path, headers={"Accept": "image/webp", "If-None-Match": etag}).status == 304
    signed = client.get(client.url(path, fmt="png"), headers={"Accept": "image/webp"})
    assert signed.headers["Content-Type"] == "image/png"  # a signed fmt wins over Accept


def test_negotiation_off_ignores_accept(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("a.jpg", jpeg(), "image/jpeg")
    client = make_client(upstream)
    result = client.get(path, headers={"Accept": "image/avif,image/webp"})
    assert result.headers["Content-Type"] == "image/jpeg" and "Vary" not in result.headers


def test_negotiation_leaves_svg_alone(make_client: MakeClient, upstream: Upstream) -> None:
    path = upstream.add("x.svg", SCRIPTED_SVG, "image/svg+xml")
    client = make_client(upstream, negotiate=True)
    result = client.get(path, headers={"Accept": "image/webp,*/*"})
    assert result.status == 200 and result.headers["Content-Type"] == "image/svg+xml"
