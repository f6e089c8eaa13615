"""Seed corpora and dictionaries for the atheris harnesses, and what the harnesses share.

Run it before the first long run (it only reads ../shared/corpus and writes under ``--out``)::

    python fuzz/seeds.py                      # every target, into fuzz/corpus/<target>/
    python fuzz/seeds.py raster svg           # some targets
    python fuzz/seeds.py --out /tmp/corpora   # elsewhere

Each target gets ``<out>/<target>/`` (one file per seed) and ``<out>/<target>.dict`` (a
libFuzzer dictionary: chunk names, markers, attack fragments). Seeds come from the same
functions as the hypothesis tests (``tests/test_fuzz.py``), and the harnesses call that
module's ``check_*`` functions and mutations, so the long runs enforce exactly the CI invariants.

The request harness reads a small text format, built by :func:`request_input`::

    <flags byte> <raw path> \\n <other path> \\n <query>

flags bit 0: the core (0 ``transforms`` signing, 1 ``always`` with expiries and
``/img,/static`` paths); bits 1-2: how path and raw path relate (0 and 3: raw path and
its percent-decoding, as ASGI servers give them; 1: decoded path only; 2: the second line is
the path, unrelated to the raw path); bits 3-4: GET, HEAD, POST, GET.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests` and `imageguard` from this checkout
    sys.path.insert(0, str(REPO))

TARGETS = ("raster", "svg", "request", "envelope")
DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"
CORE_NAMES = ("transforms", "always")
METHODS = ("GET", "HEAD", "POST", "GET")
#: The accepted path every request input's query is also re-signed for (the round-trip check).
ROUND_TRIP_PATH = "/img/a.png"


def checks() -> Any:
    """``tests.test_fuzz``: imported late, so that a harness instruments imageguard first."""
    from tests import test_fuzz

    return test_fuzz


# --------------------------------------------------------------------------
# The request harness's input format
# --------------------------------------------------------------------------


def request_input(
    raw: str, query: str = "", *, core: int = 0, mode: int = 0, method: int = 0, other: str = ""
) -> bytes:
    flags = (core & 1) | (mode & 3) << 1 | (method & 3) << 3
    return bytes([flags]) + "\n".join((raw, other, query)).encode("utf-8", "surrogatepass")


def parse_request_input(data: bytes) -> tuple[str, str, str, str | None, str]:
    """(core name, method, path, raw path, query) of a request harness input."""
    flags = data[0] if data else 0
    fields = [*data[1:].split(b"\n", 2), b"", b""]
    raw = fields[0].decode("utf-8", "replace")
    other = fields[1].decode("utf-8", "replace")
    query = fields[2].decode("latin-1")  # as the adapters decode QUERY_STRING / query_string
    mode = (flags >> 1) & 3
    path, raw_path = unquote(raw, errors="replace"), raw
    if mode == 1:
        raw_path = None
    elif mode == 2:
        path, raw_path = raw, other or None
    return CORE_NAMES[flags & 1], METHODS[(flags >> 3) & 3], path, raw_path, query


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------


def _request_seeds() -> Iterator[tuple[str, bytes]]:
    t = checks()
    queries = ["", "w=32", "v=1", "e=1800000000", "w=32&h=32&fit=cover", "fmt=webp&q=80", "a=1&v=%C3%A9"]
    names = ["a.png", "x/cat.jpg", "é.webp", "v.svg"]
    for index, segment in enumerate(t._SEGMENTS):
        for mode in range(3):
            yield f"segment-{index}-{mode}", request_input(f"/img/{segment}/a.png", core=index & 1, mode=mode)
    for value in t._QUERY_VALUES:
        for name in ("w", "e", "v", "s", "fit"):
            yield f"query-{name}-{value[:8]}", request_input("/img/a.png", f"{name}={value}")
    for core_index, core_name in enumerate(CORE_NAMES):
        core = t.CORES[core_name]
        for name in names:
            for query in queries:
                params = dict(part.split("=", 1) for part in query.split("&") if part)
                source = {k: unquote(v) for k, v in params.items() if k in ("v", "a")}
                if core_name == "always":
                    source.pop("a", None)
                signed = {k: v for k, v in params.items() if k not in ("v", "a")}
                url = core.url(f"/img/{name}", **signed, **source)
                quoted, _, signed_query = url.partition("?")
                yield (
                    f"signed-{core_name}-{name}-{query}",
                    request_input(quoted, signed_query, core=core_index),
                )


def _envelope_seeds() -> Iterator[tuple[str, bytes]]:
    t = checks()
    for index, envelope in enumerate(t.ENVELOPES):
        yield f"envelope-{index}", envelope
        yield f"envelope-{index}-other-secret", t.OTHER_SEALER.seal(t.RECORDS[index])
        yield f"envelope-{index}-truncated", envelope[: len(envelope) // 2]


def seeds(target: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every seed of *target*."""
    t = checks()
    if target == "raster":
        yield from t.raster_seeds()
    elif target == "svg":
        yield from t.svg_seeds()
    elif target == "request":
        yield from _request_seeds()
    elif target == "envelope":
        yield from _envelope_seeds()
    else:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")


