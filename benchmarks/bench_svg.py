"""The SVG sanitizer against a bare defusedxml parse of the same bytes.

``sanitize_svg`` (safe parse, streaming allowlist rebuild, CSS rebuild, ``<use>``
checks, serialisation) vs ``defusedxml.ElementTree.fromstring`` alone, on a
~20 KB and a ~1 MB benign drawing generated here (groups, gradients, paths,
shapes, ``<use>`` references, ``style`` attributes and a style sheet, as an
editor export looks). The sanitizer's CSS caches are cleared before every run,
so it is measured as for a document it has never seen. Target: at most 3x the
parse time.

Both sides run in the same process, interleaved, several times; the median
counts. Run: ``python benchmarks/bench_svg.py``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from defusedxml import ElementTree as DefusedET

# Run as a script (python benchmarks/bench_x.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_pair
from imageguard.svg import clear_caches, sanitize_svg

TARGET = 3.0  # sanitize_svg may take at most this many times the bare parse
REPEATS = {"20 KB": 41, "1 MB": 9}
SIZES = {"20 KB": 20_000, "1 MB": 1_000_000}
USE_GROUPS = 100  # groups that get <use> elements: 2 each, within SvgLimits.max_use (256)


def benign_svg(target_bytes: int, seed: int = 7) -> bytes:
    """A drawing of about ``target_bytes``: gradients in defs, then groups of paths and shapes."""
    rng = random.Random(seed)
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        'width="800" height="600" viewBox="0 0 800 600" version="1.1">',
        "<title>Benchmark drawing</title>",
        "<defs>",
        "<style>.outline{fill:none;stroke:#333;stroke-width:1.5}.soft{opacity:0.8}</style>",
    ]
    for i in range(8):
        head.append(
            f'<linearGradient id="grad{i}" x1="0" y1="0" x2="1" y2="1">'
            f'<stop offset="0" stop-color="#{rng.randrange(1 << 24):06x}"/>'
            f'<stop offset="1" stop-color="#{rng.randrange(1 << 24):06x}" stop-opacity="0.6"/>'
            "</linearGradient>"
        )
    head.append('<symbol id="dot" viewBox="0 0 10 10"><circle cx="5" cy="5" r="4"/></symbol>')
    head.append("</defs>")
    parts = ["\n".join(head)]
    size = len(parts[0])
    group = 0
    while size < target_bytes - 200:
        group += 1
        lines = [f'<g id="layer{group}" transform="translate({rng.randrange(800)},{rng.randrange(600)})">']
        for j in range(12):
            x, y = rng.randrange(800), rng.randrange(600)
            kind = j % 6
            if kind == 0:
                d = " ".join(f"L{rng.randrange(800)},{rng.randrange(600)}" for _ in range(6))
                lines.append(
                    f'<path id="p{group}_{j}" d="M{x},{y} {d} Z" fill="url(#grad{j % 8})" class="soft"/>'
                )
            elif kind == 1:
                lines.append(
                    f'<rect x="{x}" y="{y}" width="{rng.randrange(1, 90)}" height="{rng.randrange(1, 90)}" '
                    f'rx="3" fill="#{rng.randrange(1 << 24):06x}" stroke="#000" stroke-width="0.5"/>'
                )
            elif kind == 2:
                lines.append(
                    f'<circle cx="{x}" cy="{y}" r="{rng.randrange(1, 40)}" '
                    f'style="fill:#{rng.randrange(1 << 24):06x};stroke:none;fill-opacity:0.7"/>'
                )
            elif kind == 3:
                points = " ".join(f"{rng.randrange(800)},{rng.randrange(600)}" for _ in range(5))
                lines.append(f'<polyline points="{points}" class="outline"/>')
            elif kind == 4 and group <= USE_GROUPS:
                lines.append(f'<use xlink:href="#dot" x="{x}" y="{y}" width="10" height="10"/>')
            elif kind == 4:
                lines.append(f'<ellipse cx="{x}" cy="{y}" rx="{rng.randrange(1, 30)}" ry="7" fill="gray"/>')
            else:
                lines.append(
                    f'<text x="{x}" y="{y}" font-family="Verdana" font-size="12" '
                    f'fill="url(#grad{j % 8})">Label {group}.{j}</text>'
                )
        lines.append("</g>")
        chunk = "\n".join(lines)
        parts.append(chunk)
        size += len(chunk) + 1
    parts.append("</svg>")
    return "\n".join(parts).encode("utf-8")


def run() -> list[dict[str, object]]:
    """Measure; return one row per document size (``ratio`` is imageguard / baseline)."""
    rows: list[dict[str, object]] = []
    for label, target in SIZES.items():
        body = benign_svg(target)
        removed = sanitize_svg(body).removed
        if removed:  # the drawing is benign: a removal means the benchmark measures the wrong thing
            raise RuntimeError(f"benchmark SVG lost content: {removed}")

        def cold(body: bytes = body) -> object:
            clear_caches()  # as for a document never seen before: no cached CSS results
            return sanitize_svg(body)

        base, guarded = median_pair(lambda body=body: DefusedET.fromstring(body), cold, REPEATS[label])
        rows.append(
            {
                "name": f"sanitize_svg {label} ({len(body) / 1000:.0f} kB) vs defusedxml parse",
                "baseline_s": base,
                "imageguard_s": guarded,
                "ratio": guarded / base,
                "target": f"<= {TARGET:g}x",
                "passed": guarded / base <= TARGET,
            }
        )
    return rows


def main() -> int:
    rows = run()
    width = max(len(str(row["name"])) for row in rows)
    print(f"{'benchmark':<{width}}  {'baseline':>11}  {'imageguard':>11}  {'ratio':>7}  target")
    for row in rows:
        print(
            f"{row['name']!s:<{width}}  {float(row['baseline_s']) * 1e3:>9.3f}ms  "  # type: ignore[arg-type]
            f"{float(row['imageguard_s']) * 1e3:>9.3f}ms  {float(row['ratio']):>6.2f}x  "  # type: ignore[arg-type]
            f"{row['target']}  {'ok' if row['passed'] else 'MISSED'}"
        )
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
