"""Run every benchmark and print one table of ratios measured in this run.

    python benchmarks/run.py

Each row compares imageguard with a baseline measured side by side in the same
process (the bare app, raw Pillow), so the ratio holds on a slow or busy machine
where absolute times do not. ``ratio`` is imageguard's time / the baseline's.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL

from benchmarks import bench_asgi, bench_hit, bench_raster, bench_signing, bench_svg, bench_tiers


def main() -> int:
    print(
        f"python {platform.python_version()}, Pillow {PIL.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.platform()}"
    )
    rows = [
        *bench_hit.run(),
        *bench_raster.run(),
        *bench_svg.run(),
        *bench_signing.run(),
        *bench_tiers.run(),
        *bench_asgi.run(),
    ]
    width = max(len(str(row["name"])) for row in rows)
    print(f"{'benchmark':<{width}}  {'baseline':>11}  {'imageguard':>11}  {'ratio':>7}  target")
    for row in rows:
        print(
            f"{row['name']!s:<{width}}  {float(row['baseline_s']) * 1e3:>9.3f}ms  "  # type: ignore[arg-type]
            f"{float(row['imageguard_s']) * 1e3:>9.3f}ms  {float(row['ratio']):>6.2f}x  {row['target']}"
        )  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
