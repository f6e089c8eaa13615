"""Signature verification + cache-key derivation vs one bare HMAC-SHA256.

The imageguard side is the uncached path of a signed request (the route memo
is bypassed): verify ``s`` with itsdangerous over the canonical form, then
derive the HMAC cache key. The baseline is ``hmac.new(key, canonical, sha256)``
of the same string. Run: ``python benchmarks/bench_signing.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import statistics
import time

from imageguard import Settings
from imageguard.core import Core, Request, parse_transform
from imageguard.signing import canonical_form

SECRET = "benchmark-secret-key-0123456789"
CALLS = 2_000
BLOCKS = 61


def run() -> list[dict[str, object]]:
    core = Core(Settings(secret_key=SECRET))
    path, _, query = core.url("/static/photo.jpg", w=320, fmt="webp").partition("?")
    params, source = core.parse_query(query)
    transform = parse_transform(params, max_side=16384)
    canonical = canonical_form(path, {k: v for k, v in params.items() if k != "s"}).encode()
    key = SECRET.encode()

    def ours() -> None:
        core.verify(path, params, source)
        core.key_for(path, transform, "", None)

    def bare() -> None:
        hmac.new(key, canonical, hashlib.sha256).digest()

    request = Request("GET", path, query)

    def remembered() -> None:  # what a repeated URL costs: the verified route is remembered
        core.route(request)

    # Short blocks, alternated, and the median of the per-block ratios: a burst
    # of load from a neighbour on a shared machine then skews one pair, not the result.
    samples: dict[str, list[float]] = {"ours": [], "bare": [], "remembered": []}
    for _ in range(BLOCKS):
        for name, fn in (("bare", bare), ("ours", ours), ("remembered", remembered)):
            started = time.perf_counter()
            for _ in range(CALLS):
                fn()
            samples[name].append((time.perf_counter() - started) / CALLS)
    base = statistics.median(samples["bare"])
    mine = statistics.median(samples["ours"])
    memo = statistics.median(samples["remembered"])
    ratio = statistics.median(o / b for o, b in zip(samples["ours"], samples["bare"], strict=True))
    memo_ratio = statistics.median(m / b for m, b in zip(samples["remembered"], samples["bare"], strict=True))
    return [
        {
            "name": "verify signature + derive key (uncached) vs bare HMAC-SHA256",
            "baseline_s": base,
            "imageguard_s": mine,
            "ratio": ratio,
            "target": "<= 2x",
        },
        {
            "name": "signed request, verified route remembered vs bare HMAC-SHA256",
            "baseline_s": base,
            "imageguard_s": memo,
            "ratio": memo_ratio,
            "target": "<= 2x",
        },
    ]


if __name__ == "__main__":
    for row in run():
        base, mine = float(row["baseline_s"]), float(row["imageguard_s"])  # type: ignore[arg-type]
        print(
            f"{row['name']}: bare {base * 1e6:.2f} us, imageguard {mine * 1e6:.2f} us, "
            f"ratio {float(row['ratio']):.2f}x (target {row['target']})"  # type: ignore[arg-type]
        )
