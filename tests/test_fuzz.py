"""Bounded fuzzing of the four parsers that see attacker bytes (hypothesis, marker ``fuzz``).

Each target is driven by real files from ../shared/corpus (raster and SVG),
mutated by hypothesis strategies: byte flips, interesting values, truncations,
deletions, duplications, splices of two seeds, and format-aware edits (PNG
chunks with valid CRCs, JPEG segments, GIF blocks, SVG elements, attributes and
URL values taken from the corpus's attack files). The runs are derandomized and
bounded so that CI repeats exactly the same examples in a few seconds per
target; ``fuzz/`` holds the atheris harnesses for long runs, and they call the
``check_*`` functions below, so both enforce the same invariants:

- raster: :func:`~imageguard.raster.sanitize_raster` refuses with
  :class:`~imageguard.errors.InvalidImage`, or returns a body that Pillow
  decodes as the format it claims, within the limits and the requested box,
  without metadata or trailing bytes, and that is accepted again;
- SVG: :func:`~imageguard.svg.sanitize_svg` refuses, or returns a body that is
  accepted again, is a fixed point, and passes the independent rule checker
  (:mod:`tests.svg_rule`) parsed as XML and as HTML;
- requests: :meth:`~imageguard.core.Core.decide` raises only
  :class:`~imageguard.errors.Rejected`; an accepted path holds no ``..``/``.``
  segment, NUL, control character, backslash, ``;`` or ``%``; re-signing the
  parsed parameters with :meth:`~imageguard.core.Core.url` gives a URL that is
  accepted with the same transform and source parameters;
- envelope: :meth:`~imageguard.cache.envelope.Sealer.open` of a mutated
  envelope raises :class:`~imageguard.cache.envelope.IntegrityError` or
  returns exactly the sealed record; random bytes raise nothing else.

``IMAGEGUARD_FUZZ_SCALE`` multiplies every example count (a longer local run);
``IMAGEGUARD_FUZZ_CRASH_DIR`` makes a failing check save its input there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote, unquote, unquote_plus

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image

from imageguard import Settings
from imageguard.cache.envelope import IntegrityError, Record, Sealer
from imageguard.core import PASS, Core, FillPlan, Hit, Request, normalise_path, parse_transform
from imageguard.errors import BadRequest, InvalidImage, InvalidSignature, Rejected
from imageguard.raster import (
    CONTENT_TYPES,
    OUTPUT_AVAILABLE,
    RASTER_FORMATS,
    RasterLimits,
    SanitizedImage,
    Transform,
    sanitize_raster,
    sniff,
)
from imageguard.signing import canonical_form
from imageguard.svg import SanitizedSvg, SvgLimits, sanitize_svg
from tests.support import PIL_NAMES, RASTER_REASONS, SVG_REFUSALS
from tests.svg_rule import is_html_safe, is_svg_safe

#: ../shared/corpus relative to the repository root (absent in a user's fresh clone).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
SECRET = "fuzz-secret-key-0123456789abcdef"
#: A fixed clock (2023-11-14): signed expiries are judged against it.
NOW = 1_700_000_000.0
SCALE = float(os.environ.get("IMAGEGUARD_FUZZ_SCALE", "1"))


def _examples(count: int) -> int:
    return max(1, int(count * SCALE))


def fuzz_settings(count: int) -> settings:
    """Reproducible and bounded: the same examples on every CI run, no example database."""
    return settings(
        max_examples=_examples(count),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        # Shrink a failure, but skip the explain phase: it costs more than the search itself.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _note(text: str) -> None:
    """hypothesis.note inside a test; nothing under atheris (the harnesses share the checks)."""
    with contextlib.suppress(InvalidArgument):
        note(text)


def _event(text: str) -> None:
    """hypothesis.event (``--hypothesis-show-statistics``: how many examples got how far)."""
    with contextlib.suppress(InvalidArgument):
        event(text)


T = TypeVar("T")


def outcome(function: Callable[..., T], *args: object) -> tuple[T | None, Rejected | None]:
    """``(result, None)``, or ``(None, refusal)`` when *function* raises :class:`Rejected` (only that)."""
    try:
        return function(*args), None
    except Rejected as exc:
        return None, exc


@contextlib.contextmanager
def saved_on_failure(target: str, data: bytes) -> Iterator[None]:
    """Write *data* to ``$IMAGEGUARD_FUZZ_CRASH_DIR/<target>-<sha1>.bin`` when the check fails."""
    try:
        yield
    except BaseException:
        folder = os.environ.get("IMAGEGUARD_FUZZ_CRASH_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            name = f"{target}-{hashlib.sha1(data).hexdigest()}.bin"
            (Path(folder) / name).write_bytes(data)
        raise


# ==========================================================================
# Seeds (read once per process; the fixtures skip when the corpus is absent)
# ==========================================================================

#: Corpus sets whose allowed-format files seed the raster target.
RASTER_SEED_SETS = (
    "pngsuite",
    "pillow-tests-images",
    "image-png-bugfixes",
    "payloadsallthethings/image-metadata",
    "payloadsallthethings/image-pixel-payload",
)
#: Larger seeds only slow every mutation down; the corpus keeps 240 files under it.
MAX_RASTER_SEED = 64 * 1024
#: Corpus sets whose documents seed the SVG target.
SVG_SEED_SETS = (
    "svg-sanitizer-darylldoyle",
    "svg-sanitizer-borewit",
    "h5sc-html5sec",
    "httpleaks-cure53",
    "payloadsallthethings/svg-xss",
    "payloadsallthethings/ssrf-svg",
    "payloadsallthethings/xxe",
    "payloadsallthethings/imagemagick-delegates",
    "defusedxml-xmltestdata",
)
_DOCUMENT_SUFFIXES = frozenset({".svg", ".xml", ".xxe", ".dtd", ".xsl", ".html"})
MAX_SVG_SEED = 64 * 1024
SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
SVG_OPEN = f'<svg xmlns="{SVG_NS}" xmlns:xlink="{XLINK_NS}">'


@lru_cache(maxsize=1)
def raster_seeds() -> tuple[tuple[str, bytes], ...]:
    """(corpus-relative name, bytes) of every small corpus file that sniffs as an allowed raster format."""
    if not CORPUS.is_dir():
        return ()
    seeds = []
    for folder in RASTER_SEED_SETS:
        for path in sorted((CORPUS / folder).rglob("*")):
            if not path.is_file() or path.stat().st_size > MAX_RASTER_SEED:
                continue
            data = path.read_bytes()
            if sniff(data) in RASTER_FORMATS:
                seeds.append((path.relative_to(CORPUS).as_posix(), data))
    return tuple(seeds)


def _svg_payloads() -> Iterator[tuple[str, str]]:
    """Markup payloads from the corpus's JSON fixtures (DOMPurify, html5sec, HTTPLeaks)."""
    for case in json.loads((CORPUS / "dompurify-fixtures/expect.json").read_text("utf-8")):
        yield f"dompurify#{case['index']}", str(case["payload"])
    for vector in json.loads((CORPUS / "h5sc-html5sec/vectors-svg-subset.json").read_text("utf-8")):
        yield f"html5sec#{vector['id']}", str(vector["vector"])
    snippets = json.loads((CORPUS / "httpleaks-cure53/svg-snippets.json").read_text("utf-8"))
    for snippet in snippets:
        text = str(snippet["snippet"])
        yield f"httpleaks#{snippet['line']}", unquote(text) if "%20" in text else text


