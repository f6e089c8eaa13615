"""atheris harness: Sealer.open on mutated cache envelopes.

    python fuzz/fuzz_envelope.py fuzz/corpus/envelope -dict=fuzz/corpus/envelope.dict \\
        -max_total_time=3600 -timeout=10 -artifact_prefix=fuzz/crashes/envelope-

Invariant (``tests/test_fuzz.py`` ``check_envelope``): every input is opened under each
record's cache key and under a key no record has; it raises ``IntegrityError``, or it is
byte for byte the envelope sealed for that key and opens as exactly that record.
"""

from __future__ import annotations

import random
import sys

import atheris
import seeds  # puts this checkout first on sys.path

with atheris.instrument_imports(include=["imageguard"]):
    import imageguard.cache.envelope  # noqa: F401 - instrumented before the checks import it

checks = seeds.checks()
SPLICE = seeds.seed_bytes("envelope")


def TestOneInput(data: bytes) -> None:
    for record in checks.RECORDS:
        checks.check_envelope(data, record.key, record)
    checks.check_envelope(data, "no-such-key", None)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations half the time; header rewrites and part swaps (tests) otherwise."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    return bytes(checks.mutate(checks.Randomly(rng), data, SPLICE, checks.ENVELOPE_MUTATIONS, most=2))[
        :max_size
    ]


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
