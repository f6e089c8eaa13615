"""atheris harness: sanitize_raster on mutated images.

    python fuzz/fuzz_raster.py fuzz/corpus/raster -dict=fuzz/corpus/raster.dict \\
        -max_total_time=3600 -timeout=20 -artifact_prefix=fuzz/crashes/raster-

Invariant (``tests/test_fuzz.py`` ``check_raster``): an ``InvalidImage`` with a documented
reason, or a fresh encode that Pillow decodes as the format it claims, within the limits and
the requested box, without metadata or trailing bytes, and accepted again. The limits and
transform of an input are picked by its CRC-32, so a crash file replays alone.
"""

from __future__ import annotations

import random
import sys
import warnings
import zlib

import atheris
import seeds  # puts this checkout first on sys.path

with atheris.instrument_imports(include=["imageguard", "PIL"]):
    from imageguard.raster import OUTPUT_AVAILABLE, RasterLimits, Transform

checks = seeds.checks()

LIMITS = (
    RasterLimits(max_pixels=65536, max_side=512, max_frames=12),
    RasterLimits(max_pixels=65536, max_side=512, max_frames=12),
    RasterLimits(max_pixels=4096, max_side=96, max_frames=3),
    RasterLimits(max_pixels=65536, max_side=512, max_frames=12, formats=frozenset({"png", "jpeg"})),
)
TRANSFORMS = (
    Transform(),
    Transform(),
    Transform(w=32),
    Transform(h=20),
    Transform(w=40, h=30),
    Transform(w=40, h=30, fit="cover"),
    Transform(w=40, h=30, fit="fill"),
    Transform(w=1000, h=7, fit="cover"),
    Transform(w=16, q=30, fmt="jpeg"),
    Transform(w=24, h=24, fit="cover", fmt="gif"),
    Transform(q=1, fmt="webp"),
    *(Transform(fmt=fmt) for fmt in sorted(OUTPUT_AVAILABLE)),
)
SPLICE = seeds.seed_bytes("raster")


def TestOneInput(data: bytes) -> None:
    selector = zlib.crc32(data)
    checks.check_raster(data, LIMITS[selector % len(LIMITS)], TRANSFORMS[(selector >> 8) % len(TRANSFORMS)])


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations half the time, the tests' structure-aware ones otherwise; PNG CRCs fixed."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        data = atheris.Mutate(data, max_size)
    else:
        choose = checks.Randomly(rng, keep=checks.RASTER_KEEP)
        data = bytes(checks.mutate(choose, data, SPLICE, checks.RASTER_MUTATIONS, most=2))[:max_size]
    if data.startswith(b"\x89PNG") and rng.random() < 0.75:
        data = checks.fix_png_crcs(data)
    return data


def main() -> None:
    warnings.simplefilter("ignore")  # Pillow warns about every odd APNG/EXIF; only exceptions count
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
