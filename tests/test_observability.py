"""Observability through real requests: JSON security events, Prometheus metrics, stats.

Every test drives a real upstream through both adapters (``make_client``) and
reads what an operator would read: the JSON lines of ``IMAGEGUARD_LOG_FORMAT=json``,
the Prometheus text of the default registry, ``guard.stats()`` and ``/metrics``
mounted next to the guarded app.

Reason codes triggered here by real requests (README "Status codes"):

* 400 ``bad_path``, ``bad_query``, ``unknown_param``, ``duplicate_param``,
  ``bad_param_value``, ``host_not_allowed``; ``bad_header`` (ASGI only: a
  repeated ``Host``; a WSGI environ cannot carry two).
* 403 ``missing_signature``, ``bad_signature``, ``expired_signature``, ``missing_expiry``.
* 429 ``rate_limited``.
* 502 ``not_image``, ``type_mismatch``, ``format_not_allowed``, ``too_large``,
  ``too_many_pixels``, ``side_too_large``, ``too_many_frames`` (GIF and APNG),
  ``corrupt_image``/``truncated_image``, ``unsupported_encoding``,
  ``upstream_error``; ``upstream_timeout`` (ASGI only: the WSGI adapter has no
  upstream timeout; the ASGI one's is an attribute, shortened here); SVG:
  ``svg_not_allowed``, ``svg_malformed``, ``svg_entities_forbidden``,
  ``svg_dtd_forbidden``, ``svg_not_svg``, ``svg_too_many_nodes``,
  ``svg_too_deep``, ``svg_use_limit``, ``svg_css_limit``, ``svg_transform_unsupported``.
* 503 ``overloaded`` and ``fill_timeout`` (:func:`test_shed_fills_are_logged_with_their_key`;
  ``fill_timeout`` waits 120 s in production, so ``FOLLOWER_TIMEOUT`` is shortened).
* Served 200 but logged: ``svg_script_removed``, ``svg_event_handler_removed``,
  ``svg_comment_removed``; and ``integrity_failure`` (tier ``l2``).

Not covered here, and why:

* ``bad_header`` and ``upstream_timeout`` under WSGI: that adapter has neither.
* ``integrity_failure`` on ``l3``: needs a Redis server (tests/test_tiers.py).
* ``anomaly``: needs a rejection rate jump over a ten-minute baseline
  (tests/test_anomaly.py, with an injected clock).
* The other SVG removal codes (``svg_url_removed``, ``svg_css_removed``,
  ``svg_element_removed``...): the same path as the three here (one event per
  kind removed); tests/test_svg.py maps inputs to codes.

:func:`test_refusal_events_carry_their_facts` covers the refusals raised on
other code paths: a GIF's ``too_many_frames`` (``frames``) and an SVG's
``too_large`` (``size``, ``limit``).
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import imageguard.asgi
import imageguard.metrics
import imageguard.wsgi
from imageguard import ImageGuard, ImageGuardMiddleware, Settings
from imageguard.cache.envelope import source_hash
from imageguard.logs import HANDLER_MARK, configure
from tests.drivers import MakeClient, Result, assert_clean_image, assert_rejected, call_asgi
from tests.support import SECRET, Upstream, gif, jpeg, png, png_bomb, starlette_app

SVG_NS = "http://www.w3.org/2000/svg"
HTML = b"<!doctype html><html><body><script>alert(document.domain)</script></body></html>"
SCRIPTED_SVG = (
    f'<svg xmlns="{SVG_NS}" width="4" height="4" onload="alert(1)">'
    "<!-- a comment --><script>alert(1)</script>"
    '<rect width="4" height="4" fill="red"/></svg>'
).encode()


def svg(inner: str) -> bytes:
    return f'<svg xmlns="{SVG_NS}" width="4" height="4">{inner}</svg>'.encode()


def noisy_png(width: int = 64, height: int = 64) -> bytes:
    """A PNG that does not compress (random pixels, fixed seed): about 3 bytes a pixel."""
    pixels = random.Random(width * 1000 + height).randbytes(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(out, "PNG")
    return out.getvalue()


def apng(frames: int) -> bytes:
    """An animated PNG of *frames* distinct frames (its ``acTL`` says how many)."""
    out = io.BytesIO()
    images = [Image.new("RGB", (16, 16), (40 * i % 256, 0, 0)) for i in range(frames)]
    images[0].save(out, "PNG", save_all=True, append_images=images[1:], duration=50, loop=0)
    return out.getvalue()


def other_signature(url: str) -> str:
    """*url* with its ``s`` replaced by another well-formed value of the same length."""
    head, _, signature = url.rpartition("s=")
    forged = "".join("B" if ch == "A" else "A" for ch in signature)
    return head + "s=" + forged


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def l2_file(directory: Path, path: str) -> Path:
    """The one L2 file holding a variant of the source *path*."""
    hashed = source_hash(path)
    (found,) = (p for p in (directory / "v1" / hashed[:2] / hashed).iterdir() if not p.name.startswith("."))
    return found


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.01)


# -- JSON log lines ----------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """JSON lines of the ``imageguard`` logger, written to a buffer for this test.

    A marked handler left by an earlier test would make :func:`configure` keep
    it (it installs one per process), so it is set aside and put back after.
    """
    log = logging.getLogger("imageguard")
    level = log.level
    earlier = [h for h in log.handlers if getattr(h, HANDLER_MARK, False)]
    for handler in earlier:
        log.removeHandler(handler)
    buf = io.StringIO()
    configure(Settings(secret_key=SECRET, log_format="json"), stream=buf)
    yield buf
    for handler in [h for h in log.handlers if getattr(h, HANDLER_MARK, False)]:
        log.removeHandler(handler)
        handler.close()
    for handler in earlier:
        log.addHandler(handler)
    # Other test files read security events through caplog, on the root logger.
    log.propagate = True
    log.setLevel(level)


def json_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    """Every line of *buf*, each of which must be one JSON object."""
    text = buf.getvalue()
    assert text.endswith("\n"), text[-200:]
    parsed = []
    for line in text[:-1].split("\n"):
        record = json.loads(line)  # every line, not only the security events
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        parsed.append(record)
    return parsed


@dataclass
class Expect:
    """One security event a request must have produced.

    :param fields: exact values the line must carry.
    :param absent: fields the line must not carry (facts that were ``None``).
    :param key: the line carries a 12-character cache key prefix.
    """

    reason: str
    client: str | None
    fields: dict[str, object] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    key: bool = False


class Scenario:
    """Requests sent and the security events each one must leave in the JSON log."""

    def __init__(self) -> None:
        self.expected: list[Expect] = []
        self._next = 0

    def address(self) -> str:
        """A fresh client address, so each event is found by (reason, client)."""
        self._next += 1
        return f"192.0.2.{self._next}"

    def rejected(
        self,
        client: Any,
        url: str,
        status: int,
        reason: str | set[str],
        *,
        path: str,
        headers: dict[str, str] | None = None,
        key: bool = False,
        absent: tuple[str, ...] = (),
        **fields: object,
    ) -> Result:
        """Send *url*; check the refusal the client got and expect its event."""
        address = self.address()
        result: Result = client.get(url, headers=headers or {}, client=address)
        assert_rejected(result, status, reason)
        assert result.reason is not None
        self.expect(result.reason, address, status=status, path=path, key=key, absent=absent, **fields)
        return result

    def expect(
        self,
        reason: str,
        client: str | None,
        *,
        key: bool = False,
        absent: tuple[str, ...] = (),
        **fields: object,
    ) -> None:
        self.expected.append(Expect(reason, client, dict(fields), absent, key))

    def check(self, lines: list[dict[str, Any]]) -> None:
        events = [line for line in lines if line["logger"] == "imageguard.security"]
        for expect in self.expected:
            found = [
                e
                for e in events
                if e.get("reason") == expect.reason
                and (expect.client is None or e.get("client") == expect.client)
            ]
            assert found, f"no {expect.reason} event for client {expect.client}: {events}"
            event = found[0]
            assert event["level"] == "WARNING", event
            assert event["message"].startswith(expect.reason + ": "), event
            for name, value in expect.fields.items():
                assert event.get(name) == value, (name, event)
            for name in expect.absent:
                assert name not in event, (name, event)
            if expect.key:
                assert isinstance(event.get("key"), str) and len(event["key"]) == 12, event
            else:
                assert "key" not in event, event


def test_every_reason_code_is_a_json_line_with_its_facts(
    make_client: MakeClient, upstream: Upstream, json_log: io.StringIO, tmp_path: Path
) -> None:
    json_settings: dict[str, Any] = {"log_format": "json"}
    big = noisy_png(40, 40)
    files = {
        "a": upstream.add("a.png", png(30, 20), "image/png"),
        "html": upstream.add("page.png", HTML, "image/png"),
        "mismatch": upstream.add("mismatch.jpg", png(30, 20), "image/jpeg"),
        "gif": upstream.add("anim.gif", gif(frames=5), "image/gif"),
        "apng": upstream.add("anim.png", apng(5), "image/png"),
        "big": upstream.add("big.png", big, "image/png"),
        "bomb": upstream.add("bomb.png", png_bomb(10_000, 10_000), "image/png"),
        "wide": upstream.add("wide.png", png(200, 50), "image/png"),
        "cut": upstream.add("cut.png", noisy_png(64, 64)[:6000], "image/png"),
        "scripted": upstream.add("scripted.svg", SCRIPTED_SVG, "image/svg+xml"),
        "plain_svg": upstream.add("plain.svg", svg('<rect width="4" height="4"/>'), "image/svg+xml"),
        "malformed": upstream.add("malformed.svg", svg("<rect>"), "image/svg+xml"),
        "entities": upstream.add(
            "entities.svg",
            f'<!DOCTYPE svg [<!ENTITY x "y">]><svg xmlns="{SVG_NS}">&x;</svg>'.encode(),
            "image/svg+xml",
        ),
        "dtd": upstream.add(
            "dtd.svg",
            f"<!DOCTYPE svg [<!ATTLIST rect onclick CDATA 'alert(1)'>]><svg xmlns=\"{SVG_NS}\"/>".encode(),
            "image/svg+xml",
        ),
        "not_svg": upstream.add("xhtml.svg", b'<svg xmlns="http://example.com/not-svg"/>', "image/svg+xml"),
        "deep": upstream.add("deep.svg", svg("<g>" * 64 + "</g>" * 64), "image/svg+xml"),
        "uses": upstream.add("uses.svg", svg('<rect id="r"/>' + '<use href="#r"/>' * 257), "image/svg+xml"),
        "nodes": upstream.add("nodes.svg", svg("<g/>" * 50), "image/svg+xml"),
        "css": upstream.add(
            "css.svg", svg("<style>" + "a{fill:rgb(1,2,3)}" * 100_000 + "</style>"), "image/svg+xml"
        ),
    }
    client = make_client(upstream, **json_settings)
    run = Scenario()

    # -- 400: malformed path or query (refused before any key exists) --
    # A second percent-decoding would make "a.png." of it: %25 is refused.
    run.rejected(client, "/static/a.png%252e", 400, "bad_path", path="/static/a.png%2e")
    # Encoded dot segments: a second spelling of "..".
    run.rejected(client, "/static/%2e%2e/a.png", 400, "bad_path", path="/static/../a.png")
    run.rejected(client, files["a"] + "?w=1;h=2", 400, "bad_query", path=files["a"])  # ";" separator
    run.rejected(
        client, files["a"] + "?utm_source=x", 400, "unknown_param", path=files["a"]
    )  # not a source param
    run.rejected(
        client, files["a"] + "?w=1&w=2", 400, "duplicate_param", path=files["a"]
    )  # two values, one name
    run.rejected(client, files["a"] + "?w=0", 400, "bad_param_value", path=files["a"])  # out of range
    # IMAGEGUARD_KEY_HOSTS: a Host that is not keyed is refused, not served another host's entry.
    hosts = make_client(upstream, key_hosts="good.example", **json_settings)
    run.rejected(
        hosts, files["a"], 400, "host_not_allowed", path=files["a"], headers={"Host": "evil.example"}
    )
    if client.name == "asgi":
        # Two Host headers: which one a cache keys on is ambiguous (WSGI cannot carry two).
        address = run.address()
        doubled = [("Host", "testserver"), ("Host", "evil.example")]
        result = client.portal.call(call_asgi, client.app, files["a"], "GET", doubled, b"", address)
        assert_rejected(result, 400, "bad_header")
        run.expect("bad_header", address, status=400, path=files["a"])

    # -- 403: signatures --
    run.rejected(client, files["a"] + "?w=10", 403, "missing_signature", path=files["a"])  # transform, no s
    signed = client.url(files["a"], w=10)
    run.rejected(client, other_signature(signed), 403, "bad_signature", path=files["a"])  # forged s
    expired = client.url(files["a"], w=10, e=1)  # signed, with an expiry in 1970
    run.rejected(client, expired, 403, "expired_signature", path=files["a"])
    # Signed without an expiry, presented where IMAGEGUARD_SIGNATURE_MAX_AGE demands one.
    strict = make_client(upstream, signature_max_age=60, **json_settings)
    run.rejected(strict, signed, 403, "missing_expiry", path=files["a"])

    # -- 429: the miss budget (one fill a minute per client) --
    limited = make_client(upstream, miss_rate="1/minute", **json_settings)
    address = run.address()
    assert_clean_image(limited.get(files["a"], client=address), "png")
    result = limited.get(files["wide"], client=address)
    assert_rejected(result, 429, "rate_limited")
    assert int(result.headers["Retry-After"]) >= 1
    run.expect("rate_limited", address, status=429, path=files["wide"], key=True)

    # -- 502: what the upstream sent failed validation (a key exists: it was a fill) --
    run.rejected(  # an HTML polyglot served as image/png; it sniffs as nothing (no "sniffed" field)
        client,
        files["html"],
        502,
        "not_image",
        path=files["html"],
        key=True,
        declared="image/png",
        absent=("sniffed",),
        size=len(HTML),
    )
    run.rejected(  # PNG bytes declared as JPEG
        client,
        files["mismatch"],
        502,
        "type_mismatch",
        path=files["mismatch"],
        key=True,
        declared="image/jpeg",
        sniffed="png",
    )
    png_only = make_client(upstream, formats="png", **json_settings)
    run.rejected(  # a GIF where IMAGEGUARD_FORMATS=png
        png_only,
        files["gif"],
        502,
        "format_not_allowed",
        path=files["gif"],
        key=True,
        declared="image/gif",
        sniffed="gif",
    )
    small = make_client(upstream, max_bytes=1000, **json_settings)
    run.rejected(  # refused on the upstream's Content-Length, before reading the body
        small, files["big"], 502, "too_large", path=files["big"], key=True, size=len(big), limit=1000
    )
    run.rejected(  # a 10000x10000 header over a few KB of data: refused before decoding
        client,
        files["bomb"],
        502,
        "too_many_pixels",
        path=files["bomb"],
        key=True,
        width=10_000,
        height=10_000,
        limit=50_000_000,
    )
    narrow = make_client(upstream, max_side=100, max_frames=2, **json_settings)
    run.rejected(  # 200 px wide where IMAGEGUARD_MAX_SIDE=100
        narrow,
        files["wide"],
        502,
        "side_too_large",
        path=files["wide"],
        key=True,
        width=200,
        height=50,
        limit=100,
    )
    # Five frames where IMAGEGUARD_MAX_FRAMES=2: an APNG (its acTL count) and a GIF
    # (the descriptor walk stops at the first frame over the limit).
    run.rejected(narrow, files["apng"], 502, "too_many_frames", path=files["apng"], key=True, frames=5)
    run.rejected(narrow, files["gif"], 502, "too_many_frames", path=files["gif"], key=True, frames=3)
    cut = run.rejected(  # a PNG cut short: which code depends on where the decoder notices
        client, files["cut"], 502, {"truncated_image", "corrupt_image"}, path=files["cut"], key=True
    )
    assert cut.reason == "truncated_image", cut.reason  # cut inside IDAT: the decoder runs out of data
    encoded_upstream = Upstream(extra_headers={"Content-Encoding": "gzip"})  # on every 200 it sends
    encoded_path = encoded_upstream.add("a.png", png(30, 20), "image/png")
    encoded = make_client(encoded_upstream, **json_settings)
    run.rejected(encoded, encoded_path, 502, "unsupported_encoding", path=encoded_path, key=True)
    run.rejected(client, "/raise.png", 502, "upstream_error", path="/raise.png", key=True)  # the app raises
    if client.name == "asgi":
        # The ASGI adapter gives the app 60 s (an attribute): 0.2 s here, for an app taking 5 s.
        slow_path = upstream.add("slow.png", png(30, 20), "image/png")
        upstream.slow["slow.png"] = 5.0
        impatient = make_client(upstream, **json_settings)
        impatient.guard.upstream_timeout = 0.2
        run.rejected(impatient, slow_path, 502, "upstream_timeout", path=slow_path, key=True)

    # -- 502: SVG --
    no_svg = make_client(upstream, svg="reject", **json_settings)
    run.rejected(no_svg, files["plain_svg"], 502, "svg_not_allowed", path=files["plain_svg"], key=True)
    run.rejected(client, files["malformed"], 502, "svg_malformed", path=files["malformed"], key=True)
    run.rejected(client, files["entities"], 502, "svg_entities_forbidden", path=files["entities"], key=True)
    run.rejected(
        client, files["dtd"], 502, "svg_dtd_forbidden", path=files["dtd"], key=True
    )  # ATTLIST default
    run.rejected(
        client, files["not_svg"], 502, "svg_not_svg", path=files["not_svg"], key=True
    )  # foreign root
    run.rejected(client, files["deep"], 502, "svg_too_deep", path=files["deep"], key=True)  # 65 levels
    run.rejected(client, files["uses"], 502, "svg_use_limit", path=files["uses"], key=True)  # 257 <use>
    run.rejected(client, files["css"], 502, "svg_css_limit", path=files["css"], key=True)  # 1.8 MB of CSS
    few_nodes = make_client(upstream, svg_max_nodes=10, **json_settings)
    run.rejected(few_nodes, files["nodes"], 502, "svg_too_many_nodes", path=files["nodes"], key=True)
    resized = client.url(files["plain_svg"], w=10)  # no rasterizer: no resizing an SVG
    run.rejected(client, resized, 502, "svg_transform_unsupported", path=files["plain_svg"], key=True)

    # -- served, but what was removed is logged (no status: the client got 200) --
    address = run.address()
    served = client.get(files["scripted"], client=address)
    assert served.status == 200 and served.headers["Content-Type"] == "image/svg+xml"
    assert b"script" not in served.body and b"onload" not in served.body
    for removed in ("svg_script_removed", "svg_event_handler_removed", "svg_comment_removed"):
        run.expect(removed, address, path=files["scripted"], key=True, absent=("status",))

    # -- integrity: a flipped byte in a disk entry, read by a second instance --
    first = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"), **json_settings)
    original = first.get(files["a"])
    assert_clean_image(original, "png")
    flip_last_byte(l2_file(tmp_path / "l2", files["a"]))
    second = make_client(upstream, disk_cache_dir=str(tmp_path / "l2"), **json_settings)
    again = second.get(files["a"], client=run.address())
    assert again.body == original.body  # refilled from the app, not the tampered bytes
    run.expect("integrity_failure", None, tier="l2", key=True, absent=("status",))

    lines = json_lines(json_log)
    run.check(lines)
    (tampered,) = [line for line in lines if line.get("reason") == "integrity_failure"]
    assert tampered["logger"] == "imageguard.security" and tampered["detail"]
    # The app's exception is logged too, with its traceback, as JSON.
    (raised,) = [line for line in lines if line["logger"] == "imageguard" and "/raise.png" in line["message"]]
    assert raised["level"] == "ERROR" and "RuntimeError: the app failed" in raised["exc_info"]
    # Every rejection was counted once by reason (a client sees one code, the log has one line).
    refused = [line for line in lines if line["logger"] == "imageguard.security" and "status" in line]
    assert len(refused) == sum(1 for e in run.expected if "status" in e.fields)


@pytest.mark.parametrize(
    ("name", "body", "content_type", "settings", "reason", "facts"),
    [
        pytest.param(
            "anim.gif",
            gif(frames=5),
            "image/gif",
            {"max_frames": 2},
            "too_many_frames",
            ("frames",),
            id="gif-frames",  # raster._scan_gif
        ),
        pytest.param(
            "big.svg",
            svg("<g/>" * 400),
            "image/svg+xml",
            {"max_svg_bytes": 1000},
            "too_large",
            ("size", "limit"),
            id="svg-too-large",  # core._complete_svg and svg.sanitize_svg
        ),
    ],
)
def test_refusal_events_carry_their_facts(
    make_client: MakeClient,
    upstream: Upstream,
    json_log: io.StringIO,
    name: str,
    body: bytes,
    content_type: str,
    settings: dict[str, Any],
    reason: str,
    facts: tuple[str, ...],
) -> None:
    client = make_client(upstream, log_format="json", **settings)
    assert_rejected(client.get(upstream.add(name, body, content_type), client="192.0.2.9"), 502, reason)
    (event,) = [line for line in json_lines(json_log) if line.get("reason") == reason]
    assert all(isinstance(event.get(fact), int) for fact in facts), event


def test_shed_fills_are_logged_with_their_key(
    make_client: MakeClient, upstream: Upstream, json_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # overloaded: one worker, no queue, six fills released at once (as in test_abuse.py).
    hot = upstream.add("hot.png", png(8, 8), "image/png")
    big = [upstream.add(f"big{n}.jpg", jpeg(1600, 1200), "image/jpeg") for n in range(6)]
    client = make_client(upstream, workers=1, queue=0, log_format="json")
    assert_clean_image(client.get(hot), "png")
    upstream.delay = threading.Event()
    with ThreadPoolExecutor(len(big)) as pool:
        fills = [pool.submit(client.get, path, client=f"198.51.100.{n}") for n, path in enumerate(big)]
        wait_for(lambda: len(upstream.calls) == 1 + len(big))
        upstream.delay.set()
        results = [f.result(timeout=60) for f in fills]
    shed = {f"198.51.100.{n}": (big[n], r) for n, r in enumerate(results) if r.status == 503}
    assert shed and len(shed) < len(big), [r.status for r in results]
    for _, result in shed.values():
        assert_rejected(result, 503, "overloaded")
        assert result.headers["Retry-After"] == "1"

    # fill_timeout: a request waiting on another's fill gives up after FOLLOWER_TIMEOUT
    # (120 s in production; 0.3 s here).
    for module in (imageguard.wsgi, imageguard.asgi):
        monkeypatch.setattr(module, "FOLLOWER_TIMEOUT", 0.3)
    slow = upstream.add("slow.png", png(30, 20), "image/png")
    upstream.delay = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(client.get, slow, client="198.51.100.50")
        wait_for(lambda: upstream.calls_to(slow) == 1)
        waiter = client.get(slow, client="198.51.100.51")
        if client.name == "asgi":
            # The request that started a fill waits on the shared fill task like the others.
            assert_rejected(leader.result(timeout=30), 503, "fill_timeout")
        upstream.delay.set()
        if client.name == "wsgi":  # the leader runs the fill itself: it is never timed out
            assert_clean_image(leader.result(timeout=30), "png")
    assert_rejected(waiter, 503, "fill_timeout")
    assert waiter.headers["Retry-After"] == "1"
    wait_for(lambda: client.get(slow).status == 200)  # the fill went on and was stored

    run = Scenario()
    for address, (path, _) in shed.items():
        run.expect("overloaded", address, status=503, path=path, key=True)
    run.expect("fill_timeout", "198.51.100.51", status=503, path=slow, key=True)
    if client.name == "asgi":
        run.expect("fill_timeout", "198.51.100.50", status=503, path=slow, key=True)
    lines = json_lines(json_log)
    run.check(lines)
    assert sum(1 for line in lines if line.get("reason") == "overloaded") == len(shed)


# -- metrics -------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    """Every sample of the default registry, as the Prometheus text format shows it."""
    text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def outcomes(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "imageguard_requests_total")


def test_metrics_after_a_scripted_mix(make_client: MakeClient, upstream: Upstream, tmp_path: Path) -> None:
    a = upstream.add("a.png", png(30, 20, colour=(255, 0, 0)), "image/png")
    b = upstream.add("b.png", png(20, 30, colour=(0, 0, 255)), "image/png")
    c = upstream.add("c.png", png(10, 10), "image/png")
    d = upstream.add("d.png", png(12, 12), "image/png")
    mismatch = upstream.add("mismatch.jpg", png(30, 20), "image/jpeg")
    disk = str(tmp_path / "l2")
    client = make_client(upstream, disk_cache_dir=disk)
    limited = make_client(upstream, miss_rate="1/minute")
    before = scrape()

    first = client.get(a)  # fills: 2 misses, 2 PNG sanitizations
    assert_clean_image(first, "png")
    assert_clean_image(client.get(b), "png")
    for _ in range(3):  # 3 L1 hits
        assert client.get(a).body == first.body
    cached = client.get(a, headers={"If-None-Match": first.headers["ETag"]})  # an L1 hit answered 304
    assert cached.status == 304
    assert_rejected(client.get(other_signature(client.url(a, w=10))), 403, "bad_signature")
    assert_rejected(client.get(mismatch), 502, "type_mismatch")
    assert_clean_image(limited.get(c, client="203.0.113.1"), "png")  # a miss and a sanitization
    assert_rejected(limited.get(d, client="203.0.113.1"), 429, "rate_limited")
    # A second instance over the same disk: a is an L2 hit, b's entry was tampered with.
    flip_last_byte(l2_file(tmp_path / "l2", b))
    second = make_client(upstream, disk_cache_dir=disk)
    assert second.get(a).body == first.body
    assert_clean_image(second.get(b), "png")  # integrity failure, then refilled

    after = scrape()
    requests = 2 + 3 + 1 + 1 + 1 + 2 + 2
    assert outcomes(after) - outcomes(before) == requests  # every request is counted once
    # An L2 hit is a hit: only a fill from the app is a miss.
    assert delta(before, after, "imageguard_requests_total", outcome="miss") == 2 + 1 + 1
    assert delta(before, after, "imageguard_requests_total", outcome="hit") == 3 + 1
    assert delta(before, after, "imageguard_requests_total", outcome="not_modified") == 1
    assert delta(before, after, "imageguard_requests_total", outcome="rejected") == 2
    assert delta(before, after, "imageguard_requests_total", outcome="rate_limited") == 1
    assert delta(before, after, "imageguard_requests_total", outcome="shed") == 0
    assert delta(before, after, "imageguard_requests_total", outcome="passed_on") == 0
    assert delta(before, after, "imageguard_cache_hits_total", tier="l1") == 3 + 1  # the 304 is an L1 hit too
    assert delta(before, after, "imageguard_cache_hits_total", tier="l2") == 1
    assert delta(before, after, "imageguard_cache_hits_total", tier="l3") == 0
    for reason in ("bad_signature", "type_mismatch", "rate_limited"):
        assert delta(before, after, "imageguard_rejections_total", reason=reason) == 1, reason
    assert delta(before, after, "imageguard_integrity_failures_total", tier="l2") == 1
    assert delta(before, after, "imageguard_integrity_failures_total", tier="l3") == 0
    assert delta(before, after, "imageguard_sanitize_seconds_count", format="png") == 4  # a, b, c, b again
    assert delta(before, after, "imageguard_sanitize_seconds_sum", format="png") > 0
    assert delta(before, after, "imageguard_sanitize_seconds_bucket", format="png", le="+Inf") == 4
    assert sample(after, "imageguard_inflight_fills") == sample(before, "imageguard_inflight_fills")
    # Bytes per tier, read from the live guards at scrape time.
    assert sample(after, "imageguard_cache_bytes", tier="l1") >= len(first.body)
    assert sample(after, "imageguard_cache_bytes", tier="l2") >= len(first.body)

    stats: dict[str, Any] = client.guard.stats()
    ratio = stats["l1"]["hit_ratio"]
    assert isinstance(ratio, float) and 0.0 <= ratio <= 1.0
    # L1 counts a request once: 4 hits (3 + the 304); 3 misses (a, b, mismatch.jpg);
    # the forged signature was refused before any look-up.
    assert (stats["l1"]["hits"], stats["l1"]["misses"]) == (4, 3)
    assert ratio == round(4 / 7, 4)
    assert stats["rejections"]["bad_signature"] >= 1 and stats["rejections"]["type_mismatch"] >= 1
    assert stats["rejections_recent"]["bad_signature"] >= 1
    assert stats["l2"]["bytes"] > 0 and stats["l2"]["entries"] >= 2
    assert limited.guard.stats()["rejections"] == {"rate_limited": 1}
    second_stats: dict[str, Any] = second.guard.stats()
    assert second_stats["l2"]["integrity_failures"] == 1
    assert second_stats["rejections"] == {}  # an integrity failure is not a rejection: the client got 200


# -- /metrics next to the guarded app --------------------------------------------------


def test_metrics_mounted_on_a_flask_app_pass_the_guard(upstream: Upstream) -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    image = upstream.add("a.png", png(30, 20), "image/png")
    app = upstream.app()
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/metrics": imageguard.metrics.metrics_wsgi_app()}
    )
    ImageGuard(app, settings=Settings(secret_key=SECRET, miss_rate="off"))
    http = app.test_client()
    assert_clean_image(_as_result(http.get(image)), "png")  # the guard is in front of the app
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert "X-ImageGuard-Reason" not in response.headers
    assert 'imageguard_requests_total{outcome="miss"}' in text
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {"imageguard_requests", "imageguard_cache_hits", "imageguard_cache_bytes"} <= families


def test_metrics_mounted_on_a_fastapi_app_pass_the_guard(upstream: Upstream) -> None:
    import anyio
    import httpx
    from fastapi import FastAPI

    image = upstream.add("a.png", png(30, 20), "image/png")
    app = starlette_app(upstream, FastAPI)
    app.mount("/metrics", imageguard.metrics.metrics_asgi_app())
    app.add_middleware(ImageGuardMiddleware, settings=Settings(secret_key=SECRET, miss_rate="off"))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            served = await http.get(image)
            metrics = await http.get("/metrics", follow_redirects=True)
            return served, metrics

    served, response = anyio.run(scenario)
    ImageGuardMiddleware.from_app(app).close()
    assert_clean_image(Result(served.status_code, served.headers, served.content), "png")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "x-imageguard-reason" not in response.headers
    assert 'imageguard_requests_total{outcome="miss"}' in response.text
    families = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"imageguard_requests", "imageguard_cache_hits", "imageguard_cache_bytes"} <= families


def _as_result(response: Any) -> Result:
    return Result(response.status_code, response.headers, response.get_data())
