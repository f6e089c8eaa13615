"""The app behind the browser tests: `uvicorn tests.apps.browser_app:app` (127.0.0.1 only).

Routes:

- ``/svg/<set>/<name>.svg``: the raw bytes of one corpus or vector SVG, served by a plain
  Starlette route as ``image/svg+xml``, *through* :class:`ImageGuardMiddleware` (``paths="/svg/"``).
- ``/raw/<set>/<name>.svg``: the same bytes *without* imageguard (positive controls only).
- ``/page?mode=img|object|embed|iframe&src=<path>[&src=...]``: an HTML page (no CSP of its own)
  embedding each same-origin ``src`` in that element, 120x120 each, ids ``e0``, ``e1``, ...
- ``/beacon/<id>``: records a hit (a vector's script ran, or a reference survived); ``/beacons``
  lists the hits as JSON.

The corpus (``../shared/corpus`` beside the repository) is read at import time; when it is absent
:data:`CORPUS_PRESENT` is false and only the project's own vectors (``tests/browser_vectors``) are
served. Nothing here fetches anything: the corpus files are live XSS payloads and are only ever
served on loopback to a headless, network-blocked browser.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from imageguard import ImageGuardMiddleware, Settings
from tests.svg_rule import BENIGN_CONTROLS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"
VECTORS = ROOT / "tests" / "browser_vectors"

# One browser loads ~200 distinct SVGs within a minute: no miss budget here.
SETTINGS = Settings(secret_key="browser-secret-key-0123456789", paths="/svg/", miss_rate="off")

SVG_NS = "http://www.w3.org/2000/svg"
WRAP_OPEN = f'<svg xmlns="{SVG_NS}" xmlns:xlink="http://www.w3.org/1999/xlink" width="200" height="200">\n'
WRAP_CLOSE = "\n</svg>\n"

#: Benign controls: must be served (200) and must still draw something.
BENIGN_CORPUS = BENIGN_CONTROLS

#: Whole-file sets: (set name, folder under the corpus, glob).
FILE_SETS = (
    ("darylldoyle", "svg-sanitizer-darylldoyle/data", "*"),
    ("borewit", "svg-sanitizer-borewit/data", "*"),
    ("patt-svg-xss", "payloadsallthethings/svg-xss", "*"),
    ("patt-ssrf-svg", "payloadsallthethings/ssrf-svg", "*"),
    ("patt-imagemagick", "payloadsallthethings/imagemagick-delegates", "*.svg"),
    ("h5sc", "h5sc-html5sec/attachments", "test.svg"),
)


@dataclass(frozen=True)
class Entry:
    """One served SVG: ``/svg/<set>/<name>`` and ``/raw/<set>/<name>``."""

    set: str
    name: str  # URL file name, always ending in .svg
    origin: str  # where the bytes came from (corpus path, fixture entry or vector file)
    body: bytes
    benign: bool = False
    wrapped: bool = False

    @property
    def key(self) -> str:
        return f"{self.set}/{self.name}"

    @property
    def path(self) -> str:
        return f"/svg/{self.key}"

    @property
    def raw_path(self) -> str:
        return f"/raw/{self.key}"


_PROLOG = re.compile(r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE(?:[^\[>]|\[.*?\])*>)", re.S | re.I)
_SVG_ROOT = re.compile(r"\s*<svg\b[^>]*?\sxmlns\s*=\s*([\"'])http://www\.w3\.org/2000/svg\1")


def is_svg_document(text: str) -> bool:
    """True when *text* (after XML declaration, PIs, comments, DOCTYPE) starts with a namespaced <svg>."""
    text = text.lstrip("\ufeff")
    pos = 0
    while (match := _PROLOG.match(text, pos)) and match.end() > pos:
        pos = match.end()
    return bool(_SVG_ROOT.match(text, pos))


def as_svg_document(payload: str) -> tuple[bytes, bool]:
    """A payload as a standalone SVG document: unchanged when it is one, else wrapped (README rule)."""
    if is_svg_document(payload):
        return payload.encode(), False
    return (WRAP_OPEN + payload + WRAP_CLOSE).encode(), True


def _slug(file: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", file.stem)
    suffix = file.suffix.lower()
    return f"{stem}.svg" if suffix == ".svg" else f"{stem}_{suffix.lstrip('.')}.svg"


def _file_entries(corpus: Path) -> list[Entry]:
    entries = []
    for set_name, folder, pattern in FILE_SETS:
        benign = BENIGN_CORPUS.get(set_name, ())
        for file in sorted((corpus / folder).glob(pattern)):
            if file.is_file():
                entries.append(
                    Entry(
                        set=set_name,
                        name=_slug(file),
                        origin=f"corpus/{folder}/{file.name}",
                        body=file.read_bytes(),
                        benign=file.suffix == ".svg" and file.stem in benign,
                    )
                )
    return entries


def _json_entries(corpus: Path) -> list[Entry]:
    entries = []
    leaks = json.loads((corpus / "httpleaks-cure53/svg-snippets.json").read_text(encoding="utf-8"))
    for index, item in enumerate(leaks):
        snippet = item["snippet"]
        if item.get("kind", "").startswith("data-url"):
            continue  # a truncated "data:image/svg+xml,<svg%20xmlns=" prefix, not a document
        if "%20" in snippet and " " not in snippet:
            snippet = unquote(snippet)  # a percent-encoded SVG (the body of a data: URL)
        body, wrapped = as_svg_document(snippet)
        origin = f"corpus/httpleaks-cure53/svg-snippets.json[{index}] (line {item['line']})"
        entries.append(Entry("httpleaks", f"snippet-{index:02d}.svg", origin, body, wrapped=wrapped))
    h5sc = json.loads((corpus / "h5sc-html5sec/vectors-svg-subset.json").read_text(encoding="utf-8"))
    for item in h5sc:
        body, wrapped = as_svg_document(item["vector"])
        origin = f"corpus/h5sc-html5sec/vectors-svg-subset.json id {item['id']}"
        entries.append(Entry("h5sc-svg", f"vector-{item['id']:03d}.svg", origin, body, wrapped=wrapped))
    dompurify = json.loads(
        (corpus / "dompurify-fixtures/expect-svg-mathml-subset.json").read_text(encoding="utf-8")
    )
    for item in dompurify:
        body, wrapped = as_svg_document(item["payload"])
        origin = f"corpus/dompurify-fixtures/expect-svg-mathml-subset.json index {item['index']}"
        entries.append(Entry("dompurify", f"case-{item['index']:03d}.svg", origin, body, wrapped=wrapped))
    return entries


def _vector_entries() -> list[Entry]:
    return [
        Entry(
            set="vectors",
            name=file.name,
            origin=f"tests/browser_vectors/{file.name}",
            body=file.read_bytes(),
            benign=file.stem.startswith("benign_"),
        )
        for file in sorted(VECTORS.glob("*.svg"))
    ]


CORPUS_PRESENT = CORPUS.is_dir()
CORPUS_ENTRIES: list[Entry] = _file_entries(CORPUS) + _json_entries(CORPUS) if CORPUS_PRESENT else []
VECTOR_ENTRIES: list[Entry] = _vector_entries()
ENTRIES: dict[str, Entry] = {entry.key: entry for entry in CORPUS_ENTRIES + VECTOR_ENTRIES}
assert len(ENTRIES) == len(CORPUS_ENTRIES) + len(VECTOR_ENTRIES), "two served SVGs share a URL"

MODES = ("img", "object", "embed", "iframe")
SIZE = 120

# Every refusal and every removal is a security event (a WARNING): keep them out of the server's
# stdout pipe, which the test harness does not read (a full pipe would stall the server), and
# count them by reason instead.
SECURITY_EVENTS: Counter[str] = Counter()


class _CountEvents(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        SECURITY_EVENTS[str(getattr(record, "imageguard", {}).get("reason", "?"))] += 1


@contextlib.asynccontextmanager
async def _count_events_in_the_server(app: object) -> AsyncIterator[None]:
    # Only in the server process (lifespan): importing this module from the
    # test process must leave the "imageguard" logger as it was.
    guard_logger = logging.getLogger("imageguard")
    guard_logger.addHandler(_CountEvents())
    guard_logger.propagate = False
    yield


BEACONS: list[dict[str, object]] = []
_beacon_lock = threading.Lock()


async def svg_file(request: Request) -> Response:
    entry = ENTRIES.get(f"{request.path_params['set']}/{request.path_params['name']}")
    if entry is None:
        return PlainTextResponse("no such svg", status_code=404)
    return Response(entry.body, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


def _element(mode: str, index: int, src: str) -> str:
    src = html.escape(src, quote=True)
    common = f'id="e{index}" data-src="{src}" width="{SIZE}" height="{SIZE}"'
    if mode == "img":
        return f'<img {common} src="{src}" alt="">'
    if mode == "object":
        return f'<object {common} data="{src}"></object>'
    if mode == "embed":
        return f'<embed {common} src="{src}">'
    return f'<iframe {common} src="{src}"></iframe>'


async def page(request: Request) -> Response:
    mode = request.query_params.get("mode", "img")
    sources = request.query_params.getlist("src")
    if mode not in MODES or not sources:
        return PlainTextResponse("mode must be img|object|embed|iframe and src is required", 400)
    for src in sources:
        if not src.startswith("/") or src.startswith("//") or "\\" in src:
            return PlainTextResponse("src must be a same-origin path", 400)
    cells = "\n".join(f'<div class="cell">{_element(mode, i, src)}</div>' for i, src in enumerate(sources))
    document = (
        "<!doctype html><html><head><meta charset=utf-8><title>browser harness</title>"
        "<style>html,body{margin:0;background:#fff}"
        f".cell{{display:inline-block;width:{SIZE}px;height:{SIZE}px;margin:4px;vertical-align:top}}"
        "img,object,embed,iframe{display:block;border:0;margin:0;padding:0}</style></head>"
        f"<body>\n{cells}\n</body></html>"
    )
    return HTMLResponse(document)


async def beacon(request: Request) -> Response:
    with _beacon_lock:
        BEACONS.append(
            {
                "id": request.path_params["bid"],
                "referer": request.headers.get("referer", ""),
                "time": time.time(),
            }
        )
    return PlainTextResponse("", headers={"Cache-Control": "no-store"})


async def beacons(request: Request) -> Response:
    with _beacon_lock:
        hits = list(BEACONS)
    return JSONResponse({"beacons": hits, "security_events": dict(SECURITY_EVENTS)})


upstream = Starlette(
    routes=[
        Route("/svg/{set}/{name}", svg_file),
        Route("/raw/{set}/{name}", svg_file),
        Route("/page", page),
        Route("/beacon/{bid:path}", beacon, methods=["GET", "POST", "HEAD"]),
        Route("/beacons", beacons),
    ],
    lifespan=_count_events_in_the_server,
)
app = ImageGuardMiddleware(upstream, settings=SETTINGS)