@lru_cache(maxsize=1)
def svg_seeds() -> tuple[tuple[str, bytes], ...]:
    """(name, bytes): every SVG/XML document of the corpus, and each markup payload as an SVG body."""
    if not CORPUS.is_dir():
        return ()
    seeds = []
    for folder in SVG_SEED_SETS:
        for path in sorted((CORPUS / folder).rglob("*")):
            if path.suffix.lower() in _DOCUMENT_SUFFIXES and path.stat().st_size <= MAX_SVG_SEED:
                seeds.append((path.relative_to(CORPUS).as_posix(), path.read_bytes()))
    for name, payload in _svg_payloads():
        if "<svg" not in payload.lower() and "<math" not in payload.lower():
            continue
        head = payload.lstrip()
        if not head.startswith(("<svg", "<?xml")):
            payload = SVG_OPEN + payload + "</svg>"
        elif head.startswith("<svg") and "xmlns=" not in head.split(">", 1)[0]:
            payload = head.replace("<svg", SVG_OPEN[:-1], 1)
        seeds.append((name, payload.encode("utf-8")))
    return tuple(seeds)


_START_TAG = re.compile(r"<[A-Za-z][\w:.\-]*(?:\s[^<>]*)?/?>")
_ATTRIBUTE = re.compile(r"""[A-Za-z_][\w:.\-]*\s*=\s*(?:"[^"<]*"|'[^'<]*')""")
_URLISH = re.compile(
    r"""(?:href|src|action|xlink:href|from|to|values|style|fill|filter)\s*=\s*"([^"<]{1,160})\""""
)

#: A few obfuscations written here, on top of what the corpus files hold.
EXTRA_VALUES = (
    "java&#x09;script:alert(1)",
    "&#106;avascript:alert(1)",
    " javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "\tjavascript:alert(1)",
    "data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+",
    "data:text/html,<script>alert(1)</script>",
    "url(http://leaking.via/x)",
    "u\\72 l(http://leaking.via/x)",
    "url( 'https://leaking.via/x' )",
    "#a",
    " #a ",
    "#a&#x3a;b",
    "url(#a)",
    "//leaking.via/x",
    "expression(alert(1))",
    "@import 'http://leaking.via/x.css';",
)


@lru_cache(maxsize=1)
def svg_fragments() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(start tags, attributes, attribute values, event handler names) taken from the corpus."""
    if not CORPUS.is_dir():
        return (), (), EXTRA_VALUES, ("onload",)
    tags: set[str] = set()
    attributes: set[str] = set()
    values: set[str] = set(EXTRA_VALUES)
    texts = [data.decode("utf-8", "replace") for _, data in svg_seeds()]
    texts += [payload for _, payload in _svg_payloads()]
    for text in texts:
        tags.update(tag for tag in _START_TAG.findall(text) if len(tag) <= 300)
        attributes.update(attribute for attribute in _ATTRIBUTE.findall(text) if len(attribute) <= 200)
        values.update(_URLISH.findall(text))
    handlers: set[str] = set()
    for name in ("0xcela_event_handlers.txt", "port_swigger_xss_cheatsheet_event_handlers.txt"):
        lines = (CORPUS / "payloadsallthethings/xss-lists" / name).read_text("utf-8", "replace").splitlines()
        handlers.update(line.strip() for line in lines if re.fullmatch(r"on[a-z]{2,40}", line.strip(), re.I))
    return tuple(sorted(tags)), tuple(sorted(attributes)), tuple(sorted(values)), tuple(sorted(handlers))


@pytest.fixture(scope="module")
def raster_corpus(corpus_dir: Path) -> tuple[tuple[str, bytes], ...]:
    seeds = raster_seeds()
    assert seeds, f"no raster seeds under {corpus_dir}"
    return seeds


@pytest.fixture(scope="module")
def svg_corpus(corpus_dir: Path) -> tuple[tuple[str, bytes], ...]:
    seeds = svg_seeds()
    assert seeds, f"no SVG seeds under {corpus_dir}"
    assert all(svg_fragments()[:2]), "no attack fragments extracted from the corpus"
    return seeds


@pytest.fixture(autouse=True, scope="module")
def _no_ghostscript() -> Iterator[None]:
    """Corpus rule 3: Pillow must never hand a file to Ghostscript in this process."""
    from PIL import EpsImagePlugin

    saved = EpsImagePlugin.gs_binary
    EpsImagePlugin.gs_binary = False
    yield
    EpsImagePlugin.gs_binary = saved


# ==========================================================================
# Byte mutations (generic) and format-aware ones
# ==========================================================================


class Chooser(Protocol):
    """Where a mutation's choices come from: hypothesis (:class:`Draws`) or a PRNG (:class:`Randomly`)."""

    #: Leading bytes that position-based byte mutations leave alone (keeps a format's magic sniffable).
    keep: int

    def integer(self, low: int, high: int, label: str) -> int: ...
    def choice(self, options: Sequence[T], label: str) -> T: ...
    def boolean(self, label: str) -> bool: ...
    def binary(self, max_size: int, label: str, min_size: int = 0) -> bytes: ...


class Draws:
    """Choices drawn by hypothesis: shrunk and printed with their labels when a check fails."""

    def __init__(self, data: st.DataObject, keep: int = 0) -> None:
        self.data = data
        self.keep = keep

    def integer(self, low: int, high: int, label: str) -> int:
        return self.data.draw(st.integers(low, high), label=label)

    def choice(self, options: Sequence[T], label: str) -> T:
        return self.data.draw(st.sampled_from(options), label=label)

    def boolean(self, label: str) -> bool:
        return self.data.draw(st.booleans(), label=label)

    def binary(self, max_size: int, label: str, min_size: int = 0) -> bytes:
        return self.data.draw(st.binary(min_size=min_size, max_size=max_size), label=label)


class Randomly:
    """The same choices from a seeded :class:`random.Random` (the atheris harnesses' custom mutators)."""

    def __init__(self, rng: random.Random, keep: int = 0) -> None:
        self.rng = rng
        self.keep = keep

    def integer(self, low: int, high: int, label: str) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[T], label: str) -> T:
        return options[self.rng.randrange(len(options))]

    def boolean(self, label: str) -> bool:
        return self.rng.random() < 0.5

    def binary(self, max_size: int, label: str, min_size: int = 0) -> bytes:
        return self.rng.randbytes(self.rng.randint(min_size, max_size))


Mutation = Callable[[Chooser, bytearray, Sequence[bytes]], bytearray]
_INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF)
_INTERESTING_32 = (
    0,
    1,
    0x7F,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
)


def _pos(choose: Chooser, buf: bytearray, label: str = "pos") -> int:
    """A position in *buf*, after the leading ``choose.keep`` bytes (a format's magic) when it can."""
    return choose.integer(min(choose.keep, len(buf)), len(buf), label)


def _index(choose: Chooser, buf: bytearray, label: str) -> int:
    return choose.integer(min(choose.keep, len(buf) - 1), len(buf) - 1, label)


