"""The web-cache-poisoning battery, against a real Flask app (WSGI) and a real FastAPI
app (ASGI) through the same ``make_client`` fixture.

Sources named in each test:

* [PWCP] James Kettle, "Practical Web Cache Poisoning", PortSwigger Research, 2018.
* [WCE] James Kettle, "Web Cache Entanglement: Novel Pathways to Poisoning",
  PortSwigger Research, 2020.
* [CPDoS] H. V. Nguyen, L. Lo Iacono, H. Federrath, "Your Cache Has Fallen:
  Cache-Poisoned Denial-of-Service Attack", ACM CCS 2019.

Every attack is followed by a clean request, which must get the clean cached
image: the attack neither changed the entry nor got an error stored.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.drivers import MakeClient, Result, assert_rejected
from tests.support import OLD_SECRET, SECRET, Upstream, jpeg, png, reopen

CLEAN = png(24, 16)


@pytest.fixture
def victim(upstream: Upstream) -> Upstream:
    upstream.add("logo.png", CLEAN, "image/png")
    upstream.add("photo.jpg", jpeg(120, 80), "image/jpeg")
    upstream.strict = True  # fails on oversize/meta-character headers and method overrides
    return upstream


def reference(victim: Upstream, make_client: MakeClient, url: str) -> bytes:
    """What a fresh instance serves for *url* to a clean request."""
    fresh = make_client(Upstream(files=dict(victim.files)))
    return fresh.get(url).body


def assert_clean_follow_up(client: Any, url: str, expected: bytes) -> Result:
    result = client.get(url)
    assert result.status == 200, (result.status, result.reason)
    assert result.body == expected
    assert result.headers["Cache-Control"] == "public, max-age=86400"
    return result


# -- unkeyed inputs ----------------------------------------------------------------------

UNKEYED = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Scheme": "nothttps",
    "X-Forwarded-Proto": "http",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Host": "evil.example",
    "Forwarded": "for=1.2.3.4;host=evil.example;proto=http",
}


@pytest.mark.parametrize(("header", "value"), UNKEYED.items(), ids=list(UNKEYED))
def test_unkeyed_header(make_client: MakeClient, victim: Upstream, header: str, value: str) -> None:
    """[PWCP] unkeyed headers (X-Forwarded-Host, X-Forwarded-Scheme, X-Original-URL ...) that an
    origin reflects into a cached response. The upstream here appends them to the image bytes
    when it receives them; it never does, so the cached bytes are the clean ones."""
    client = make_client(victim)
    url = "/static/logo.png"
    attacked = client.get(url, headers={header: value})
    assert attacked.status == 200
    assert header.lower() not in {k.lower() for k in victim.calls[0]["headers"]}
    assert value.encode() not in attacked.body
    expected = reference(victim, make_client, url)
    assert attacked.body == expected
    assert_clean_follow_up(client, url, expected)
    assert victim.calls_to(url) == 1


# -- method override and fat GET ------------------------------------------------------------


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"])
def test_method_override_header(make_client: MakeClient, victim: Upstream, header: str) -> None:
    """[CPDoS] HTTP Method Override (HMO): the origin honours an override header and answers an
    error the cache stores. The override never reaches the origin; the image is served."""
    client = make_client(victim)
    url = "/static/logo.png"
    attacked = client.get(url, headers={header: "DELETE"})
    assert attacked.status == 200 and reopen(attacked.body).size == (24, 16)
    assert_clean_follow_up(client, url, attacked.body)


def test_method_override_parameter(make_client: MakeClient, victim: Upstream) -> None:
    """[WCE] `_method=` parameter override: an unknown parameter is refused (400, no-store) and
    never keyed or forwarded."""
    client = make_client(victim)
    assert_rejected(client.get("/static/logo.png?_method=DELETE"), 400, "unknown_param")
    assert victim.calls == []
    assert_clean_follow_up(client, "/static/logo.png", reference(victim, make_client, "/static/logo.png"))


def test_fat_get(make_client: MakeClient, victim: Upstream) -> None:
    """[WCE] fat GET: a body on a GET request that the origin reads as parameters. The fill is a
    bare GET without a body."""
    client = make_client(victim)
    attacked = client.request(
        "/static/logo.png",
        data=b"_method=POST&w=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert attacked.status == 200
    assert victim.calls[0]["body"] == b"" and victim.calls[0]["method"] == "GET"
    assert_clean_follow_up(client, "/static/logo.png", attacked.body)


# -- parameter cloaking, cache busters, encoded paths -------------------------------------------

CLOAKS = {
    "semicolon": ("w=10;utm_content=x", "bad_query"),
    "amp-entity": ("w=10&amp;h=5", "bad_query"),
    "duplicate": ("w=10&w=20", "duplicate_param"),
    "encoded-ampersand": ("w=10%26h=5", "bad_param_value"),
    "mixed-case-name": ("W=10", "unknown_param"),
    "cache-buster": ("cb=1234", "unknown_param"),
    "utm": ("utm_source=mail", "unknown_param"),
}


@pytest.mark.parametrize(("query", "reason"), CLOAKS.values(), ids=list(CLOAKS))
def test_parameter_cloaking_and_busters(
    make_client: MakeClient, victim: Upstream, query: str, reason: str
) -> None:
    """[WCE] parameter cloaking (`;`, `&amp;`, `%26`, duplicates, case) and [PWCP] cache busters /
    UTM parameters: anything but the canonical, known parameters is 400, never a new entry."""
    client = make_client(victim)
    assert_rejected(client.get(f"/static/logo.png?{query}"), 400, reason)
    assert victim.calls == []
    assert_clean_follow_up(client, "/static/logo.png", reference(victim, make_client, "/static/logo.png"))


@pytest.mark.parametrize(
    "raw",
    [
        "/static/logo%2epng",
        "/static/%2e%2e/static/logo.png",
        "/static/logo.png%252e",
        "/static%2flogo.png",
        "/static//logo.png",
        "/static/logo.png.",
        "/static/logo.png..",
        "/static/logo.png;.css",
        "/static/logo.png;jsessionid=1",
        "/static\\logo.png",
        "/static./logo.png",
    ],
)
def test_encoded_path_variants(make_client: MakeClient, victim: Upstream, raw: str) -> None:
    """[WCE] path normalisation differences (`%2e`, `%252e`, `%2f`, `//`, trailing dots, `;` path
    parameters, backslashes) between the cache and the origin: refused once, up front, so no
    variant addresses an entry or reaches the origin unvalidated."""
    client = make_client(victim)
    assert_rejected(client.get(raw), 400, "bad_path")
    assert victim.calls == []
    assert_clean_follow_up(client, "/static/logo.png", reference(victim, make_client, "/static/logo.png"))


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=0-10"},
        {"If-None-Match": '"stale"'},
        {"If-Modified-Since": "Wed, 21 Oct 2099 07:28:00 GMT"},
    ],
    ids=["range", "if-none-match", "if-modified-since"],
)
def test_conditional_and_range_on_the_fill(
    make_client: MakeClient, victim: Upstream, headers: dict[str, str]
) -> None:
    """[CPDoS]/[PWCP] a Range or conditional header on the request that fills the cache makes the
    origin answer 206/304, which gets stored. The fill never carries them."""
    client = make_client(victim)
    attacked = client.get("/static/logo.png", headers=headers)
    assert attacked.status == 200
    seen = {k.lower() for k in victim.calls[0]["headers"]}
    assert not seen & {k.lower() for k in headers}
    assert_clean_follow_up(client, "/static/logo.png", attacked.body)


# -- CPDoS --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Oversized-Header-1": "A" * 20_000},
        {"X-Metachar-Header": "\x07"},
        {"X-HTTP-Method-Override": "POST"},
    ],
    ids=["HHO", "HMC", "HMO"],
)
def test_cpdos(make_client: MakeClient, victim: Upstream, headers: dict[str, str]) -> None:
    """[CPDoS] HTTP Header Oversize, HTTP Meta Character and HTTP Method Override: the origin
    (strict here) would answer 400/405 and a cache would store it. The header never reaches the
    origin, and whatever imageguard itself answers on a guarded path is no-store."""
    client = make_client(victim)
    attacked = client.get("/static/logo.png", headers=headers)
    # The strict origin answers 400/405 if the header reaches it: it never does.
    assert attacked.status == 200, (attacked.status, attacked.reason)
    (name,) = headers
    assert name.lower() not in {k.lower() for k in victim.calls[0]["headers"]}
    assert_clean_follow_up(client, "/static/logo.png", reference(victim, make_client, "/static/logo.png"))


def test_origin_error_is_never_cached(make_client: MakeClient, victim: Upstream) -> None:
    """[CPDoS] whatever error the origin answers is passed on with no-store and not stored: once
    the origin recovers, the next normal request is served normally."""
    client = make_client(victim)
    original = victim.files.pop("logo.png")
    error = client.get("/static/logo.png")
    assert error.status == 404 and error.headers["Cache-Control"] == "no-store"
    victim.files["logo.png"] = original
    assert client.get("/static/logo.png").status == 200


# -- signatures ---------------------------------------------------------------------------------


def test_signature_battery(make_client: MakeClient, victim: Upstream) -> None:
    """[PWCP] parameter tampering: clients must not mint variants. Forged, truncated, wrong-key,
    removed-key, expired, replayed-on-another-path and extended URLs are 403; an old key that is
    still listed verifies (rotation); reordered parameters address the same entry."""
    rotated = make_client(victim, secret_key=f"{SECRET},{OLD_SECRET}")
    old = make_client(victim, secret_key=OLD_SECRET)
    new_only = make_client(victim, secret_key=SECRET)
    stranger = make_client(victim, secret_key="someone-elses-key-0123456789")
    url = rotated.url("/static/photo.jpg", w=60, fmt="png")
    path, _, query = url.partition("?")
    signature = query.rsplit("s=", 1)[1]

    good = rotated.get(url)
    assert good.status == 200 and reopen(good.body).size == (60, 40)
    reordered = "&".join(reversed(query.split("&")))
    assert rotated.get(f"{path}?{reordered}").body == good.body
    assert victim.calls_to(path) == 1  # same entry: reordering is not a new key
    assert rotated.get(old.url("/static/photo.jpg", w=60, fmt="png")).status == 200  # old key listed

    forged = {
        "forged": url.replace(signature, signature[::-1]),
        "truncated": url[:-4],
        "wrong-key": stranger.url("/static/photo.jpg", w=60, fmt="png"),
        "replayed-on-other-path": url.replace("/static/photo.jpg", "/static/logo.png"),
        "param-added": f"{path}?{query}&h=10",
        "param-changed": url.replace("w=60", "w=61"),
        "param-removed": url.replace("fmt=png&", ""),
    }
    for name, bad in forged.items():
        result = rotated.get(bad)
        assert result.status in (400, 403), name
        assert result.headers["Cache-Control"] == "no-store", name
        if name != "param-added":
            assert result.reason == "bad_signature", (name, result.reason)
    removed = old.url("/static/photo.jpg", w=30)
    assert_rejected(new_only.get(removed), 403, "bad_signature")  # the old key was removed
    assert_rejected(
        rotated.get(rotated.url("/static/photo.jpg", w=60, e=1_000_000_000)), 403, "expired_signature"
    )
    assert rotated.get(url).body == good.body  # the entry is untouched


# -- Host keying and start-up warnings ---------------------------------------------------------


def test_key_hosts(make_client: MakeClient, victim: Upstream) -> None:
    """[PWCP] Host-based poisoning in multi-tenant setups: with IMAGEGUARD_KEY_HOSTS the host is
    part of the key and forwarded; any other Host is 400. Without it (test_unkeyed_header and
    test_middleware), the client's Host never reaches the origin."""
    client = make_client(victim, key_hosts="a.example,b.example")
    url = "/static/logo.png"
    assert client.get(url, headers={"Host": "a.example"}).status == 200
    assert victim.calls[-1]["host"] == "a.example"
    assert client.get(url, headers={"Host": "B.example"}).status == 200
    assert victim.calls_to(url) == 2  # one entry per tenant
    assert client.get(url, headers={"Host": "a.example"}).status == 200
    assert victim.calls_to(url) == 2
    assert_rejected(client.get(url, headers={"Host": "evil.example"}), 400, "host_not_allowed")


def test_start_up_warnings(
    make_client: MakeClient, victim: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Weakened set-ups say so at start-up: an ephemeral key and IMAGEGUARD_SIGNING=off."""
    from imageguard import facade

    facade._warned.clear()
    with caplog.at_level("WARNING", logger="imageguard"):
        make_client(victim, secret_key="", signing="off")
    text = caplog.text
    assert "IMAGEGUARD_SECRET_KEY is not set" in text and "IMAGEGUARD_SIGNING=off" in text
