"""The raster pipeline against plain Pillow on the same photo-like JPEGs.

(a) Re-encode of a 1920x1080 JPEG: ``sanitize_raster`` (sniff, header checks,
    limits, metadata stripping, encode) vs raw ``Image.open`` + ``load`` +
    ``save(quality=85)``. Target: at most 1.15x the raw time.
(b) Resize of a 4000x3000 JPEG to 320 wide: ``sanitize_raster(w=320)`` (JPEG
    draft mode + Lanczos with ``reducing_gap``) vs the naive
    ``Image.open().resize((320, 240), LANCZOS)`` + save. Target: at least 3x
    faster (ratio at most 0.333).

Both sides run in the same process, interleaved, several times; the median
counts. The inputs are generated here (gradients + noise). Run:
``python benchmarks/bench_raster.py``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

# Run as a script (python benchmarks/bench_x.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_pair
from imageguard.raster import RasterLimits, Transform, sanitize_raster

QUALITY = 85  # imageguard's default JPEG quality, so both sides encode alike
REPEATS = {"reencode": 15, "resize": 9}


def photo_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth gradients under sensor-like noise, saved at quality 92."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.radial_gradient("L").resize((width, height))
    blue = Image.linear_gradient("L").rotate(90).resize((width, height))
    noise = Image.effect_noise((width, height), 24)
    image = Image.merge(
        "RGB",
        (
            Image.blend(red, noise, 0.3),
            Image.blend(green, noise, 0.2),
            Image.blend(blue, noise, 0.25),
        ),
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def run() -> list[dict[str, object]]:
    """Measure; return one row per comparison (``ratio`` is imageguard / baseline)."""
    limits = RasterLimits()
    hd = photo_jpeg(1920, 1080)
    large = photo_jpeg(4000, 3000)

    def raw_reencode() -> bytes:
        image = Image.open(io.BytesIO(hd))
        image.load()
        out = io.BytesIO()
        image.save(out, "JPEG", quality=QUALITY)
        return out.getvalue()

    def guarded_reencode() -> bytes:
        return sanitize_raster(hd, limits).body

    def naive_resize() -> bytes:
        image = Image.open(io.BytesIO(large)).resize((320, 240), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=QUALITY)
        return out.getvalue()

    def guarded_resize() -> bytes:
        return sanitize_raster(large, limits, Transform(w=320)).body

    reencode = median_pair(raw_reencode, guarded_reencode, REPEATS["reencode"])
    resize = median_pair(naive_resize, guarded_resize, REPEATS["resize"])
    return [
        {
            "name": "re-encode 1920x1080 JPEG vs Pillow open+load+save",
            "baseline_s": reencode[0],
            "imageguard_s": reencode[1],
            "ratio": reencode[1] / reencode[0],
            "target": "<= 1.15x",
            "passed": reencode[1] / reencode[0] <= 1.15,
        },
        {
            "name": "resize 4000x3000 JPEG to w=320 vs naive resize",
            "baseline_s": resize[0],
            "imageguard_s": resize[1],
            "ratio": resize[1] / resize[0],
            "target": "<= 0.333x (>= 3x faster)",
            "passed": resize[0] / resize[1] >= 3.0,
        },
    ]


if __name__ == "__main__":
    print(f"{'comparison':<52} {'baseline':>10} {'imageguard':>11} {'ratio':>7}  target")
    for row in run():
        verdict = "ok" if row["passed"] else "MISSED"
        print(
            f"{row['name']:<52} {row['baseline_s']:9.4f}s {row['imageguard_s']:10.4f}s "
            f"{row['ratio']:6.3f}x  {row['target']} {verdict}"
        )
