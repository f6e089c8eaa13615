"""Shared timing helper for the benchmarks: interleaved medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

#: Untimed calls of each side before measuring (imports, caches, allocator).
WARMUP = 2


def median_pair(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of each, measured alternately so that drift hits both alike."""
    for _ in range(WARMUP):
        baseline()
        candidate()
    base_samples, cand_samples = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        baseline()
        base_samples.append(time.perf_counter() - started)
        started = time.perf_counter()
        candidate()
        cand_samples.append(time.perf_counter() - started)
    return statistics.median(base_samples), statistics.median(cand_samples)