def flip_bits(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    if buf:
        index = _index(choose, buf, "flip at")
        buf[index] ^= choose.integer(1, 255, "mask")
    return buf


def set_interesting(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    if not buf:
        return buf
    index = _index(choose, buf, "set at")
    if choose.boolean("32-bit"):
        value = choose.choice(_INTERESTING_32, "u32")
        order = choose.choice([">I", "<I"], "order")
        buf[index : index + 4] = struct.pack(order, value)
    else:
        buf[index] = choose.choice(_INTERESTING_8, "u8")
    return buf


def truncate(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    return buf[: _pos(choose, buf, "truncate at")]


def delete_range(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    start = _pos(choose, buf, "delete at")
    del buf[start : start + choose.integer(1, 256, "delete length")]
    return buf


def insert_bytes(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    start = _pos(choose, buf, "insert at")
    buf[start:start] = choose.binary(64, "inserted", min_size=1)
    return buf


def duplicate_range(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    if not buf:
        return buf
    start = _index(choose, buf, "copy from")
    piece = buf[start : start + choose.integer(1, 512, "copy length")]
    target = _pos(choose, buf, "copy to")
    buf[target:target] = piece
    return buf


def splice(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """The head of this input and the tail of another seed."""
    other = others[choose.integer(0, len(others) - 1, "splice with")] if others else bytes(buf)
    head = _pos(choose, buf, "head length")
    tail = choose.integer(0, len(other), "tail from")
    return buf[:head] + bytearray(other[tail:])


GENERIC_MUTATIONS: tuple[Mutation, ...] = (
    flip_bits,
    set_interesting,
    truncate,
    delete_range,
    insert_bytes,
    duplicate_range,
    splice,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Raster byte mutations start after the signature: a destroyed magic only tests sniff(), over and over.
RASTER_KEEP = len(PNG_SIGNATURE)
#: Chunk types worth inserting: critical, animation, metadata and size-bearing ones.
PNG_CHUNK_TYPES = (
    b"IHDR",
    b"PLTE",
    b"IDAT",
    b"IEND",
    b"tRNS",
    b"acTL",
    b"fcTL",
    b"fdAT",
    b"tEXt",
    b"zTXt",
    b"iTXt",
    b"iCCP",
    b"eXIf",
    b"sRGB",
    b"gAMA",
    b"cHRM",
    b"pHYs",
    b"sBIT",
    b"bKGD",
    b"cICP",
    b"tIME",
    b"vpAg",
)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunk_offsets(buf: bytes) -> list[int]:
    """Offsets of the chunks whose length fits the data (the walk stops at the first that does not)."""
    offsets = []
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(buf):
        length = struct.unpack_from(">I", buf, pos)[0]
        if pos + 12 + length > len(buf):
            break
        offsets.append(pos)
        pos += 12 + length
    return offsets


def fix_png_crcs(buf: bytes) -> bytes:
    """Recompute every walkable chunk's CRC, so that a mutation reaches past Pillow's CRC check."""
    if not buf.startswith(PNG_SIGNATURE[:4]):
        return buf
    out = bytearray(buf)
    for start in png_chunk_offsets(buf):
        length = struct.unpack_from(">I", buf, start)[0]
        body = bytes(out[start + 4 : start + 8 + length])
        out[start + 8 + length : start + 12 + length] = struct.pack(">I", zlib.crc32(body))
    return bytes(out)


def _chunk_payload(choose: Chooser, kind: bytes) -> bytes:
    if kind == b"IHDR":
        width = choose.choice([0, 1, 7, 32, 300, 70000, 0x7FFFFFFF], "w")
        height = choose.choice([0, 1, 9, 32, 300, 70000, 0x7FFFFFFF], "h")
        depth = choose.choice([0, 1, 2, 4, 8, 16, 99], "bit depth")
        colour = choose.choice([0, 2, 3, 4, 6, 1, 9], "colour type")
        interlace = choose.choice([0, 1, 2], "interlace")
        return struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    if kind == b"acTL":
        frames = choose.choice([0, 1, 2, 3, 50, 0xFFFFFFFF], "acTL frames")
        return struct.pack(">II", frames, choose.integer(0, 3, "plays"))
    if kind == b"fcTL":
        return struct.pack(
            ">IIIIIHHBB",
            choose.integer(0, 40, "sequence"),
            choose.choice([0, 1, 16, 32, 5000], "fcTL w"),
            choose.choice([0, 1, 16, 32, 5000], "fcTL h"),
            choose.choice([0, 1, 16, 0xFFFFFFF0], "fcTL x"),
            choose.choice([0, 1, 16, 0xFFFFFFF0], "fcTL y"),
            choose.integer(0, 0xFFFF, "delay num"),
            choose.choice([0, 1, 100, 1000], "delay den"),
            choose.integer(0, 3, "dispose"),
            choose.integer(0, 2, "blend"),
        )
    if kind in (b"zTXt", b"iCCP"):
        return b"k\x00\x00" + zlib.compress(choose.binary(200, "compressed"))
    if kind == b"IDAT" and choose.boolean("zlib IDAT"):
        return zlib.compress(choose.binary(300, "raw scanlines"))
    return choose.binary(64, "chunk data")


def png_insert_chunk(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    offsets = [*png_chunk_offsets(buf), len(buf)]
    at = choose.choice(offsets, "chunk boundary")
    kind = choose.choice(PNG_CHUNK_TYPES, "chunk type")
    buf[at:at] = png_chunk(kind, _chunk_payload(choose, kind))
    return buf


def png_drop_or_repeat_chunk(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    offsets = png_chunk_offsets(buf)
    if not offsets:
        return buf
    start = choose.choice(offsets, "chunk")
    end = start + 12 + struct.unpack_from(">I", buf, start)[0]
    chunk = buf[start:end]
    if choose.boolean("repeat (else drop)"):
        buf[end:end] = chunk
    else:
        del buf[start:end]
    return buf


def jpeg_insert_segment(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    marker = choose.choice(
        [0xE0, 0xE1, 0xE2, 0xED, 0xEE, 0xFE, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xDA, 0xD9], "marker"
    )
    payload = choose.binary(96, "segment data")
    if marker in (0xC0, 0xC2) and choose.boolean("plausible SOF"):
        height = choose.choice([0, 1, 8, 600, 65535], "SOF h")
        width = choose.choice([0, 1, 8, 600, 65535], "SOF w")
        payload = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    if marker == 0xE1 and choose.boolean("EXIF orientation"):
        orientation = choose.integer(0, 9, "orientation")
        payload = (
            b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
            + struct.pack(">HH", orientation, 0)
        )
    segment = bytes([0xFF, marker]) + struct.pack(">H", min(len(payload) + 2, 0xFFFF)) + payload
    boundaries = [2] + [m.start() for m in re.finditer(rb"\xff[\xc0-\xfe]", buf[2:4096])]
    at = choose.choice(boundaries, "segment at")
    buf[at:at] = segment
    return buf


def gif_insert_block(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    kind = choose.choice(["comment", "control", "netscape", "descriptor"], "GIF block")
    if kind == "comment":
        block = b"\x21\xfe" + b"\x05<svg>" + b"\x00"
    elif kind == "control":
        flags = choose.integer(0, 255, "GCE flags")
        delay = choose.integer(0, 0xFFFF, "delay")
        block = b"\x21\xf9\x04" + struct.pack("<BHB", flags, delay, choose.integer(0, 255, "value")) + b"\x00"
    elif kind == "netscape":
        block = (
            b"\x21\xff\x0bNETSCAPE2.0\x03\x01"
            + struct.pack("<H", choose.integer(0, 0xFFFF, "value"))
            + b"\x00"
        )
    else:
        left, top, width, height = (
            choose.choice([0, 1, 7, 40, 300, 65535], label) for label in ("left", "top", "width", "height")
        )
        flags = choose.choice([0, 0x80, 0x40, 0x87, 0xC1], "descriptor flags")
        table = bytes(3 << ((flags & 7) + 1)) if flags & 0x80 else b""
        code_size = choose.choice([2, 8, 0, 12], "LZW code size")
        pixels = choose.binary(60, "LZW data")
        block = (
            b"\x2c"
            + struct.pack("<HHHHB", left, top, width, height, flags)
            + table
            + bytes([code_size, len(pixels)])
            + pixels
            + b"\x00"
        )
    boundaries = [m.start() for m in re.finditer(rb"[!,;]", buf[13:8192])]
    at = 13 + choose.choice(boundaries, "block at") if boundaries else len(buf)
    buf[at:at] = block
    return buf


#: Structure-aware edits twice as often as byte edits: they keep more inputs decodable.
RASTER_MUTATIONS: tuple[Mutation, ...] = (
    *GENERIC_MUTATIONS,
    *(png_insert_chunk, png_drop_or_repeat_chunk, jpeg_insert_segment, gif_insert_block) * 2,
)


def mutate(
    choose: Chooser, seed: bytes, others: Sequence[bytes], mutations: Sequence[Mutation], most: int = 4
) -> bytearray:
    """*seed* after 1..*most* mutations, each picked from *mutations*."""
    buf = bytearray(seed)
    for _ in range(choose.integer(1, most, "mutation count")):
        mutation = choose.choice(mutations, "mutation")
        buf = mutation(choose, buf, others)
    return buf


# ==========================================================================
# Target 1: raster
# ==========================================================================

#: Metadata and auxiliary PNG chunks that must never be written (text, EXIF, ICC, time, ...).
PNG_METADATA_CHUNKS = frozenset(
    {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP", b"tIME", b"sPLT", b"hIST", b"pHYs", b"cICP", b"vpAg"}
)
WEBP_METADATA_CHUNKS = frozenset({b"EXIF", b"XMP ", b"ICCP"})


@st.composite
def raster_limits(draw: st.DrawFn) -> RasterLimits:
    formats = draw(
        st.sampled_from([RASTER_FORMATS, RASTER_FORMATS, RASTER_FORMATS])
        | st.sets(st.sampled_from(sorted(RASTER_FORMATS)), min_size=1).map(frozenset),
        label="formats",
    )
    return RasterLimits(
        max_pixels=draw(st.sampled_from([65536, 65536, 16384]) | st.integers(1, 65536), label="max_pixels"),
        max_side=draw(st.sampled_from([512, 512, 128]) | st.integers(1, 512), label="max_side"),
        max_frames=draw(st.integers(1, 12), label="max_frames"),
        formats=formats,
    )


transforms = st.builds(
    Transform,
    w=st.none() | st.integers(1, 600),
    h=st.none() | st.integers(1, 600),
    fit=st.sampled_from(["contain", "cover", "fill"]),
    q=st.none() | st.integers(1, 100),
    fmt=st.none() | st.sampled_from(sorted(OUTPUT_AVAILABLE)),
)


def pixels_only(body: bytes, fmt: str) -> list[str]:
    """Metadata or trailing bytes in a fresh encode (the corpus README's raster pass rule)."""
    problems = []
    if fmt == "png":
        offsets = png_chunk_offsets(body)
        kinds = [body[start + 4 : start + 8] for start in offsets]
        problems += [f"PNG {kind!r} chunk" for kind in kinds if kind in PNG_METADATA_CHUNKS]
        if not kinds or kinds[-1] != b"IEND":
            problems.append("PNG does not end with IEND")
        elif offsets[-1] + 12 != len(body):
            problems.append("bytes after IEND")
    elif fmt == "jpeg":
        pos = 2
        while pos + 4 <= len(body) and body[pos] == 0xFF and body[pos + 1] != 0xDA:
            marker = body[pos + 1]
            if 0xE1 <= marker <= 0xEF or marker == 0xFE:
                problems.append(f"JPEG marker {marker:#x} (APPn/COM)")
            pos += 2 + struct.unpack_from(">H", body, pos + 2)[0]
        if not body.endswith(b"\xff\xd9"):
            problems.append("JPEG does not end with EOI")
    elif fmt == "gif":
        if not body.endswith(b"\x3b"):
            problems.append("GIF does not end with its trailer")
    elif fmt == "webp":
        if struct.unpack_from("<I", body, 4)[0] + 8 != len(body):
            problems.append("RIFF size does not match the body")
        pos = 12
        while pos + 8 <= len(body):
            kind, size = body[pos : pos + 4], struct.unpack_from("<I", body, pos + 4)[0]
            if kind in WEBP_METADATA_CHUNKS:
                problems.append(f"WebP {kind!r} chunk")
            pos += 8 + size + (size & 1)
    return problems


def decoded_frames(body: bytes, fmt: str) -> tuple[tuple[int, int], int]:
    """(size, frames) of a body as Pillow decodes it, every frame loaded."""
    with Image.open(io.BytesIO(body), formats=[PIL_NAMES[fmt]]) as image:
        size = image.size
        frames = int(getattr(image, "n_frames", 1))
        for index in range(frames):
            image.seek(index)
            image.load()
    return size, frames


def check_raster(data: bytes, limits: RasterLimits, transform: Transform) -> SanitizedImage | None:
    """Refusal with a documented reason, or a fresh encode that passes every output check."""
    with saved_on_failure("raster", data):
        out, refusal = outcome(sanitize_raster, data, limits, transform)
        if refusal is not None:
            assert isinstance(refusal, InvalidImage), f"{type(refusal).__name__} escaped sanitize_raster"
            assert refusal.reason in RASTER_REASONS, refusal.reason
            _event(f"refused: {refusal.reason}")
            return None
        _event("accepted")
        assert out is not None
        _note(
            f"accepted: {out.source_format} -> {out.format} {out.width}x{out.height}, {out.frames} frame(s)"
        )
        assert out.source_format == sniff(data)
        assert out.format == (transform.fmt or out.source_format)
        assert out.content_type == CONTENT_TYPES[out.format] == f"image/{out.format}"
        assert sniff(out.body) == out.format, "the body's magic bytes differ from its content type"
        size, frames = decoded_frames(out.body, out.format)
        assert size == (out.width, out.height)
        assert frames == out.frames
        assert 1 <= out.width <= limits.max_side and 1 <= out.height <= limits.max_side
        assert out.width * out.height <= limits.max_pixels
        assert out.frames <= limits.max_frames
        assert out.frames * out.width * out.height <= limits.max_total_pixels
        if transform.w is not None:
            assert out.width <= transform.w, "wider than requested"
        if transform.h is not None:
            assert out.height <= transform.h, "taller than requested"
        assert pixels_only(out.body, out.format) == []
        # Our own output must pass the same pipeline (with its format allowed).
        again = sanitize_raster(
            out.body, dataclasses.replace(limits, formats=limits.formats | {out.format}), Transform()
        )
        assert (again.format, again.width, again.height) == (out.format, out.width, out.height)
        assert again.frames == out.frames
        return out


@pytest.mark.fuzz
@pytest.mark.corpus
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow: "Invalid APNG", "Corrupt EXIF data", ...
@fuzz_settings(700)
@given(data=st.data())
def test_raster_mutations_are_refused_or_reencoded(
    raster_corpus: tuple[tuple[str, bytes], ...], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(raster_corpus) - 1), label="seed")
    name, seed = raster_corpus[index]
    others = [other for _, other in raster_corpus]
    mutated = bytes(mutate(Draws(data, keep=RASTER_KEEP), seed, others, RASTER_MUTATIONS))
    if mutated.startswith(PNG_SIGNATURE[:4]) and data.draw(
        st.sampled_from([True, True, True, False]), label="fix PNG CRCs"
    ):
        mutated = fix_png_crcs(mutated)
    limits = data.draw(raster_limits(), label="limits")
    transform = data.draw(transforms, label="transform")
    note(f"seed {name}: {len(seed)} -> {len(mutated)} bytes, sha1 {hashlib.sha1(mutated).hexdigest()}")
    check_raster(mutated, limits, transform)


@pytest.mark.fuzz
@pytest.mark.corpus
@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(150)
@given(data=st.data())
def test_raster_seeds_under_random_limits_and_transforms(
    raster_corpus: tuple[tuple[str, bytes], ...], data: st.DataObject
) -> None:
    """Unmutated seeds: the limit checks and every transform path on well-formed inputs."""
    name, seed = raster_corpus[data.draw(st.integers(0, len(raster_corpus) - 1), label="seed")]
    note(f"seed {name}")
    check_raster(seed, data.draw(raster_limits(), label="limits"), data.draw(transforms, label="transform"))


# ==========================================================================
# Target 2: SVG
# ==========================================================================

#: Embedded data: images go through sanitize_raster with these.
SVG_RASTER_LIMITS = RasterLimits(max_pixels=65536, max_side=512, max_frames=4)

svg_limits = st.builds(
    SvgLimits,
    max_bytes=st.sampled_from([262144, 262144, 65536, 2048]),
    max_nodes=st.sampled_from([20_000, 20_000, 400, 8]),
    max_depth=st.sampled_from([64, 64, 12, 3]),
    max_use=st.sampled_from([256, 256, 8, 1]),
    max_use_depth=st.sampled_from([4, 4, 1, 2, 3]),
    max_use_expansion=st.sampled_from([100_000, 100_000, 500, 4]),
    max_css_bytes=st.sampled_from([262144, 262144, 2048, 32]),
    data_images=st.booleans(),
    accept_unnamespaced=st.booleans(),
    raster=st.just(SVG_RASTER_LIMITS),
)

#: The end of a start tag that has content: inserting there puts markup inside an element.
_START_TAG_END = re.compile(rb"<[A-Za-z][^<>]*(?<!/)>")
_TAG_NAME_END = re.compile(rb"<[A-Za-z][\w:.\-]*")
_ATTRIBUTE_VALUE = re.compile(rb"""=\s*(?:"[^"]*"|'[^']*')""")
_PREFIXES = (
    ("xlink", XLINK_NS),
    ("x", XLINK_NS),
    ("ns1", XLINK_NS),
    ("svg", SVG_NS),
    ("html", "http://www.w3.org/1999/xhtml"),
    ("xi", "http://www.w3.org/2001/XInclude"),
    ("ev", "http://www.w3.org/2001/xml-events"),
    ("", "http://www.w3.org/1999/xhtml"),
)
_PROLOGUES = (
    b'<?xml version="1.0" encoding="UTF-8"?>',
    b'<?xml version="1.0" encoding="ISO-8859-1"?>',
    b'<?xml version="1.0" encoding="UTF-16"?>',
    b'<?xml-stylesheet type="text/xsl" href="http://leaking.via/x.xsl"?>',
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">',
    b'<!DOCTYPE svg [<!ATTLIST svg onload CDATA "alert(1)">]>',
    b'<!DOCTYPE svg [<!ENTITY x "javascript:alert(1)">]>',
    b'<!DOCTYPE svg SYSTEM "file:///etc/passwd">',
    b"<!-- <script>alert(1)</script> -->",
    b"\xef\xbb\xbf",
)


def _fragments() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return svg_fragments()


def _text_position(choose: Chooser, buf: bytearray, pattern: re.Pattern[bytes], label: str) -> int:
    ends = [m.end() for m in pattern.finditer(buf)]
    return choose.choice(ends, label) if ends else _pos(choose, buf, label)


_PREFIX_USE = re.compile(r"(?<![\w.\-:])([A-Za-z_][\w.\-]*):[A-Za-z_]")


def _bind_prefixes(choose: Chooser, markup: str) -> str:
    """Declare the prefixes a fragment uses on its own start tag (an unbound prefix is only a parse error)."""
    declared = set(re.findall(r"xmlns:([\w.\-]+)\s*=", markup))
    declarations = ""
    for prefix in sorted(set(_PREFIX_USE.findall(markup.split(">", 1)[0])) - declared - {"xml", "xmlns"}):
        uri = choose.choice(
            [XLINK_NS, XLINK_NS, SVG_NS, "http://www.w3.org/1999/xhtml"], f"{prefix}: namespace"
        )
        declarations += f' xmlns:{prefix}="{uri}"'
    name = re.match(r"<[^\s/>]+", markup)
    at = name.end() if name else 0
    return markup[:at] + declarations + markup[at:]


def svg_insert_element(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """A start tag from the corpus's attack files, closed, inside an element of the document."""
    tag = choose.choice(_fragments()[0], "element")
    if not tag.endswith("/>"):
        name = re.match(r"<([^\s/>]+)", tag)
        inner = choose.choice(["", "alert(1)", "<![CDATA[alert(1)]]>", "&lt;x&gt;", "<rect/>"], "content")
        tag = f"{tag}{inner}</{name.group(1) if name else 'x'}>"
    at = _text_position(choose, buf, _START_TAG_END, "element at")
    buf[at:at] = _bind_prefixes(choose, tag).encode("utf-8")
    return buf


def svg_insert_attribute(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """An event handler (any case) or an attribute from the corpus, on a start tag of the document."""
    _, attributes, _, handlers = _fragments()
    if choose.boolean("event handler"):
        name = choose.choice(handlers, "handler")
        case = choose.choice([str.lower, str.upper, str.title, str.swapcase], "case")
        attribute = f'{case(name)}="alert(1)"'
    else:
        attribute = choose.choice(attributes, "attribute")
    at = _text_position(choose, buf, _TAG_NAME_END, "attribute at")
    bound = _bind_prefixes(choose, "<x " + attribute + ">")[2:-1]
    buf[at:at] = b" " + bound.encode("utf-8") + b" "
    return buf


def svg_replace_value(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    matches = list(_ATTRIBUTE_VALUE.finditer(buf))
    if not matches:
        return buf
    match = choose.choice(matches, "value")
    value = choose.choice(_fragments()[2], "new value")
    buf[match.start() : match.end()] = b'="' + value.replace('"', "&quot;").encode("utf-8") + b'"'
    return buf


def svg_declare_namespace(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    prefix, uri = choose.choice(_PREFIXES, "namespace")
    declaration = f' xmlns:{prefix}="{uri}"' if prefix else f' xmlns="{uri}"'
    at = _text_position(choose, buf, _TAG_NAME_END, "declare at")
    buf[at:at] = declaration.encode("utf-8")
    return buf


def svg_prologue(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    return bytearray(choose.choice(_PROLOGUES, "prologue")) + buf


def svg_splice_inner(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """Another seed's markup (without its prologue) inside this document."""
    other = others[choose.integer(0, len(others) - 1, "inner of")]
    start = other.find(b"<svg")
    piece = other[start if start >= 0 else 0 :]
    at = _text_position(choose, buf, _START_TAG_END, "inner at")
    buf[at:at] = piece
    return buf


def svg_deepen(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """Wrap a stretch in nested groups, or nested <use> chains: depth and <use> limits."""
    depth = choose.integer(1, 80, "depth")
    element = choose.choice(["g", "svg", "a", "switch", "defs", "symbol"], "wrapper")
    at = _text_position(choose, buf, _START_TAG_END, "wrap at")
    if choose.boolean("use chain"):
        uses = "".join(
            f'<g id="u{i}"><use href="#u{i + 1}"/><use href="#u{i + 1}"/></g>' for i in range(depth)
        )
        buf[at:at] = (uses + f'<rect id="u{depth}"/>').encode()
    else:
        buf[at:at] = (f"<{element}>" * depth + "<rect/>" + f"</{element}>" * depth).encode()
    return buf


def svg_reencode(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    codec = choose.choice(["utf-16", "utf-16-be", "latin-1", "utf-8-sig"], "codec")
    return bytearray(bytes(buf).decode("utf-8", "replace").encode(codec, "replace"))


#: Text-aware edits far more often than byte edits (which mostly reach the XML parser's errors).
SVG_MUTATIONS: tuple[Mutation, ...] = (
    *(svg_insert_element, svg_insert_attribute, svg_replace_value) * 3,
    svg_declare_namespace,
    svg_prologue,
    svg_splice_inner,
    svg_deepen,
    svg_reencode,
    flip_bits,
    truncate,
)


def check_svg(data: bytes, limits: SvgLimits) -> SanitizedSvg | None:
    """Refusal with a documented reason, or a safe fixed point that is accepted again."""
    with saved_on_failure("svg", data):
        out, refusal = outcome(sanitize_svg, data, limits)
        if refusal is not None:
            assert isinstance(refusal, InvalidImage), f"{type(refusal).__name__} escaped sanitize_svg"
            assert refusal.reason in SVG_REFUSALS, refusal.reason
            _event(f"refused: {refusal.reason}")
            return None
        _event("accepted")
        assert out is not None
        _note(f"accepted, removed {out.removed}: {out.body[:300]!r}")
        assert out.content_type == "image/svg+xml"
        assert sniff(out.body) == "svg"
        assert is_svg_safe(out.body) == []
        assert is_html_safe(out.body) == []
        again = sanitize_svg(out.body, limits)  # a refusal here escapes as a failure
        assert again.body == out.body, "not idempotent"
        return out


@pytest.mark.fuzz
@pytest.mark.corpus
@pytest.mark.timeout(120)
@fuzz_settings(700)
@given(data=st.data())
def test_svg_mutations_are_refused_or_safe_fixed_points(
    svg_corpus: tuple[tuple[str, bytes], ...], data: st.DataObject
) -> None:
    name, seed = svg_corpus[data.draw(st.integers(0, len(svg_corpus) - 1), label="seed")]
    others = [other for _, other in svg_corpus]
    mutated = bytes(mutate(Draws(data), seed, others, SVG_MUTATIONS, most=3))
    note(f"seed {name}: {len(seed)} -> {len(mutated)} bytes, sha1 {hashlib.sha1(mutated).hexdigest()}")
    check_svg(mutated, data.draw(svg_limits, label="limits"))


# ==========================================================================
# Target 3: request parsing
# ==========================================================================

_SEGMENTS = (
    "..",
    ".",
    "",
    "a.png",
    "cat.JPG",
    "x.png.",
    "x.png ",
    "x.svg",
    "%2e",
    "%2E%2E",
    "%2e%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%00",
    "%25",
    "%252e",
    "%41",
    "%7e",
    "%7E",
    "%zz",
    "%",
    "%e9",
    "%C3%A9",
    "%c3",
    "%ef%bc%8f",
    "%20",
    ";",
    ";v=1",
    "a.png;x",
    "\\",
    "..\\a.png",
    "\x00",
    "\x7f",
    "\t",
    "\r\n",
    " ",
    "é",
    "\u202e",
    "\uff0f",
    "\u2024\u2024",
    "~",
    "@",
    "a.png%00.jpg",
)
_IMAGE_NAMES = ("a.png", "cat.jpg", "x.webp", "d.gif", "v.svg", "p.avif", "b.tiff")


def _join_path(
    prefix: str, segments: list[str], hostile: str | None, at: int, image: str | None, long: int | None
) -> str:
    if hostile is not None:
        segments = [*segments[:at], hostile, *segments[at:]]
    if image is not None:
        segments = [*segments, image]
    if long is not None:
        segments = [*segments, "a" * long + ".png"]
    return prefix + "/".join(segments)


_HOSTILE_SEGMENT = st.one_of(
    st.sampled_from(_SEGMENTS),
    st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=12),
    st.text("abc.%25Ee~-_/;\\", min_size=1, max_size=12),
)
#: Raw (percent-encoded) request paths: clean segments and at most one hostile one (traversal,
#: encodings, separators, controls, unicode), usually an image name, sometimes a very long one.
raw_paths = st.builds(
    _join_path,
    st.sampled_from(["/img/", "/static/", "/", "/img/", "/static/", "//", "/\\", ""]),
    st.lists(st.text("abcxyz019-_~.é", min_size=1, max_size=8), max_size=4),
    st.none() | _HOSTILE_SEGMENT,
    st.integers(0, 4),
    st.sampled_from(_IMAGE_NAMES) | st.sampled_from(_IMAGE_NAMES) | st.none(),
    st.one_of(st.none(), st.none(), st.none(), st.integers(200, 5000)),
)


_QUERY_NAMES = (
    "w",
    "h",
    "fit",
    "q",
    "fmt",
    "s",
    "e",
    "v",
    "a",
    "a.b",
    "url",
    "x",
    "W",
    "w ",
    "%77",
    "v[]",
    "",
)
_QUERY_VALUES = (
    "",
    "1",
    "320",
    "0",
    "01",
    "100",
    "101",
    "999999",
    "1000000",
    "-1",
    "1e3",
    "３２",
    "contain",
    "cover",
    "fill",
    "webp",
    "avif",
    "gif",
    "jpeg",
    "png",
    "svg",
    "bmp",
    "%",
    "%zz",
    "%ff",
    "%C3%A9",
    "%00",
    "+",
    "a+b",
    "%2B",
    "%26w%3D1",
    "1800000000",
    "1699999999",
    "abc",
    "x" * 43,
)


def _join_query(parts: list[tuple[str, str]], separator: str) -> str:
    return separator.join(f"{name}={value}" if value or name else name for name, value in parts)


#: Query strings: reserved, source and unknown names; canonical and non-canonical values; bad escapes.
queries = st.builds(
    _join_query,
    st.lists(
        st.tuples(
            st.sampled_from(_QUERY_NAMES) | st.text("abcefhqsuvwxz.-_", max_size=4),
            st.sampled_from(_QUERY_VALUES) | st.text(st.characters(codec="latin-1"), max_size=10),
        ),
        max_size=6,
    ),
    st.sampled_from(["&", "&", "&", ";", "&&"]),
)


#: Queries the parser mostly accepts (known names, once each), with canonical and odd values.
parseable_queries = st.builds(
    _join_query,
    st.lists(
        st.tuples(
            st.sampled_from(["w", "h", "fit", "q", "fmt", "s", "e", "v", "a", "a.b"]),
            st.sampled_from(_QUERY_VALUES) | st.text(st.characters(codec="latin-1"), max_size=10),
        ),
        max_size=5,
        unique_by=lambda part: part[0],
    ),
    st.just("&"),
)


#: Two instances: the default policy with source parameters, and a strict one.
CORES = {
    "transforms": Core(
        Settings(secret_key=SECRET, source_params="v,a,a.b", miss_rate="off"), clock=lambda: NOW, listen=False
    ),
    "always": Core(
        Settings(
            secret_key=SECRET,
            source_params="v",
            signing="always",
            signature_max_age=3600,
            paths="/img,/static",
            miss_rate="off",
        ),
        clock=lambda: NOW,
        listen=False,
    ),
}


def check_accepted_path(path: str, raw_path: str | None) -> None:
    """What an accepted (normalised) path may never hold."""
    assert path.startswith("/")
    assert "\x00" not in path and "\\" not in path and "%" not in path and ";" not in path
    assert not any(ch < " " or ch == "\x7f" for ch in path), "control character"
    segments = path[1:].split("/")
    assert ".." not in segments and "." not in segments, "dot segment"
    assert all(segment and not segment.endswith(".") for segment in segments[:-1]), (
        "empty or dot-ending segment"
    )
    assert normalise_path(path, raw_path) == path, "normalising again changed the path"


def check_request(core: Core, request: Request) -> FillPlan | Hit | None:
    """Only Rejected escapes; an accepted path is clean, and the fill's own request is accepted too."""
    with saved_on_failure("request", repr(request).encode("utf-8", "surrogatepass")):
        decision, refusal = outcome(core.decide, request)
        if refusal is not None:
            assert isinstance(refusal, (BadRequest, InvalidSignature)), type(refusal).__name__
            _event(f"refused: {refusal.reason}")
            return None
        _event("passed through" if decision is PASS else "accepted")
        if decision is PASS:
            assert request.method not in ("GET", "HEAD") or not core.is_guarded(request.path, request.query)
            return None
        assert isinstance(decision, (FillPlan, Hit))
        path = decision.path if isinstance(decision, FillPlan) else decision.entry.source_path
        check_accepted_path(path, request.raw_path)
        assert path == request.path, "an accepted path was rewritten"
        if isinstance(decision, FillPlan):
            check_accepted_path(decision.path, decision.raw_path)  # the fill's request passes the same check
            assert all(
                quote(unquote_plus(value), safe="") == value
                for value in (part.partition("=")[2] for part in decision.upstream_query.split("&") if part)
            ), "upstream query is not canonical"
        return decision


def check_query_round_trip(core: Core, path: str, query: str) -> None:
    """Parameters the core parsed from an accepted query, signed again with url(), are accepted again."""
    with saved_on_failure("request", f"{path}?{query}".encode("utf-8", "surrogatepass")):
        try:
            params, source = core.parse_query(query)
            transform = parse_transform(params, max_side=core.settings.max_side)
        except BadRequest as exc:
            _event(f"not parsed: {exc.reason}")
            return
        _event("parsed")
        for value in source.values():
            assert quote(unquote_plus(value), safe="") == value, "source value not canonical"
        wanted = {name: value for name, value in params.items() if name != "s"}
        wanted |= {name: unquote(value) for name, value in source.items()}
        try:
            url = core.url(path, **wanted)
        except ValueError:
            # url() may refuse only what the middleware would refuse even when signed.
            signed = {name: value for name, value in params.items() if name != "s"} | source
            signature = core.signer.signature(canonical_form(path, signed))
            with pytest.raises(BadRequest):
                core.verify(path, {**params, "s": signature}, source)
            return
        _note(f"re-signed: {url}")
        quoted, _, signed_query = url.partition("?")
        assert unquote(quoted) == path
        expiry = params.get("e")
        decision, refusal = outcome(core.decide, Request("GET", path, signed_query, raw_path=quoted))
        if isinstance(refusal, InvalidSignature) and refusal.reason == "expired_signature":
            # An expiry in the past is the one legitimate refusal of a freshly signed URL.
            assert expiry is not None and int(expiry) < NOW
            return
        if refusal is not None:
            raise refusal  # url() minted a URL that the middleware refuses
        assert isinstance(decision, FillPlan)
        assert decision.transform == transform
        assert decision.upstream_query == "&".join(f"{k}={source[k]}" for k in sorted(source))


@pytest.mark.fuzz
@pytest.mark.timeout(90)
@fuzz_settings(800)
@given(
    core_name=st.sampled_from(sorted(CORES)),
    method=st.sampled_from(["GET", "GET", "HEAD", "POST"]),
    raw=raw_paths,
    mode=st.sampled_from(["asgi", "unquoted-only", "independent"]),
    other=st.text(max_size=40),
    query=parseable_queries | queries,
)
def test_requests_only_raise_rejected_and_accepted_paths_are_clean(
    core_name: str, method: str, raw: str, mode: str, other: str, query: str
) -> None:
    # ASGI servers give the raw path and its percent-decoding; some WSGI servers give
    # no raw path at all; the independent mode pairs a path with an unrelated raw path.
    path = unquote(raw, errors="replace")
    raw_path: str | None = raw
    if mode == "unquoted-only":
        raw_path = None
    elif mode == "independent":
        path, raw_path = raw, other or None
    check_request(CORES[core_name], Request(method, path, query, raw_path=raw_path))


@st.composite
def signed_requests(draw: st.DrawFn) -> tuple[str, str, str]:
    """A URL minted by url() for an accepted path, then maybe damaged in one place."""
    core_name = draw(st.sampled_from(sorted(CORES)), label="core")
    core = CORES[core_name]
    prefix = draw(st.sampled_from(["/img/", "/static/"]), label="prefix")
    name = draw(st.sampled_from([*_IMAGE_NAMES, "é ü.png", "a~b.png", "(x)@y.gif"]), label="name")
    params = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "w": st.integers(1, 2000).map(str),
                "h": st.integers(1, 2000).map(str),
                "q": st.integers(1, 100).map(str),
                "fmt": st.sampled_from(sorted(OUTPUT_AVAILABLE)),
                "v": st.text(max_size=8),
            },
        ),
        label="params",
    )
    if "w" in params and "h" in params:
        params["fit"] = draw(st.sampled_from(["contain", "cover", "fill"]), label="fit")
    url = core.url(prefix + name, **params)
    quoted, _, query = url.partition("?")
    if draw(st.booleans(), label="damage"):
        chars = list(query)
        if chars:
            index = draw(st.integers(0, len(chars) - 1), label="damage at")
            chars[index] = draw(
                st.sampled_from(["", "%", "&", "=", ";", "A", "%41", "+"]), label="damage with"
            )
        query = "".join(chars)
    return core_name, quoted, query


@pytest.mark.fuzz
@pytest.mark.timeout(90)
@fuzz_settings(400)
@given(signed=signed_requests())
def test_signed_urls_survive_only_intact(signed: tuple[str, str, str]) -> None:
    core_name, quoted, query = signed
    check_request(CORES[core_name], Request("GET", unquote(quoted), query, raw_path=quoted))


@pytest.mark.fuzz
@pytest.mark.timeout(90)
@fuzz_settings(800)
@given(
    core_name=st.sampled_from(sorted(CORES)),
    name=st.sampled_from(["/img/a.png", "/static/x/cat.jpg", "/img/é.webp"]),
    query=parseable_queries | queries,
)
def test_parsed_queries_round_trip_through_url(core_name: str, name: str, query: str) -> None:
    check_query_round_trip(CORES[core_name], name, query)


# ==========================================================================
# Target 4: the cache envelope
# ==========================================================================

SEALER = Sealer(SECRET)
OTHER_SEALER = Sealer(SECRET[::-1])
#: One cache key per record: an envelope is only ever opened under the key it is stored under.
ENVELOPE_KEYS = tuple(hashlib.sha256(f"fuzz-key-{i}".encode()).hexdigest() for i in range(3))


def envelope_records() -> tuple[Record, ...]:
    """Records like the ones the tiers store: a real PNG encode, an SVG, an odd path, an empty body."""
    image = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(image, "PNG")
    return (
        Record(ENVELOPE_KEYS[0], "image/png", '"0123abcd"', "/img/a.png", None, NOW, image.getvalue()),
        Record(
            ENVELOPE_KEYS[1],
            "image/svg+xml",
            '"ffff"',
            "/img/é ü.svg",
            "Tue, 14 Nov 2023 22:13:20 GMT",
            NOW + 0.5,
            f'<svg xmlns="{SVG_NS}"><rect width="1" height="1"/></svg>'.encode(),
        ),
        Record(ENVELOPE_KEYS[2], "image/gif", '""', "/\udcff\u202e.gif", None, 0.0, b""),
    )


RECORDS = envelope_records()
ENVELOPES = tuple(SEALER.seal(record) for record in RECORDS)


#: What a rewritten header field may become (types the reader does not expect included).
HEADER_VALUES = (None, -1, 0, 1, 1 << 40, 1.5, float("nan"), float("inf"), "", "x", "image/png", [], {})


def rewrite_header(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """Change one header field and fix the header length: only the tag can notice."""
    if len(buf) < 8 or buf[:3] != b"IGE":
        return buf
    length = struct.unpack_from(">I", buf, 4)[0]
    try:
        header = json.loads(bytes(buf[8 : 8 + length]))
    except ValueError:
        return buf
    if not isinstance(header, dict) or not header:
        return buf
    field = choose.choice(sorted(header), "header field")
    header[field] = choose.choice(HEADER_VALUES, "header value")
    new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return bytearray(buf[:4] + struct.pack(">I", len(new)) + new + buf[8 + length :])


def swap_part(choose: Chooser, buf: bytearray, others: Sequence[bytes]) -> bytearray:
    """Prefix, header, tag or body taken from another envelope (each checked on its own)."""
    other = bytearray(others[choose.integer(0, len(others) - 1, "other envelope")])
    if len(buf) < 8 or len(other) < 8:
        return buf
    cut_a = 8 + struct.unpack_from(">I", buf, 4)[0]
    cut_b = 8 + struct.unpack_from(">I", other, 4)[0]
    part = choose.choice(["header", "tag", "body"], "swapped part")
    if part == "header":
        return other[:cut_b] + buf[cut_a:]
    if part == "tag":
        return buf[:cut_a] + other[cut_b : cut_b + 32] + buf[cut_a + 32 :]
    return buf[: cut_a + 32] + other[cut_b + 32 :]


ENVELOPE_MUTATIONS: tuple[Mutation, ...] = (*GENERIC_MUTATIONS, rewrite_header, swap_part)


INTEGRITY_DETAILS = frozenset(
    {"truncated", "bad_magic", "unknown_version", "bad_header", "bad_tag", "length_mismatch"}
)


def check_envelope(data: bytes, key: str, expected: Record | None) -> None:
    """``IntegrityError``, or exactly *expected* from exactly its envelope."""
    with saved_on_failure("envelope", data):
        try:
            got = SEALER.open(key, data)
        except IntegrityError as exc:
            detail = exc.detail
        else:
            detail = None
        if detail is not None:
            assert detail in INTEGRITY_DETAILS, detail
            _event(f"refused: {detail}")
            return
        _event("opened")
        assert expected is not None, "random bytes were accepted"
        assert got == expected, "a mutated envelope opened as a different record"
        assert data == SEALER.seal(expected), "accepted bytes that are not the sealed envelope"


@pytest.mark.fuzz
@pytest.mark.timeout(60)
@fuzz_settings(900)
@given(data=st.data())
def test_mutated_envelopes_open_as_the_original_or_not_at_all(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(RECORDS) - 1), label="record")
    envelope = ENVELOPES[index]
    # Other records' envelopes (other keys), and this record sealed with another secret.
    others = [*ENVELOPES, OTHER_SEALER.seal(RECORDS[index])]
    mutated = bytes(mutate(Draws(data), envelope, others, ENVELOPE_MUTATIONS, most=3))
    check_envelope(mutated, RECORDS[index].key, RECORDS[index])
    # Under another cache key nothing opens, not even the intact envelope.
    with pytest.raises(IntegrityError):
        SEALER.open(RECORDS[index].key[::-1], mutated)


@pytest.mark.fuzz
@pytest.mark.timeout(60)
@fuzz_settings(800)
@given(
    head=st.sampled_from([b"", b"IGE", b"IGE\x01", b"IGE\x00", b"IGE\x02", b"XGE\x01"]),
    length=st.none() | st.integers(0, 0xFFFFFFFF),
    rest=st.binary(max_size=300),
    key=st.sampled_from([*ENVELOPE_KEYS, "", "\udcff", "k" * 1000]),
)
def test_random_bytes_raise_only_integrity_error(
    head: bytes, length: int | None, rest: bytes, key: str
) -> None:
    data = head + (struct.pack(">I", length) if length is not None else b"") + rest
    check_envelope(data, key, None)
