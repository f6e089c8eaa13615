"""Abuse controls through both adapters: miss rate limits, client identity, load shedding.

Budgets are charged per client for fills only (an upstream call and a
re-encode); hits are never limited. The client is the peer address unless
``IMAGEGUARD_TRUSTED_PROXIES`` says how many forwarding hops to believe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from imageguard import Settings
from imageguard.core import Core
from imageguard.ratelimit import MissLimiter
from tests.drivers import MakeClient, assert_clean_image, assert_rejected
from tests.redis_server import redis_server
from tests.servers import free_port, gunicorn, running, uvicorn
from tests.support import SECRET, Upstream, eventually, jpeg, png


def _events(caplog: pytest.LogCaptureFixture, reason: str) -> list[dict[str, object]]:
    return [
        r.imageguard  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "imageguard.security" and getattr(r, "imageguard", {}).get("reason") == reason
    ]


# -- miss budget ---------------------------------------------------------------------


def test_miss_budget_is_per_client_and_hits_are_never_limited(
    make_client: MakeClient, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [upstream.add(f"m{n}.png", png(20 + n, 10), "image/png") for n in range(6)]
    client = make_client(upstream, miss_rate="3/minute")
    for path in paths[:3]:
        assert_clean_image(client.get(path, client="198.51.100.1"), "png")
    caplog.set_level(logging.WARNING, "imageguard.security")
    limited = client.get(paths[3], client="198.51.100.1")
    assert_rejected(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert upstream.calls_to(paths[3]) == 0  # refused before the upstream was called
    (event,) = _events(caplog, "rate_limited")
    assert event["client"] == "198.51.100.1" and event["status"] == 429 and event["path"] == paths[3]
    for path in paths[:3]:  # what is cached is still served to the limited client
        assert_clean_image(client.get(path, client="198.51.100.1"), "png")
    assert_clean_image(client.get(paths[3], client="198.51.100.2"), "png")  # another client
    assert_clean_image(client.get(paths[3], client="198.51.100.1"), "png")  # now a hit for everyone


def test_a_waiting_client_is_not_charged(make_client: MakeClient, upstream: Upstream) -> None:
    slow = upstream.add("slow.jpg", jpeg(300, 200), "image/jpeg")
    warmup = upstream.add("warm.png", png(10, 10), "image/png")
    client = make_client(upstream, miss_rate="1/minute")
    assert_clean_image(client.get(warmup, client="198.51.100.1"), "png")  # .1 has used its budget
    upstream.delay = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.get, slow, client="198.51.100.2")  # leads, then waits in the app
        eventually(lambda: upstream.calls_to(slow) == 1)
        waiting = pool.submit(client.get, slow, client="198.51.100.1")  # joins that fill
        time.sleep(0.2)
        upstream.delay.set()
        assert_clean_image(first.result(timeout=30), "jpeg")
        assert_clean_image(waiting.result(timeout=30), "jpeg")
    assert upstream.calls_to(slow) == 1


class _GatedLimiter:
    """The real limiter, made to wait at a gate before charging: a test's way to
    let a second client join a fill whose leader is about to be refused."""

    def __init__(self, limiter: MissLimiter, gate: threading.Event) -> None:
        self._limiter = limiter
        self._gate = gate
        self.blocking = True

    def charge(self, client: str | None) -> int | None:
        self._gate.wait(10)
        return self._limiter.charge(client)


def test_a_limited_leader_does_not_limit_the_clients_waiting_on_its_fill(
    make_client: MakeClient, upstream: Upstream
) -> None:
    image = upstream.add("shared.png", png(30, 20), "image/png")
    warmup = upstream.add("warm.png", png(10, 10), "image/png")
    client = make_client(upstream, miss_rate="1/minute")
    assert_clean_image(client.get(warmup, client="198.51.100.1"), "png")  # .1 has used its budget
    core = client.guard.core
    gate = threading.Event()
    core.limiter = _GatedLimiter(core.limiter, gate)
    with ThreadPoolExecutor(2) as pool:
        limited = pool.submit(client.get, image, client="198.51.100.1")  # leads the fill; held at the gate
        time.sleep(0.3)
        other = pool.submit(client.get, image, client="198.51.100.2")  # joins the same fill
        time.sleep(0.3)
        gate.set()
        assert_rejected(limited.result(timeout=30), 429, "rate_limited")
        assert_clean_image(other.result(timeout=30), "png")  # retried as its own fill, charged to .2
    assert upstream.calls_to(image) == 1


# -- client identity -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "remote", "xff", "forwarded", "expected"),
    [
        pytest.param(0, "10.0.0.1", "198.51.100.7", None, "10.0.0.1", id="untrusted-xff-ignored"),
        pytest.param(0, "10.0.0.1", None, "for=198.51.100.7", "10.0.0.1", id="untrusted-forwarded-ignored"),
        pytest.param(1, "10.0.0.1", "198.51.100.7", None, "198.51.100.7", id="one-hop"),
        pytest.param(1, "10.0.0.1", "6.6.6.6, 198.51.100.7", None, "198.51.100.7", id="spoofed-prefix"),
        pytest.param(2, "10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", None, "198.51.100.7", id="two-hops"),
        pytest.param(2, "10.0.0.1", "198.51.100.7", None, "10.0.0.1", id="fewer-hops-than-trusted"),
        pytest.param(1, "10.0.0.1", "not-an-ip", None, "10.0.0.1", id="garbage"),
        pytest.param(1, "10.0.0.1", None, 'for="[2001:db8::1]:4711"', "2001:db8::1", id="forwarded-v6"),
        pytest.param(
            1, "10.0.0.1", None, "for=6.6.6.6, for=198.51.100.7;proto=https", "198.51.100.7", id="fwd"
        ),
        pytest.param(1, "10.0.0.1", "198.51.100.7:5000", None, "198.51.100.7", id="v4-with-port"),
        pytest.param(1, "10.0.0.1", "", None, "10.0.0.1", id="empty"),
    ],
)
def test_client_address(
    trusted: int, remote: str, xff: str | None, forwarded: str | None, expected: str
) -> None:
    core = Core(Settings(secret_key=SECRET, trusted_proxies=trusted), lower=())
    assert core.client_address(remote, xff, forwarded) == expected


def test_forged_forwarded_for_does_not_change_the_client(make_client: MakeClient, upstream: Upstream) -> None:
    paths = [upstream.add(f"f{n}.png", png(20 + n, 10), "image/png") for n in range(4)]
    client = make_client(upstream, miss_rate="2/minute")  # IMAGEGUARD_TRUSTED_PROXIES=0
    for n, path in enumerate(paths[:2]):
        assert_clean_image(client.get(path, headers={"X-Forwarded-For": f"203.0.113.{n}"}), "png")
    forged = {"X-Forwarded-For": "203.0.113.99", "Forwarded": "for=203.0.113.98"}
    assert_rejected(client.get(paths[2], headers=forged), 429, "rate_limited")


def test_trusted_proxy_hop_is_the_client(
    make_client: MakeClient, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [upstream.add(f"t{n}.png", png(20 + n, 10), "image/png") for n in range(4)]
    client = make_client(upstream, miss_rate="2/minute", trusted_proxies=1)
    proxy = "10.0.0.1"
    for n, path in enumerate(paths[:2]):  # one real client, with whatever it prepends itself
        headers = {"X-Forwarded-For": f"6.6.6.{n}, 198.51.100.7"}
        assert_clean_image(client.get(path, client=proxy, headers=headers), "png")
    caplog.set_level(logging.WARNING, "imageguard.security")
    spoofed = {"X-Forwarded-For": "6.6.6.9, 198.51.100.7"}
    assert_rejected(client.get(paths[2], client=proxy, headers=spoofed), 429, "rate_limited")
    assert _events(caplog, "rate_limited")[0]["client"] == "198.51.100.7"
    other = {"X-Forwarded-For": "203.0.113.5"}  # another client behind the same proxy
    assert_clean_image(client.get(paths[2], client=proxy, headers=other), "png")


# -- load shedding -------------------------------------------------------------------


def test_queue_full_is_503_while_a_cached_image_is_served(
    make_client: MakeClient, upstream: Upstream
) -> None:
    hot = upstream.add("hot.png", png(8, 8), "image/png")
    big = [upstream.add(f"big{n}.jpg", jpeg(1600, 1200), "image/jpeg") for n in range(6)]
    client = make_client(upstream, workers=1, queue=0)
    assert_clean_image(client.get(hot), "png")
    upstream.delay = threading.Event()  # every fill waits in the app until all six are in
    with ThreadPoolExecutor(len(big)) as pool:
        fills = [pool.submit(client.get, path) for path in big]
        eventually(lambda: len(upstream.calls) == 1 + len(big))
        assert_clean_image(client.get(hot), "png")  # a hit while six fills are pending
        upstream.delay.set()  # all six reach the single worker at once
        results = [f.result(timeout=60) for f in fills]
    statuses = sorted(r.status for r in results)
    assert 200 in statuses and 503 in statuses, statuses
    for shed in (r for r in results if r.status == 503):
        assert_rejected(shed, 503, "overloaded")
        assert shed.headers["Retry-After"] == "1"
    assert_clean_image(client.get(hot), "png")


# -- a budget shared by instances ----------------------------------------------------


@pytest.mark.timeout(60)
def test_redis_limiter_falls_back_to_memory_when_redis_is_down() -> None:
    with redis_server() as server:
        limiter = MissLimiter("2/minute", namespace="t", redis_url=server.url)
        assert limiter.blocking and limiter.charge("c") is None
        server.stop()
        assert limiter.charge("c") is None  # counted in memory now: nothing raised
        assert limiter.charge("c") is None
        assert limiter.charge("c") is not None  # and still limited
        assert limiter.breaker.is_open


@pytest.fixture(scope="module")
def limited_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    images = tmp_path_factory.mktemp("images")
    with ExitStack() as stack:
        server = stack.enter_context(redis_server())
        env = {
            "SCALEOUT_IMAGES": str(images),
            "IMAGEGUARD_SECRET_KEY": SECRET,
            "IMAGEGUARD_REDIS_URL": server.url,
            "IMAGEGUARD_MISS_RATE": "4/minute",
        }
        a, b = free_port(), free_port()
        stack.enter_context(running(gunicorn("tests.apps.scaleout_app:make_wsgi()", a), a, env))
        stack.enter_context(running(uvicorn("tests.apps.scaleout_app:make_asgi", b, factory=True), b, env))
        yield a, b, images


@pytest.mark.server
@pytest.mark.timeout(120)
def test_the_miss_budget_is_shared_by_instances(limited_fleet: tuple[int, int, Path]) -> None:
    import http.client

    a, b, images = limited_fleet
    for n in range(6):
        (images / f"s{n}.png").write_bytes(png(20 + n, 10))

    def get(port: int, target: str) -> tuple[int, str | None]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            response.read()
            return response.status, response.getheader("X-ImageGuard-Reason")
        finally:
            connection.close()

    statuses = [get(port, f"/img/s{n}.png") for n, port in enumerate((a, b, a, b))]
    assert statuses == [(200, None)] * 4  # four fills, two on each instance
    assert get(a, "/img/s4.png") == (429, "rate_limited")  # the budget is spent on both
    assert get(b, "/img/s5.png") == (429, "rate_limited")
    assert get(b, "/img/s0.png") == (200, None)  # a hit (filled on A, shared through Redis)
