"""Prometheus metrics (DESIGN §8), when ``prometheus_client`` is installed.

Use :data:`METRICS` from the adapters; it counts on the default registry, so
any exporter of that registry (:func:`metrics_wsgi_app`,
:func:`metrics_asgi_app`, :func:`start_metrics_server`, or your own) shows::

    imageguard_requests_total{outcome}          hit, not_modified, miss, passed_on,
                                                rejected, shed, rate_limited
    imageguard_cache_hits_total{tier}           l1, l2, l3
    imageguard_rejections_total{reason}         the X-ImageGuard-Reason codes
    imageguard_integrity_failures_total{tier}   entries whose integrity tag failed
    imageguard_sanitize_seconds{format}         histogram of re-encode time
    imageguard_inflight_fills                   fills running now
    imageguard_cache_bytes{tier}                bytes held, summed over the watched guards

Without ``prometheus_client`` (``pip install 'imageguard[metrics]'``) every
:class:`Metrics` method does nothing, and the exporters raise
:class:`RuntimeError` saying what to install.

Label values are bounded: anything not matching ``[a-z0-9_]{1,40}`` is counted
as ``other``, so a bug that puts request data into a label cannot grow the
number of time series without limit.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the [metrics] extra is not installed
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

    from .asgi import ASGIApp

__all__ = [
    "AVAILABLE",
    "METRICS",
    "Metrics",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "start_metrics_server",
]

#: What to install when ``prometheus_client`` is missing.
INSTALL_HINT = "prometheus_client is not installed: pip install 'imageguard[metrics]'"
#: Histogram buckets of ``imageguard_sanitize_seconds``, in seconds (1 ms .. 10 s).
SANITIZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Label values exported at zero from the start, so ``rate()`` sees every series.
OUTCOMES = ("hit", "not_modified", "miss", "passed_on", "rejected", "shed", "rate_limited")
TIERS = ("l1", "l2", "l3")
#: Replacement for a label value that is not a short lower-case code.
OTHER = "other"

_LABEL = re.compile(r"[a-z0-9_]{1,40}")
# The instruments of one registry live on the registry itself (not in this
# module), so that re-importing or reloading this module, or building a second
# Metrics for the same registry, reuses them instead of raising
# "Duplicated timeseries".
_REGISTRY_ATTRIBUTE = "_imageguard_instruments"
_CREATE_LOCK = threading.Lock()


def _label(value: object) -> str:
    if isinstance(value, str) and _LABEL.fullmatch(value):
        return value
    return OTHER


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(INSTALL_HINT)


class _Sources:
    """Weak references to the objects whose ``tier_bytes()`` make up ``imageguard_cache_bytes``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: list[weakref.ReferenceType[Any]] = []

    def add(self, source: object) -> None:
        with self._lock:
            self._refs = [ref for ref in self._refs if ref() is not None]
            if not any(ref() is source for ref in self._refs):
                self._refs.append(weakref.ref(source))

    def live(self) -> list[Any]:
        with self._lock:
            alive = [ref() for ref in self._refs]
            self._refs = [ref for ref, obj in zip(self._refs, alive, strict=True) if obj is not None]
        return [obj for obj in alive if obj is not None]


class _CacheBytesCollector:
    """Exports ``imageguard_cache_bytes{tier}`` at scrape time."""

    _NAME = "imageguard_cache_bytes"
    _HELP = "Bytes held by each cache tier, summed over the live guards of this process."

    def __init__(self, sources: _Sources) -> None:
        self.sources = sources

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._NAME, self._HELP, labels=["tier"])]

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = {}
        for source in self.sources.live():
            try:
                # A failing source (a closed guard, an unreachable Redis) is
                # skipped: a scrape must not fail because of one guard.
                counts = {_label(tier): float(size) for tier, size in dict(source.tier_bytes()).items()}
            except Exception:  # noqa: S112
                continue
            for tier, size in counts.items():
                totals[tier] = totals.get(tier, 0.0) + size
        family = GaugeMetricFamily(self._NAME, self._HELP, labels=["tier"])
        for tier in sorted(totals):
            family.add_metric([tier], totals[tier])
        return [family]


