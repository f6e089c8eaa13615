"""atheris harness: Core.decide and Core.parse_query/url on mutated requests.

    python fuzz/fuzz_request.py fuzz/corpus/request -dict=fuzz/corpus/request.dict \\
        -max_total_time=3600 -timeout=10 -artifact_prefix=fuzz/crashes/request-

Input format: see ``fuzz/seeds.py`` (a flags byte, then raw path, other path and query on
three lines). Invariants (``tests/test_fuzz.py``): ``check_request`` (only ``Rejected``
escapes; an accepted path has no ``..``/``.`` segment, NUL, control character, backslash,
``;`` or ``%``, and the fill's own request passes the same check) and
``check_query_round_trip`` (parameters parsed from an accepted query, signed again with
``url()``, are accepted again with the same transform and source parameters).
"""

from __future__ import annotations

import sys

import atheris
import seeds  # puts this checkout first on sys.path

with atheris.instrument_imports(include=["imageguard"]):
    from imageguard.core import Request

checks = seeds.checks()


def TestOneInput(data: bytes) -> None:
    core_name, method, path, raw_path, query = seeds.parse_request_input(data)
    core = checks.CORES[core_name]
    checks.check_request(core, Request(method, path, query, raw_path=raw_path))
    checks.check_query_round_trip(core, seeds.ROUND_TRIP_PATH, query)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
