"""atheris harness: sanitize_svg on mutated documents.

    python fuzz/fuzz_svg.py fuzz/corpus/svg -dict=fuzz/corpus/svg.dict \\
        -max_total_time=3600 -timeout=20 -artifact_prefix=fuzz/crashes/svg-

Invariant (``tests/test_fuzz.py`` ``check_svg``): an ``InvalidImage`` with a documented
reason, or a body that passes the independent SVG rule (``tests/svg_rule.py``) parsed as
XML and as HTML, is accepted again and is a fixed point. The limits of an input are picked
by its CRC-32, so a crash file replays alone.
"""

from __future__ import annotations

import random
import sys
import zlib

import atheris
import seeds  # puts this checkout first on sys.path

with atheris.instrument_imports(include=["imageguard", "tinycss2", "defusedxml"]):
    from imageguard.svg import SvgLimits

checks = seeds.checks()

LIMITS = (
    SvgLimits(raster=checks.SVG_RASTER_LIMITS),
    SvgLimits(raster=checks.SVG_RASTER_LIMITS, accept_unnamespaced=True),
    SvgLimits(raster=checks.SVG_RASTER_LIMITS, data_images=False, max_use_depth=2, max_use_expansion=500),
    SvgLimits(
        raster=checks.SVG_RASTER_LIMITS,
        max_bytes=8192,
        max_nodes=64,
        max_depth=8,
        max_use=4,
        max_use_depth=1,
        max_use_expansion=40,
        max_css_bytes=256,
    ),
)
SPLICE = seeds.seed_bytes("svg")


def TestOneInput(data: bytes) -> None:
    checks.check_svg(data, LIMITS[zlib.crc32(data) % len(LIMITS)])


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations 40% of the time, else the tests' text-aware ones (corpus attack fragments)."""
    rng = random.Random(seed)
    if rng.random() < 0.4:
        return atheris.Mutate(data, max_size)
    return bytes(checks.mutate(checks.Randomly(rng), data, SPLICE, checks.SVG_MUTATIONS, most=2))[:max_size]


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