class _Instruments:
    """The metric objects of one registry (created once per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests: Counter = Counter(
            "imageguard_requests", "Guarded requests by outcome.", ["outcome"], registry=registry
        )
        self.hits: Counter = Counter(
            "imageguard_cache_hits", "Cache hits by tier.", ["tier"], registry=registry
        )
        self.rejections: Counter = Counter(
            "imageguard_rejections", "Rejections by reason code.", ["reason"], registry=registry
        )
        self.integrity_failures: Counter = Counter(
            "imageguard_integrity_failures",
            "Cache entries whose integrity tag failed, by tier.",
            ["tier"],
            registry=registry,
        )
        self.sanitize: Histogram = Histogram(
            "imageguard_sanitize_seconds",
            "Seconds spent validating and re-encoding one image, by output format.",
            ["format"],
            buckets=SANITIZE_BUCKETS,
            registry=registry,
        )
        self.inflight: Gauge = Gauge(
            "imageguard_inflight_fills", "Fills (upstream fetch and sanitize) running now.", registry=registry
        )
        self.sources = _Sources()
        registry.register(_CacheBytesCollector(self.sources))
        # The children of the known label values, bound once: labels() costs a lock
        # and a dictionary build per call, and a hit counts two of them.
        self.request_by_outcome = {outcome: self.requests.labels(outcome=outcome) for outcome in OUTCOMES}
        self.hit_by_tier = {tier: self.hits.labels(tier=tier) for tier in TIERS}
        for tier in TIERS:
            self.integrity_failures.labels(tier=tier)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Instruments:
        with _CREATE_LOCK:
            existing: _Instruments | None = getattr(registry, _REGISTRY_ATTRIBUTE, None)
            if existing is None:
                existing = cls(registry)
                setattr(registry, _REGISTRY_ATTRIBUTE, existing)
            return existing


class Metrics:
    """Counters, a histogram and gauges for one registry; no-ops without ``prometheus_client``.

    Every :class:`Metrics` built on the same registry shares the same metric
    objects, so building one twice is harmless.

    :param registry: where to register; by default ``prometheus_client.REGISTRY``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._instruments: _Instruments | None = None
        if AVAILABLE:
            self._instruments = _Instruments.of(
                registry if registry is not None else prometheus_client.REGISTRY
            )

    @property
    def enabled(self) -> bool:
        """Whether ``prometheus_client`` is installed (otherwise every method does nothing)."""
        return self._instruments is not None

    def request(self, outcome: str) -> None:
        """Count one guarded request (``imageguard_requests_total{outcome}``)."""
        instruments = self._instruments
        if instruments is not None:
            child = instruments.request_by_outcome.get(outcome)
            (child or instruments.requests.labels(outcome=_label(outcome))).inc()

    def hit(self, tier: str) -> None:
        """Count one cache hit (``imageguard_cache_hits_total{tier}``)."""
        instruments = self._instruments
        if instruments is not None:
            child = instruments.hit_by_tier.get(tier)
            (child or instruments.hits.labels(tier=_label(tier))).inc()

    def rejection(self, reason: str) -> None:
        """Count one rejection (``imageguard_rejections_total{reason}``)."""
        if self._instruments is not None:
            self._instruments.rejections.labels(reason=_label(reason)).inc()

    def integrity_failure(self, tier: str) -> None:
        """Count one integrity failure (``imageguard_integrity_failures_total{tier}``)."""
        if self._instruments is not None:
            self._instruments.integrity_failures.labels(tier=_label(tier)).inc()

    def sanitize_seconds(self, fmt: str, seconds: float) -> None:
        """Record one sanitization's duration (``imageguard_sanitize_seconds{format}``)."""
        if self._instruments is not None:
            self._instruments.sanitize.labels(format=_label(fmt)).observe(max(0.0, seconds))

    def fill_started(self) -> None:
        """A fill began (``imageguard_inflight_fills`` + 1)."""
        if self._instruments is not None:
            self._instruments.inflight.inc()

    def fill_finished(self) -> None:
        """A fill ended, however it ended (``imageguard_inflight_fills`` - 1)."""
        if self._instruments is not None:
            self._instruments.inflight.dec()

    def watch(self, source: object) -> None:
        """Export *source*'s ``tier_bytes()`` in ``imageguard_cache_bytes{tier}`` while it lives.

        :param source: an object with a ``tier_bytes() -> dict[str, int]`` method;
            held by a weak reference, so watching does not keep it alive. A source
            whose ``tier_bytes()`` raises is left out of that scrape.
        """
        if self._instruments is not None:
            self._instruments.sources.add(source)


#: The process-wide metrics on ``prometheus_client.REGISTRY``.
METRICS = Metrics()


def metrics_wsgi_app(registry: CollectorRegistry | None = None) -> WSGIApplication:
    """A WSGI app serving the metrics in the Prometheus text format (mount it at ``/metrics``).

    :param registry: by default ``prometheus_client.REGISTRY``.
    :raises RuntimeError: ``prometheus_client`` is not installed.
    """
    _require()
    app: WSGIApplication = prometheus_client.make_wsgi_app(
        registry if registry is not None else prometheus_client.REGISTRY
    )
    return app


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app serving the metrics in the Prometheus text format (mount it at ``/metrics``).

    :param registry: by default ``prometheus_client.REGISTRY``.
    :raises RuntimeError: ``prometheus_client`` is not installed.
    """
    _require()
    app: ASGIApp = prometheus_client.make_asgi_app(
        registry if registry is not None else prometheus_client.REGISTRY
    )
    return app


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve the default registry's metrics on ``http://host:port/`` from a daemon thread.

    Bound to 127.0.0.1 by default: metrics reveal traffic and rejection
    patterns, so expose them deliberately.

    :raises RuntimeError: ``prometheus_client`` is not installed.
    :raises OSError: the address cannot be bound.
    """
    _require()
    prometheus_client.start_http_server(port, addr=host)
