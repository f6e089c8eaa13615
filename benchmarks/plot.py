"""Draw the ratios of ``benchmarks/run.py`` as a horizontal bar chart (matplotlib).

    python benchmarks/run.py --plot benchmarks/results/ratios.svg     # measure, then draw
    python benchmarks/plot.py benchmarks/results/latest.json out.png  # redraw a saved run

One bar per row, from 1x (the baseline) to the measured ratio on a log scale, so
a bar to the left means imageguard takes less time than the baseline and one to
the right more. Each bar is labelled with its ratio; a row with a numeric
target (``<= 1.2x``) gets a marker there, and its bar is green when the target
is met and red when it is not (grey: no target). PNG or SVG by the file's
extension. matplotlib is imported only here, only when drawing:
``pip install 'imageguard[bench]'``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "matplotlib is needed to draw the chart: pip install 'imageguard[bench]'"
_TARGET_RE = re.compile(r"<=\s*([0-9]*\.?[0-9]+)\s*x")
COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}  # met, missed, no target


def require_matplotlib() -> None:
    """Fail early, with the install command, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(INSTALL_HINT) from exc


def target_ratio(target: object) -> float | None:
    """The numeric bound of a target such as ``"<= 1.2x"`` or ``"<= 0.333x (>= 3x faster)"``."""
    match = _TARGET_RE.search(str(target))
    return float(match.group(1)) if match else None


def verdict(row: dict[str, Any]) -> bool | None:
    """Target met (True), missed (False), or no numeric target (None).

    A benchmark's own ``passed`` wins (it may judge another number than the
    ratio); otherwise the ratio is held against the target's bound.
    """
    for key in ("met", "passed"):
        if isinstance(row.get(key), bool):
            return bool(row[key])
    bound = target_ratio(row.get("target"))
    return None if bound is None else float(row["ratio"]) <= bound


def plot_ratios(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Write the chart of *rows* (``name``, ``ratio``, ``target``; optional ``passed``) to *path*."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "imageguard-benchmarks"  # stable ids: diffable SVG
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = [str(row["name"]) for row in rows]
    ratios = [float(row["ratio"]) for row in rows]
    targets = [target_ratio(row.get("target")) for row in rows]
    verdicts = [verdict(row) for row in rows]
    values = [*ratios, *(t for t in targets if t is not None), 1.0]
    low, high = min(values) / 2.2, max(values) * 2.2

    figure, axes = plt.subplots(figsize=(11, 1.6 + 0.36 * len(rows)), layout="constrained")
    positions = list(range(len(rows)))[::-1]  # first row on top
    axes.barh(
        positions,
        [r - 1.0 for r in ratios],
        left=1.0,
        height=0.62,
        color=[COLOURS[v] for v in verdicts],
    )
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    axes.axvline(1.0, color="black", linewidth=1)
    for y, ratio, target in zip(positions, ratios, targets, strict=True):
        faster = ratio < 1.0
        anchor = ratio
        if target is not None and max(target, ratio) / min(target, ratio) < 1.6:
            # a target just past the bar's end: label past the marker, not across it
            anchor = min(ratio, target) if faster else max(ratio, target)
        axes.annotate(
            f"{ratio:.2f}×",
            (anchor, y),
            xytext=(-4 if faster else 4, 0),
            textcoords="offset points",
            ha="right" if faster else "left",
            va="center",
            fontsize=8,
        )
    marked = [(y, t) for y, t in zip(positions, targets, strict=True) if t is not None]
    if marked:
        axes.scatter(
            [t for _, t in marked],
            [y for y, _ in marked],
            marker="|",
            s=260,
            linewidths=2,
            color="#1565c0",
            zorder=3,
        )
    axes.set_yticks(positions, names, fontsize=8)
    axes.set_ylim(-0.7, len(rows) - 0.3)
    ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100) if low <= t <= high]
    axes.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    axes.minorticks_off()
    axes.set_xlabel("imageguard time / baseline time (log scale; left of 1× = imageguard takes less)")
    axes.grid(axis="x", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    figure.legend(
        handles=[
            Patch(color=COLOURS[True], label="target met"),
            Patch(color=COLOURS[False], label="target missed"),
            Patch(color=COLOURS[None], label="no target (reported)"),
            Line2D([], [], color="#1565c0", marker="|", linestyle="", markersize=12, label="target"),
        ],
        loc="outside lower center",
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    if title:
        axes.set_title(title, fontsize=9, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Date": None} if path.suffix.lower() == ".svg" else {}
    figure.savefig(path, metadata=metadata, dpi=150, bbox_inches="tight")
    plt.close(figure)
    if any(math.isnan(r) for r in ratios):
        print(f"warning: some ratios are not numbers in {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python benchmarks/plot.py RESULTS.json OUT.(svg|png)", file=sys.stderr)
        return 2
    results = json.loads(Path(args[0]).read_text())
    plot_ratios(results["rows"], Path(args[1]), title=results.get("title", ""))
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
