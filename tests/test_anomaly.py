"""The rejection anomaly detector, driven by a fake clock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from imageguard.anomaly import MAX_REASONS, AnomalyDetector


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def detector(clock: Clock) -> AnomalyDetector:
    return AnomalyDetector(clock=clock)  # 10 s buckets, 60 of them, 10x, at least 20, 60 s cooldown


@pytest.fixture(autouse=True)
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.WARNING, logger="imageguard"):
        yield


def anomalies(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.imageguard  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "imageguard.security" and r.imageguard["reason"] == "anomaly"  # type: ignore[attr-defined]
    ]


def feed(detector: AnomalyDetector, clock: Clock, reason: str, per_bucket: int, buckets: int) -> None:
    """*per_bucket* rejections spread evenly over each of the next *buckets* 10 s buckets."""
    for _ in range(buckets):
        start = clock.now
        for i in range(per_bucket):
            clock.now = start + i * (10.0 / per_bucket)
            detector.observe(reason)
        clock.now = start + 10.0


def test_a_steady_trickle_never_fires(
    detector: AnomalyDetector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    feed(detector, clock, "bad_signature", 19, 200)
    feed(detector, clock, "type_mismatch", 1, 50)
    assert anomalies(caplog) == []


def test_a_burst_fires_once_within_the_cooldown_and_again_after(
    detector: AnomalyDetector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    feed(detector, clock, "bad_signature", 5, 60)  # baseline 5 per bucket
    assert anomalies(caplog) == []
    burst_start = clock.now
    feed(detector, clock, "bad_signature", 200, 6)  # 60 s of burst: all inside the cooldown
    (event,) = anomalies(caplog)
    assert event == {
        "reason": "anomaly",
        "reported_reason": "bad_signature",
        "count": 50,  # 10x the baseline of 5
        "baseline": 5.0,
        "window_seconds": 600.0,
    }
    fired_at = burst_start + 49 * (10.0 / 200)
    assert clock.now - fired_at < 60.0  # still in the cooldown
    # The cooldown is over, the burst goes on well above 10x the (now higher) baseline.
    feed(detector, clock, "bad_signature", 300, 1)
    _, second = anomalies(caplog)
    assert second["reported_reason"] == "bad_signature"
    assert second["baseline"] == round((54 * 5 + 6 * 200) / 60, 2)
    assert second["count"] == 245


def test_cooldown_boundary(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    detector = AnomalyDetector(clock=clock, bucket=1.0, window=10, factor=0, minimum=5, cooldown=60.0)
    for _ in range(5):
        detector.observe("not_image")
    assert len(anomalies(caplog)) == 1
    for at in (1.0, 30.0, 59.5):
        clock.now = at
        for _ in range(10):
            detector.observe("not_image")
    assert len(anomalies(caplog)) == 1
    clock.now = 60.0
    for _ in range(5):
        detector.observe("not_image")
    assert len(anomalies(caplog)) == 2


def test_cooldown_is_per_reason(
    detector: AnomalyDetector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(20):
        detector.observe("bad_signature")
        detector.observe("too_many_pixels")
    assert [e["reported_reason"] for e in anomalies(caplog)] == ["bad_signature", "too_many_pixels"]


def test_a_high_steady_baseline_needs_factor_times(
    detector: AnomalyDetector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    feed(detector, clock, "not_image", 50, 70)  # the cold start may fire; then steady
    caplog.clear()
    feed(detector, clock, "not_image", 50, 10)
    assert anomalies(caplog) == []
    for _ in range(499):
        detector.observe("not_image")
    assert anomalies(caplog) == []  # 499 < 10 x 50
    detector.observe("not_image")
    (event,) = anomalies(caplog)
    assert event["count"] == 500 and event["baseline"] == 50.0


def test_minimum_applies_without_a_baseline(
    detector: AnomalyDetector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(19):
        detector.observe("type_mismatch")
    assert anomalies(caplog) == []
    detector.observe("type_mismatch")
    assert [e["count"] for e in anomalies(caplog)] == [20]


def test_counts_roll_off_old_buckets(detector: AnomalyDetector, clock: Clock) -> None:
    for _ in range(3):
        detector.observe("bad_signature")
    clock.now = 300.0
    detector.observe("not_image")
    detector.observe("not_image")
    clock.now = 599.9  # bucket 59: buckets 0..59 are the window
    assert detector.counts() == {"bad_signature": 3, "not_image": 2}
    clock.now = 600.0  # bucket 60: bucket 0 left the window
    assert detector.counts() == {"not_image": 2}
    clock.now = 910.0
    assert detector.counts() == {}


def test_memory_is_bounded(detector: AnomalyDetector, clock: Clock) -> None:
    feed(detector, clock, "bad_signature", 2, 500)
    assert len(detector._counts["bad_signature"]) <= 61
    assert detector.counts() == {"bad_signature": 118}  # 59 full buckets and the empty current one
    clock.now += 1000
    detector.observe("not_image")
    assert set(detector._counts) == {"not_image"}  # idle reasons are forgotten


def test_reasons_beyond_the_cap_fold_into_other(detector: AnomalyDetector) -> None:
    for i in range(MAX_REASONS + 44):
        detector.observe(f"reason_{i}")
    counts = detector.counts()
    assert len(counts) == MAX_REASONS + 1
    assert counts["other"] == 44
    assert counts["reason_0"] == 1 and "reason_299" not in counts


def test_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> float:
        raise OSError("no clock")

    AnomalyDetector(clock=broken).observe("bad_signature")
    assert any("anomaly detection failed" in r.getMessage() for r in caplog.records)


def test_threads_count_every_observation(detector: AnomalyDetector) -> None:
    def work() -> None:
        for _ in range(1000):
            detector.observe("bad_signature")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert detector.counts() == {"bad_signature": 8000}


@pytest.mark.parametrize(
    "options",
    [{"bucket": 0}, {"bucket": float("nan")}, {"window": 0}, {"factor": -1}, {"cooldown": -1}],
    ids=["bucket-0", "bucket-nan", "window-0", "factor-negative", "cooldown-negative"],
)
def test_bad_parameters(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AnomalyDetector(**options)