def seed_bytes(target: str) -> list[bytes]:
    """The seeds' bytes (the custom mutators splice them into inputs)."""
    return [data for _, data in seeds(target)]


# --------------------------------------------------------------------------
# Dictionaries
# --------------------------------------------------------------------------

_RASTER_TOKENS = (
    b"\x89PNG\r\n\x1a\n",
    b"IEND\xaeB`\x82",
    b"\xff\xd8\xff",
    b"\xff\xd9",
    b"\xff\xda",
    b"\xff\xc0",
    b"\xff\xc2",
    b"\xff\xc4",
    b"\xff\xdb",
    b"\xff\xdd",
    b"\xff\xe1",
    b"\xff\xe2",
    b"\xff\xfe",
    b"Exif\x00\x00",
    b"MM\x00*",
    b"II*\x00",
    b"ICC_PROFILE\x00",
    b"GIF89a",
    b"GIF87a",
    b"!\xf9\x04",
    b"!\xfe",
    b"!\xff\x0bNETSCAPE2.0",
    b",",
    b";",
    b"RIFF",
    b"WEBP",
    b"VP8 ",
    b"VP8L",
    b"VP8X",
    b"ANIM",
    b"ANMF",
    b"ALPH",
    b"EXIF",
    b"ICCP",
    b"ftyp",
    b"avif",
    b"avis",
    b"mif1",
    b"meta",
    b"ispe",
    b"\x00\x00\xff\xff",
    b"\xff\xff\xff\x7f",
)
_REQUEST_TOKENS = (
    "..",
    "%2e",
    "%2E%2E",
    "%2f",
    "%5c",
    "%00",
    "%25",
    "%C3%A9",
    ";",
    "\\",
    "/img/",
    "/static/",
    ".png",
    ".svg",
    "w=",
    "h=",
    "fit=",
    "q=",
    "fmt=",
    "s=",
    "e=",
    "v=",
    "url=",
    "&",
    "cover",
    "webp",
    "1800000000",
)


def dictionary(target: str) -> list[bytes]:
    """libFuzzer dictionary entries (at most 64 bytes each) for *target*."""
    if target == "raster":
        t = checks()
        return sorted({*_RASTER_TOKENS, *t.PNG_CHUNK_TYPES})
    if target == "svg":
        t = checks()
        tags, attributes, values, handlers = t.svg_fragments()
        entries = {
            text.encode("utf-8")
            for text in (*tags, *attributes, *values, *handlers)
            if len(text.encode("utf-8")) <= 64
        }
        return sorted(entries)
    if target == "request":
        return sorted(token.encode() for token in _REQUEST_TOKENS)
    if target == "envelope":
        return [
            b"IGE\x01",
            *(f'"{key}":'.encode() for key in ("created", "ct", "etag", "len", "lm", "src", "src_hash")),
        ]
    raise ValueError(f"unknown target {target!r}")


def _dict_line(entry: bytes) -> str:
    escaped = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C) else f"\\x{byte:02x}" for byte in entry
    )
    return f'"{escaped}"'


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _file_name(name: str, data: bytes) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
    return f"{stem}-{hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]}"


def write(target: str, out: Path) -> tuple[int, int]:
    """Write *target*'s seeds and dictionary under *out*; return (seeds, dictionary entries)."""
    folder = out / target
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, data in seeds(target):
        (folder / _file_name(name, data)).write_bytes(data)
        count += 1
    entries = dictionary(target)
    (out / f"{target}.dict").write_text("".join(_dict_line(entry) + "\n" for entry in entries))
    return count, len(entries)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("targets", nargs="*", metavar="target", help=f"{', '.join(TARGETS)} (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: fuzz/corpus")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    t = checks()
    if not t.CORPUS.is_dir():
        print(f"note: {t.CORPUS} not found: raster and svg get no seeds", file=sys.stderr)
    for target in args.targets or TARGETS:
        count, entries = write(target, args.out)
        print(
            f"{target}: {count} seeds in {args.out / target}, {entries} entries in {args.out / target}.dict"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
