"""Prometheus metrics: samples read back through the text exposition format."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import imageguard.metrics
from imageguard.metrics import Metrics, metrics_asgi_app, metrics_wsgi_app
from tests.servers import ROOT


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named *name* (``foo_total``, ``foo_bucket``...) as {sorted labels: value}."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry, name).get(tuple(sorted(labels.items())))


class Tiers:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def tier_bytes(self) -> dict[str, int]:
        return self.sizes


class Broken:
    def tier_bytes(self) -> dict[str, int]:
        raise ConnectionError("redis is down")


def test_counters_by_label(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.request("hit")
    metrics.request("hit")
    metrics.request("rate_limited")
    metrics.hit("l1")
    metrics.hit("l3")
    metrics.hit("l3")
    metrics.rejection("bad_signature")
    metrics.integrity_failure("l2")
    assert value(registry, "imageguard_requests_total", outcome="hit") == 2
    assert value(registry, "imageguard_requests_total", outcome="rate_limited") == 1
    assert value(registry, "imageguard_cache_hits_total", tier="l3") == 2
    assert value(registry, "imageguard_cache_hits_total", tier="l1") == 1
    assert value(registry, "imageguard_rejections_total", reason="bad_signature") == 1
    assert value(registry, "imageguard_integrity_failures_total", tier="l2") == 1


def test_known_label_values_are_exported_at_zero(registry: CollectorRegistry) -> None:
    Metrics(registry)
    outcomes = {dict(k)["outcome"]: v for k, v in samples(registry, "imageguard_requests_total").items()}
    assert outcomes == dict.fromkeys(
        ("hit", "not_modified", "miss", "passed_on", "rejected", "shed", "rate_limited"), 0.0
    )
    assert set(samples(registry, "imageguard_cache_hits_total")) == {
        (("tier", t),) for t in ("l1", "l2", "l3")
    }
    assert samples(registry, "imageguard_rejections_total") == {}


@pytest.mark.parametrize(
    "label",
    [
        "Bad_Signature",
        "bad-signature",
        "",
        "x" * 41,
        "a\nb",
        "bad_signature\n",
        "/static/cat.jpg",
        "é",
        None,
        42,
    ],
    ids=[
        "upper",
        "dash",
        "empty",
        "too-long",
        "newline",
        "trailing-newline",
        "path",
        "non-ascii",
        "none",
        "int",
    ],
)
def test_unbounded_label_values_become_other(registry: CollectorRegistry, label: object) -> None:
    metrics = Metrics(registry)
    metrics.rejection(label)  # type: ignore[arg-type]
    metrics.request(label)  # type: ignore[arg-type]
    metrics.hit(label)  # type: ignore[arg-type]
    metrics.sanitize_seconds(label, 0.01)  # type: ignore[arg-type]
    assert samples(registry, "imageguard_rejections_total") == {(("reason", "other"),): 1.0}
    assert value(registry, "imageguard_requests_total", outcome="other") == 1
    assert value(registry, "imageguard_cache_hits_total", tier="other") == 1
    assert value(registry, "imageguard_sanitize_seconds_count", format="other") == 1


def test_longest_accepted_label(registry: CollectorRegistry) -> None:
    Metrics(registry).rejection("x" * 40)
    assert value(registry, "imageguard_rejections_total", reason="x" * 40) == 1


def test_sanitize_histogram(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    for seconds in (0.0005, 0.003, 0.2, 7.0, 60.0):
        metrics.sanitize_seconds("webp", seconds)
    buckets = {dict(k)["le"]: v for k, v in samples(registry, "imageguard_sanitize_seconds_bucket").items()}
    assert buckets["0.001"] == 1
    assert buckets["0.005"] == 2
    assert buckets["0.25"] == 3
    assert buckets["10.0"] == 4
    assert buckets["+Inf"] == 5
    assert min(float(b) for b in buckets) == 0.001
    assert value(registry, "imageguard_sanitize_seconds_count", format="webp") == 5
    assert value(registry, "imageguard_sanitize_seconds_sum", format="webp") == pytest.approx(67.2035)


def test_inflight_fills_gauge(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.fill_started()
    metrics.fill_started()
    metrics.fill_finished()
    assert value(registry, "imageguard_inflight_fills") == 1
    metrics.fill_finished()
    assert value(registry, "imageguard_inflight_fills") == 0


def test_cache_bytes_sums_live_watched_sources(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    assert samples(registry, "imageguard_cache_bytes") == {}
    first = Tiers({"l1": 100, "l2": 5000})
    second = Tiers({"l1": 20, "l3": 7})
    metrics.watch(first)
    metrics.watch(second)
    metrics.watch(first)  # watched once, counted once
    assert samples(registry, "imageguard_cache_bytes") == {
        (("tier", "l1"),): 120,
        (("tier", "l2"),): 5000,
        (("tier", "l3"),): 7,
    }
    first.sizes["l1"] = 1  # read at scrape time
    assert value(registry, "imageguard_cache_bytes", tier="l1") == 21


def test_a_collected_source_disappears(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    kept = Tiers({"l1": 1})
    metrics.watch(kept)
    metrics.watch(Tiers({"l1": 1000, "l2": 3}))  # no other reference: weakly held only
    gc.collect()
    assert samples(registry, "imageguard_cache_bytes") == {(("tier", "l1"),): 1}


def test_a_failing_source_is_skipped(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    good = Tiers({"l1": 10})
    broken = Broken()
    not_a_source = object.__new__(Tiers)  # no .sizes: tier_bytes raises AttributeError
    for source in (broken, good, not_a_source):
        metrics.watch(source)
    assert samples(registry, "imageguard_cache_bytes") == {(("tier", "l1"),): 10}


def test_second_metrics_on_one_registry_shares_instruments(registry: CollectorRegistry) -> None:
    Metrics(registry).request("miss")
    Metrics(registry).request("miss")
    assert value(registry, "imageguard_requests_total", outcome="miss") == 2


def test_second_singleton_on_the_default_registry() -> None:
    from prometheus_client import REGISTRY

    before = value(REGISTRY, "imageguard_requests_total", outcome="shed") or 0
    imageguard.metrics.METRICS.request("shed")
    Metrics().request("shed")  # no "Duplicated timeseries"
    assert value(REGISTRY, "imageguard_requests_total", outcome="shed") == before + 2


def test_fresh_interpreter_imports_twice() -> None:
    # In a subprocess: reloading here would swap the classes other tests import.
    code = textwrap.dedent(
        """
        import importlib, sys
        import imageguard.metrics as first
        del sys.modules["imageguard.metrics"]
        import imageguard.metrics as second
        assert first is not second
        third = importlib.reload(second)
        for module in (first, second, third):
            module.METRICS.request("hit")
            module.Metrics().request("hit")
        from prometheus_client import REGISTRY, generate_latest
        assert b'imageguard_requests_total{outcome="hit"} 6.0' in generate_latest(REGISTRY)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_without_prometheus_client_everything_is_a_no_op() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # import prometheus_client now fails
        from imageguard import metrics
        assert not metrics.AVAILABLE and not metrics.METRICS.enabled
        m = metrics.Metrics()
        for target in (m, metrics.METRICS):
            target.request("hit")
            target.hit("l1")
            target.rejection("bad_signature")
            target.integrity_failure("l2")
            target.sanitize_seconds("png", 0.5)
            target.fill_started()
            target.fill_finished()
            target.watch(object())
        for export in (metrics.metrics_wsgi_app, metrics.metrics_asgi_app,
                       lambda: metrics.start_metrics_server(9)):
            try:
                export()
            except RuntimeError as exc:
                assert "pip install 'imageguard[metrics]'" in str(exc), exc
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wsgi_app_exports_the_registry(registry: CollectorRegistry) -> None:
    Metrics(registry).rejection("type_mismatch")
    app = metrics_wsgi_app(registry)
    statuses: list[str] = []
    body = b"".join(
        app(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
            lambda status, headers, exc_info=None: statuses.append(status),  # type: ignore[arg-type,return-value]
        )
    )
    assert statuses == ["200 OK"]
    assert b'imageguard_rejections_total{reason="type_mismatch"} 1.0' in body


def test_default_wsgi_app_exports_the_singleton() -> None:
    imageguard.metrics.METRICS.request("hit")
    body = b"".join(
        metrics_wsgi_app()(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
            lambda status, headers, exc_info=None: None,  # type: ignore[arg-type,return-value]
        )
    )
    assert b"# TYPE imageguard_requests_total counter" in body


async def _asgi_get(registry: CollectorRegistry) -> tuple[int, bytes]:
    app = metrics_asgi_app(registry)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "query_string": b"",
        "headers": [],
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return status, body  # type: ignore[return-value]


def test_asgi_app_exports_the_registry(registry: CollectorRegistry) -> None:
    import asyncio

    Metrics(registry).hit("l2")
    status, body = asyncio.run(_asgi_get(registry))
    assert status == 200
    assert b'imageguard_cache_hits_total{tier="l2"} 1.0' in body
