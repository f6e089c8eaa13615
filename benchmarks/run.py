"""Run every benchmark and print one table of ratios measured in this run.

    python benchmarks/run.py [--only hit,raster,...] [--json PATH] [--plot PATH.svg|.png]

Each row compares imageguard with a baseline measured side by side in the same
process (the bare app, raw Pillow, a bare HMAC, an L1 hit), so the ratio holds
on a slow or busy machine where absolute times do not. ``ratio`` is
imageguard's time / the baseline's; below 1 imageguard takes less time.

The benchmarks (``--only`` takes these names, comma-separated):

- ``hit``: an L1 hit vs the bare Flask app (``bench_hit.py``);
- ``raster``: the re-encode a miss does vs raw Pillow, and a resize vs a naive
  Pillow resize (``bench_raster.py``);
- ``svg``: ``sanitize_svg`` vs a defusedxml parse (``bench_svg.py``);
- ``signing``: signature check + key derivation vs one bare HMAC (``bench_signing.py``);
- ``tiers``: L2/L3 hits vs an L1 hit and vs a miss, and the integrity check
  (``bench_tiers.py``; the Redis rows need Debian's ``redis-server``);
- ``passthrough``: a non-image route through each adapter vs the bare app
  (``bench_passthrough.py``);
- ``asgi``: L1 hits and pass-through under uvicorn, driven by wrk
  (``bench_asgi.py``; skipped with a note when ``wrk`` is not installed).

``--json`` writes the environment and the rows; ``--plot`` draws the ratios
(``benchmarks/plot.py``, matplotlib: ``pip install 'imageguard[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script (python benchmarks/run.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plot import plot_ratios, require_matplotlib, target_ratio, verdict

ROOT = Path(__file__).resolve().parents[1]

#: name: (module, what it compares, a missing tool that makes it skip, or None)
BENCHMARKS: dict[str, tuple[str, str, str | None]] = {
    "hit": ("benchmarks.bench_hit", "L1 hit vs bare app", None),
    "raster": ("benchmarks.bench_raster", "miss re-encode and resize vs Pillow", None),
    "svg": ("benchmarks.bench_svg", "SVG sanitizer vs parse", None),
    "signing": ("benchmarks.bench_signing", "signing vs bare HMAC", None),
    "tiers": ("benchmarks.bench_tiers", "L2/L3 hits vs L1 hit and a miss", None),
    "passthrough": ("benchmarks.bench_passthrough", "pass-through vs bare app", None),
    "asgi": ("benchmarks.bench_asgi", "uvicorn + wrk: hits and pass-through", "wrk"),
}


def environment() -> dict[str, object]:
    """What the numbers were measured on."""
    import PIL

    import imageguard

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit: str | None = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "imageguard": imageguard.__version__,
        "commit": commit,
        # Other work on the machine skews every ratio a little: the 1-minute load when the run began.
        "load_average": round(os.getloadavg()[0], 2),
    }


def describe(env: dict[str, object]) -> str:
    return (
        f"{env['date']}: {env['cpu']}, {env['cores']} cores, Python {env['python']}, "
        f"Pillow {env['pillow']}, imageguard {env['imageguard']}"
        + (f" ({env['commit']})" if env.get("commit") else "")
        + f", load {env['load_average']}"
    )


def duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(str(row["name"])) for row in rows)
    print(
        f"{'bench':<11}  {'benchmark':<{width}}  {'baseline':>10}  {'imageguard':>10}  {'ratio':>7}  target"
    )
    for row in rows:
        met = row["met"]
        mark = "" if met is None else ("  ok" if met else "  MISSED")
        if "throughput" in row:  # bench_asgi: the ratio is CPU per request; throughput too
            mark += f"  (throughput {float(row['throughput']):.2f}x)"
        print(
            f"{row['bench']:<11}  {row['name']!s:<{width}}  {duration(float(row['baseline_s'])):>10}  "
            f"{duration(float(row['imageguard_s'])):>10}  {float(row['ratio']):>6.2f}x  {row['target']}{mark}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run every benchmark; print one table of ratios.")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, help="write the environment and the rows here")
    parser.add_argument("--plot", type=Path, help="draw the ratios here (.svg or .png)")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown or not names:
            parser.error(
                f"--only: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(BENCHMARKS)}"
            )
    args.names = names
    if args.plot is not None and args.plot.suffix.lower() not in (".svg", ".png"):
        parser.error("--plot: the file must end in .svg or .png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        require_matplotlib()  # before minutes of measuring, not after
    env = environment()
    print(describe(env))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    timings: dict[str, float] = {}
    for name in args.names:
        module_name, what, tool = BENCHMARKS[name]
        if tool is not None and shutil.which(tool) is None:
            note = f"{tool} is not installed (apt-get install {tool})"
            print(f"skipping {name} ({what}): {note}")
            skipped.append({"bench": name, "reason": note})
            continue
        if name == "tiers" and shutil.which("redis-server") is None:
            print("note: redis-server is not installed: the L3 (Redis) rows are skipped")
        print(f"running {name}: {what} ...", flush=True)
        started = time.monotonic()
        run: Callable[[], list[dict[str, object]]] = importlib.import_module(module_name).run
        measured = run()
        timings[name] = round(time.monotonic() - started, 1)
        if not measured:
            skipped.append({"bench": name, "reason": "no rows (see its note above)"})
        for row in measured:
            rows.append({"bench": name, **row})
    for row in rows:
        row["met"] = verdict(row)
        row["target_ratio"] = target_ratio(row.get("target"))
    print()
    print(describe(env))
    if rows:
        print_table(rows)
    for item in skipped:
        print(f"skipped {item['bench']}: {item['reason']}")
    missed = [row["name"] for row in rows if row["met"] is False]
    met = sum(1 for row in rows if row["met"])
    untargeted = len(rows) - met - len(missed)
    print(f"{len(rows)} rows; targets met: {met}, missed: {len(missed)}, no target: {untargeted}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = {
            "title": describe(env),
            "environment": env,
            "rows": rows,
            "skipped": skipped,
            "seconds_per_benchmark": timings,
        }
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None and rows:
        plot_ratios(rows, args.plot, title=describe(env))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
