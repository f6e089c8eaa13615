"""Real-browser safety of served SVG: headless Chromium against a real uvicorn on 127.0.0.1.

Every SVG of the shared corpus (plus the project's own vectors in ``tests/browser_vectors``) is
served by ``tests.apps.browser_app`` through :class:`imageguard.ImageGuardMiddleware` and opened
(a) by direct navigation and (b) inside ``<img>``, ``<object>``, ``<embed>`` and ``<iframe>`` on a
page without a CSP of its own, with a hover and a click on each one. A served SVG passes when no
dialog opened, no ``/beacon/`` request was made, no request left ``127.0.0.1:<port>`` (every such
request is aborted and recorded as a leak), no popup opened, no vector flag
(``window.__ig_pwned``) was set and the page finished loading. A refusal (502) is safe and
counted. The benign controls must be served (200) and draw something. ``/raw/`` (the same files
without imageguard) is used only by the positive controls, which prove the harness sees a script
that runs, a click that reaches a ``javascript:`` link and a request to another host.

Safety: the corpus files are live XSS payloads. Only this headless Chromium, in a fresh profile,
with background networking off, ever opens them, and every request to another host is aborted.
Chromium is Debian's (``/usr/bin/chromium``); ``playwright install`` is never run.

Speed: one browser and one context for the module; direct navigations run in several tabs at once
and embedded SVGs are batched on one page (a batch that did anything is re-run one SVG at a time
to name the culprit). The async Playwright API runs on a private event loop for that concurrency.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import pytest
from PIL import Image

from tests.apps import browser_app
from tests.servers import free_port, running, uvicorn

try:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None
    PlaywrightError = PlaywrightTimeout = Exception

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        async_playwright is None,
        reason="the playwright package is not installed (pip install playwright; never `playwright install`)",
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium not found: install Debian's chromium package (apt-get install chromium)",
    ),
]

T = TypeVar("T")

DIRECT = "direct"
MODES = (DIRECT, *browser_app.MODES)
SETTLE_MS = 300  # after load and the hover/click, before the verdict
LOAD_TIMEOUT_MS = 10_000  # a served SVG that keeps the page from loading this long is a failure
TABS = 4  # pages working at once (direct navigations, embedding batches)
BATCH = 16  # embedded SVGs per /page
NO_CORPUS = "../shared/corpus not found: the corpus SVG cases need the shared corpus beside the repo"
#: Console messages that mean the CSP header, not the sanitizer, stopped something (reported only).
CSP_MESSAGES = ("Blocked script execution", "Refused to", "Content Security Policy")

FLAG = "() => (typeof window.__ig_pwned === 'undefined' ? null : String(window.__ig_pwned))"
ROOT_CENTRE = """() => {
    const root = document.documentElement;
    if (!root) return null;
    const box = root.getBoundingClientRect();
    const width = Math.min(box.width, innerWidth), height = Math.min(box.height, innerHeight);
    return width >= 1 && height >= 1 ? [box.x + width / 2, box.y + height / 2] : null;
}"""
#: The centre of every embedded element of a /page (run in the page itself, which has no CSP).
CENTRES = """() => Array.from(document.querySelectorAll("[data-src]"), (element) => {
    const box = element.getBoundingClientRect();
    return [box.x + box.width / 2, box.y + box.height / 2];
})"""

#: Vectors that really run script / follow a click / fetch another host when served unprotected.
SCRIPT_VECTOR = browser_app.ENTRIES["vectors/script_beacon.svg"]
CLICK_VECTOR = browser_app.ENTRIES["vectors/a_xlink_javascript.svg"]
LEAK_VECTOR = browser_app.ENTRIES["vectors/image_external.svg"]


# -- what a page did ------------------------------------------------------------------------------


@dataclass
class Events:
    """What one page did while it was watched: the first six lists must stay empty."""

    dialogs: list[str] = field(default_factory=list)
    beacons: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    popups: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    #: Information only: same-origin requests other than the documents ("<document path> -> path").
    subrequests: list[str] = field(default_factory=list)
    #: Information only: console messages saying the CSP blocked something ("<document path>: text").
    csp: list[str] = field(default_factory=list)
    note: str = ""

    BAD = ("dialogs", "beacons", "leaks", "popups", "flags", "hangs")

    def bad(self) -> dict[str, list[str]]:
        return {name: getattr(self, name) for name in self.BAD if getattr(self, name)}

    def merge(self, other: Events) -> None:
        for name in (*self.BAD, "subrequests", "csp"):
            getattr(self, name).extend(getattr(other, name))


@dataclass
class Result:
    events: Events
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Served:
    """What imageguard answered for one ``/svg/`` URL, fetched without a browser."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def reason(self) -> str:
        return self.headers.get("x-imageguard-reason", "")


class Watched:
    """A page whose dialogs, requests, popups and CSP notices are recorded into :attr:`events`."""

    def __init__(self, page: Any, harness: Harness) -> None:
        self.page = page
        self.harness = harness
        self.documents: set[str] = set()
        self.events = Events()
        page.on("dialog", self._dialog)
        page.on("request", self._request)
        page.on("popup", self._popup)
        page.on("console", self._console)

    def reset(self, *documents: str) -> Events:
        self.events = Events()
        self.documents = {self.harness.base + document for document in documents}
        return self.events

    async def _dialog(self, dialog: Any) -> None:
        self.events.dialogs.append(f"{dialog.type}({dialog.message[:60]!r})")
        with suppress(PlaywrightError):
            await dialog.dismiss()

    def _request(self, request: Any) -> None:
        url = request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about", "javascript"):
            return
        if parts.netloc != self.harness.netloc:
            self.events.leaks.append(url[:160])
        elif parts.path.startswith("/beacon/"):
            self.events.beacons.append(parts.path)
        elif url not in self.documents and not parts.path.startswith("/page"):
            try:
                source = urlsplit(request.frame.url).path
            except PlaywrightError:
                source = "?"
            self.events.subrequests.append(f"{source} -> {parts.path}")

    async def _popup(self, popup: Any) -> None:
        self.events.popups.append(popup.url[:160])
        with suppress(PlaywrightError):
            await popup.close()

    def _console(self, message: Any) -> None:
        text = message.text
        if any(marker in text for marker in CSP_MESSAGES) and len(self.events.csp) < 50:
            source = urlsplit(message.location.get("url", "")).path
            self.events.csp.append(f"{source}: {text[:160]}")

    async def flags(self) -> list[str]:
        found = []
        for frame in self.page.frames:
            try:
                value = await frame.evaluate(FLAG)
            except PlaywrightError:
                continue
            if value is not None:
                found.append(f"{value} in {frame.url[:100]}")
        return found

    async def interact(self, targets: list[tuple[float, float]]) -> None:
        # Input to a background tab is throttled (about 1 s per mouse move): bring the tab to the
        # front and keep it there for the whole hover/click sequence.
        async with self.harness.front:
            await self.page.bring_to_front()
            for x, y in targets:
                try:
                    await self.page.mouse.move(x, y)
                    await self.page.mouse.click(x, y)
                except PlaywrightError as exc:
                    self.events.note += f" click failed: {str(exc)[:80]}"

    async def goto(self, path: str, timeout: float = LOAD_TIMEOUT_MS) -> Any:
        try:
            return await self.page.goto(self.harness.base + path, wait_until="load", timeout=timeout)
        except PlaywrightTimeout:
            self.events.hangs.append(f"{path[:120]} did not finish loading in {timeout / 1000:.0f}s")
        except PlaywrightError as exc:
            self.events.note += f" navigation: {str(exc)[:120]}"
        return None

    async def settle(self, milliseconds: float = SETTLE_MS) -> None:
        await self.page.wait_for_timeout(milliseconds)
        self.events.flags.extend(await self.flags())


class Harness:
    """One browser context, a pool of watched pages, and the sweep of every mode (run once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, context: Any, base: str) -> None:
        self.loop = loop
        self.context = context
        self.base = base
        self.netloc = urlsplit(base).netloc
        self.phase = "setup"
        #: Every request the route aborted: (phase, url). Guarded phases must have none.
        self.blocked: list[tuple[str, str]] = []
        #: Server-side beacon hits that arrived during a guarded sweep (must stay empty).
        self.server_beacons: dict[str, list[dict[str, Any]]] = {}
        self.sweeps: dict[str, dict[str, Result]] = {}
        self.timings: dict[str, float] = {}
        self.front = asyncio.Lock()
        self.pages: asyncio.Queue[Watched] = asyncio.Queue()

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    async def start(self) -> None:
        await self.context.route("**/*", self._route)
        for _ in range(TABS):
            self.pages.put_nowait(Watched(await self.context.new_page(), self))

    async def _route(self, route: Any, request: Any) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https") and parts.netloc == self.netloc:
            await route.continue_()
        else:
            self.blocked.append((self.phase, request.url[:160]))
            await route.abort("blockedbyclient")

    def server_beacon_hits(self) -> list[dict[str, Any]]:
        with _open(self.base + "/beacons") as response:
            return list(json.load(response)["beacons"])

    # -- visits -----------------------------------------------------------------------------------

    async def visit_direct(self, watched: Watched, path: str) -> Result:
        """Navigate to *path*, hover and click the centre of its root element, settle."""
        events = watched.reset(path)
        response = await watched.goto(path)
        status = response.status if response is not None else None
        headers = dict(response.headers) if response is not None else {}
        try:
            centre = await watched.page.evaluate(ROOT_CENTRE)
        except PlaywrightError:
            centre = None
        await watched.interact([tuple(centre) if centre else (50.0, 50.0)])
        await watched.settle()
        return Result(events, status, headers)

    async def visit_embedded(self, watched: Watched, mode: str, paths: list[str]) -> Events:
        """Open a /page embedding *paths* in *mode*, hover and click each one (not images), settle."""
        page_path = "/page?" + urlencode([("mode", mode)] + [("src", path) for path in paths])
        events = watched.reset(page_path, *paths)
        if await watched.goto(page_path, timeout=LOAD_TIMEOUT_MS * 2) is not None and mode != "img":
            # An SVG image never runs script or reacts to the pointer: no clicks for <img>.
            try:
                targets = await watched.page.evaluate(CENTRES)
            except PlaywrightError as exc:
                events.note += f" no element boxes: {str(exc)[:80]}"
                targets = []
            await watched.interact([(x, y) for x, y in targets])
        await watched.settle()
        return events

    async def _alone(self, mode: str, path: str) -> Events:
        """One SVG on a fresh page (to name the culprit of a noisy batch)."""
        watched = Watched(await self.context.new_page(), self)
        try:
            if mode == DIRECT:
                return (await self.visit_direct(watched, path)).events
            return await self.visit_embedded(watched, mode, [path])
        finally:
            await watched.page.close()

    async def _sweep(self, mode: str, paths: list[str]) -> dict[str, Result]:
        if mode == DIRECT:
            jobs = [[path] for path in paths]
        else:
            jobs = [paths[start : start + BATCH] for start in range(0, len(paths), BATCH)]
        results: dict[str, Result] = {}
        noisy: list[tuple[list[str], Events]] = []

        async def worker(jobs: Iterator[list[str]]) -> None:
            watched = await self.pages.get()
            try:
                for job in jobs:
                    if mode == DIRECT:
                        result = await self.visit_direct(watched, job[0])
                        if result.events.bad():
                            noisy.append((job, result.events))
                        results[job[0]] = result
                        continue
                    events = await self.visit_embedded(watched, mode, job)
                    if events.bad():
                        noisy.append((job, events))
                    for path in job:
                        # Information lists are split by the document they came from.
                        csp = [message for message in events.csp if message.startswith(path + ": ")]
                        sub = [request for request in events.subrequests if request.startswith(path + " -> ")]
                        results[path] = Result(Events(subrequests=sub, csp=csp))
                with suppress(PlaywrightError):
                    await watched.page.goto("about:blank")
            finally:
                self.pages.put_nowait(watched)

        shared = iter(jobs)
        await asyncio.gather(*(worker(shared) for _ in range(TABS)))
        for job, events in noisy:  # name the culprit, one SVG at a time, nothing else running
            alone = {path: await self._alone(mode, path) for path in job}
            if not any(found.bad() for found in alone.values()):
                for found in alone.values():
                    found.merge(events)
                    found.note += " seen next to other SVGs, not reproduced alone"
            for path, found in alone.items():
                results[path].events = found
        return results

    def sweep(self, mode: str) -> dict[str, Result]:
        """Every served SVG through imageguard in *mode*, keyed by entry key (run once, cached)."""
        if mode not in self.sweeps:
            entries = list(browser_app.ENTRIES.values())
            self.phase = f"guarded:{mode}"
            before = len(self.server_beacon_hits())
            started = time.monotonic()
            try:
                by_path = self.run(self._sweep(mode, [entry.path for entry in entries]))
            finally:
                self.timings[mode] = time.monotonic() - started
                self.phase = "idle"
            time.sleep(0.1)
            self.server_beacons[mode] = self.server_beacon_hits()[before:]
            self.sweeps[mode] = {entry.key: by_path[entry.path] for entry in entries}
        return self.sweeps[mode]

    def raw(self, mode: str, entry: browser_app.Entry) -> Events:
        """A positive control: *entry* served WITHOUT imageguard, alone in *mode*."""
        self.phase = f"raw:{mode}"
        try:
            return self.run(self._alone(mode, entry.raw_path))
        finally:
            self.phase = "idle"


def _open(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=30)


def _fetch(url: str) -> Served:
    try:
        with _open(url) as response:
            return Served(
                response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
            )
    except urllib.error.HTTPError as exc:
        return Served(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    with running(uvicorn("tests.apps.browser_app:app", port), port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(server: str) -> dict[str, Served]:
    """imageguard's answer for every ``/svg/`` URL (also warms its cache for the browser)."""
    entries = list(browser_app.ENTRIES.values())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda entry: _fetch(server + entry.path), entries))
    return {entry.key: answer for entry, answer in zip(entries, answers, strict=True)}


@pytest.fixture(scope="module")
def harness(server: str, served: dict[str, Served]) -> Iterator[Harness]:
    assert async_playwright is not None
    loop = asyncio.new_event_loop()
    playwright = loop.run_until_complete(async_playwright().start())
    try:
        browser = loop.run_until_complete(
            playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS, timeout=60_000
            )
        )
        try:
            context = loop.run_until_complete(
                browser.new_context(
                    viewport={"width": 800, "height": 600}, accept_downloads=False, service_workers="block"
                )
            )
            harness = Harness(loop, context, server)
            harness.run(harness.start())
            yield harness
        finally:
            loop.run_until_complete(browser.close())
    finally:
        loop.run_until_complete(playwright.stop())
        loop.close()


# -- the sweep: no script, no beacon, no leak -------------------------------------------------------


def _cases() -> list[Any]:
    cases = [pytest.param(mode, key, id=f"{mode}-{key}") for mode in MODES for key in browser_app.ENTRIES]
    if not browser_app.CORPUS_PRESENT:
        cases += [
            pytest.param(mode, None, id=f"{mode}-corpus", marks=pytest.mark.skip(reason=NO_CORPUS))
            for mode in MODES
        ]
    return cases


def _describe(key: str, mode: str, result: Result, served: Served) -> str:
    entry = browser_app.ENTRIES[key]
    return (
        f"{key} ({entry.origin}{', wrapped' if entry.wrapped else ''}) in {mode}: imageguard answered "
        f"{served.status} {served.reason}; the browser saw {result.events.bad()}{result.events.note}"
    )


@pytest.mark.parametrize(("mode", "key"), _cases())
def test_served_svg_runs_no_script_and_fetches_nothing(
    harness: Harness, served: dict[str, Served], mode: str, key: str
) -> None:
    result = harness.sweep(mode)[key]
    answer = served[key]
    assert not result.events.bad(), _describe(key, mode, result, answer)
    if mode != DIRECT:
        return
    assert answer.status in (200, 502), f"{key}: unexpected {answer.status} {answer.reason}"
    assert result.status == answer.status, f"{key}: the browser got {result.status}, urllib {answer.status}"
    if result.status == 200:
        # What the browser got must carry the headers that keep a served SVG inert.
        headers = {name.lower(): value for name, value in result.headers.items()}
        assert headers.get("content-type", "").startswith("image/svg+xml"), headers
        assert headers.get("x-content-type-options") == "nosniff", headers
        policy = headers.get("content-security-policy", "")
        assert "sandbox" in policy and "default-src 'none'" in policy, headers


# -- benign controls: served and drawn --------------------------------------------------------------


def _benign_cases() -> list[Any]:
    cases = [pytest.param(key, id=key) for key, entry in browser_app.ENTRIES.items() if entry.benign]
    if not browser_app.CORPUS_PRESENT:
        cases.append(pytest.param(None, id="corpus-benign", marks=pytest.mark.skip(reason=NO_CORPUS)))
    return cases


def _picture(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _drawn_fraction(image: Image.Image) -> float:
    """The share of pixels that are not (near) white: 0 for a blank render."""
    histogram = image.convert("L").histogram()
    return sum(histogram[:245]) / max(1, image.width * image.height)


def _pixel(image: Image.Image, fx: float, fy: float) -> tuple[int, int, int]:
    value = image.getpixel(
        (min(image.width - 1, int(image.width * fx)), min(image.height - 1, int(image.height * fy)))
    )
    assert isinstance(value, tuple)
    return value[0], value[1], value[2]


def _near(pixel: tuple[int, int, int], expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def _check_vector_drawing(key: str, image: Image.Image, where: str) -> None:
    """The exact drawing of the project's own benign vectors (100x100 user units each)."""
    if key == "vectors/benign_red_rect.svg":
        for fx, fy in ((0.5, 0.5), (0.05, 0.05), (0.95, 0.95)):
            pixel = _pixel(image, fx, fy)
            assert _near(pixel, (255, 0, 0)), f"{where}: {pixel} at {fx},{fy} is not red"
    elif key == "vectors/benign_gradient_circle.svg":
        centre = _pixel(image, 0.5, 0.5)
        assert _near(centre, (255, 255, 0), 60), f"{where}: centre {centre} is not the gradient's yellow"
        rim = _pixel(image, 0.5, 0.07)
        assert rim[2] > 120 and rim[0] < 150, f"{where}: rim {rim} is not the gradient's blue"
        assert _near(_pixel(image, 0.02, 0.02), (255, 255, 255)), f"{where}: the corner is not white"
    elif key == "vectors/benign_use_reuse.svg":
        for fx, fy in ((0.25, 0.25), (0.75, 0.75)):  # both <use> copies of the green tile
            pixel = _pixel(image, fx, fy)
            assert _near(pixel, (0, 160, 0)), f"{where}: {pixel} at {fx},{fy} is not the reused tile"
        assert _near(_pixel(image, 0.75, 0.25), (255, 255, 255)), f"{where}: off-tile is not white"


@dataclass
class Rendering:
    """Screenshots of one benign control, by mode, and what the pages did meanwhile."""

    pictures: dict[str, Image.Image] = field(default_factory=dict)
    events: Events = field(default_factory=Events)
    problem: str = ""


RENDER_MODES = ("img", "object", "iframe")


async def _render_direct(harness: Harness, entry: browser_app.Entry, rendering: Rendering) -> None:
    watched = await harness.pages.get()
    try:
        events = watched.reset(entry.path)
        response = await watched.goto(entry.path)
        await watched.page.wait_for_timeout(SETTLE_MS)
        rendering.events.merge(events)
        if response is None or response.status != 200:
            rendering.problem += f" direct navigation got {response.status if response else events}"
            return
        box = await watched.page.locator(":root").bounding_box()
        if not box or box["width"] < 10 or box["height"] < 10:
            rendering.problem += f" root element box {box}"
            return
        clip = {
            "x": box["x"],
            "y": box["y"],
            "width": min(box["width"], 800),
            "height": min(box["height"], 600),
        }
        rendering.pictures[DIRECT] = _picture(await watched.page.screenshot(clip=clip))
    finally:
        with suppress(PlaywrightError):
            await watched.page.goto("about:blank")
        harness.pages.put_nowait(watched)


async def _render_embedded(
    harness: Harness, mode: str, entries: list[browser_app.Entry], out: dict[str, Rendering]
) -> None:
    """All benign controls on one page in *mode*; one screenshot, cut into 120x120 cells."""
    watched = await harness.pages.get()
    try:
        events = await harness.visit_embedded(watched, mode, [entry.path for entry in entries])
        page = _picture(await watched.page.screenshot())
        boxes = await watched.page.evaluate(
            "() => Array.from(document.querySelectorAll('[data-src]'), (e) => {"
            " const b = e.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })"
        )
        for entry, (x, y, width, height) in zip(entries, boxes, strict=True):
            out[entry.key].pictures[mode] = page.crop((int(x), int(y), int(x + width), int(y + height)))
            out[entry.key].events.merge(events)
    finally:
        with suppress(PlaywrightError):
            await watched.page.goto("about:blank")
        harness.pages.put_nowait(watched)


async def _render_all(harness: Harness, entries: list[browser_app.Entry]) -> dict[str, Rendering]:
    out = {entry.key: Rendering() for entry in entries}
    await asyncio.gather(
        *(_render_direct(harness, entry, out[entry.key]) for entry in entries),
        *(_render_embedded(harness, mode, entries, out) for mode in RENDER_MODES),
    )
    return out


@pytest.fixture(scope="module")
def renderings(harness: Harness, served: dict[str, Served]) -> dict[str, Rendering]:
    """Every benign control that imageguard served, rendered directly and in <img>/<object>/<iframe>."""
    entries = [
        entry for entry in browser_app.ENTRIES.values() if entry.benign and served[entry.key].status == 200
    ]
    harness.phase = "render"
    try:
        return harness.run(_render_all(harness, entries)) if entries else {}
    finally:
        harness.phase = "idle"


@pytest.mark.parametrize("key", _benign_cases())
def test_benign_control_is_served_and_renders(
    served: dict[str, Served], renderings: dict[str, Rendering], key: str, tmp_path: Path
) -> None:
    entry = browser_app.ENTRIES[key]
    answer = served[key]
    assert answer.status == 200, (
        f"benign control {key} ({entry.origin}) refused: {answer.status} {answer.reason}"
    )
    assert answer.headers.get("content-type", "").startswith("image/svg+xml"), answer.headers
    rendering = renderings[key]
    assert not rendering.problem, f"{key}:{rendering.problem}"
    assert not rendering.events.bad(), rendering.events.bad()
    assert set(rendering.pictures) == {DIRECT, *RENDER_MODES}, sorted(rendering.pictures)
    for where, picture in rendering.pictures.items():
        picture.save(tmp_path / f"{where}.png")
        drawn = _drawn_fraction(picture)
        assert drawn > 0.005, f"{key} in {where} looks blank ({drawn:.4f} drawn; see {tmp_path / where}.png)"
        if entry.set == "vectors":
            _check_vector_drawing(key, picture, f"{key} in {where}")


# -- positive controls: the harness does see an attack ----------------------------------------------


@pytest.mark.parametrize("mode", [DIRECT, "object", "embed", "iframe"])
def test_positive_control_unprotected_svg_is_caught(harness: Harness, mode: str) -> None:
    """Served WITHOUT imageguard (``/raw/``), the script vector runs and the harness sees it."""
    events = harness.raw(mode, SCRIPT_VECTOR)
    assert events.dialogs, f"no dialog from the raw script vector in {mode}: {events}"
    assert events.beacons, f"no beacon from the raw script vector in {mode}: {events}"
    assert events.flags, f"no flag from the raw script vector in {mode}: {events}"
    if mode in (DIRECT, "iframe"):
        # The hover/click automation reaches a javascript: link.
        clicked = harness.raw(mode, CLICK_VECTOR)
        assert "/beacon/a_xlink_javascript-click" in clicked.beacons, clicked
    if mode == DIRECT:
        # A reference to another host is aborted and recorded as a leak.
        leaked = harness.raw(mode, LEAK_VECTOR)
        assert any("example.invalid" in url for url in leaked.leaks), leaked
        assert "/beacon/image_external-same-origin" in leaked.beacons, leaked
    # The same vectors through imageguard did nothing in this mode.
    for entry in (SCRIPT_VECTOR, CLICK_VECTOR, LEAK_VECTOR):
        assert not harness.sweep(mode)[entry.key].events.bad(), entry.key


async def _img_control(harness: Harness) -> tuple[Events, int, Events]:
    watched = await harness.pages.get()
    try:
        events = await harness.visit_embedded(watched, "img", [SCRIPT_VECTOR.raw_path])
        width = await watched.page.eval_on_selector("#e0", "img => (img.complete ? img.naturalWidth : -1)")
        quiet = Events(dialogs=[*events.dialogs], beacons=[*events.beacons], leaks=[*events.leaks])
        await watched.page.evaluate("() => setTimeout(() => alert('harness probe'), 0)")
        await watched.page.wait_for_timeout(100)
        return quiet, width, events
    finally:
        with suppress(PlaywrightError):
            await watched.page.goto("about:blank")
        harness.pages.put_nowait(watched)


def test_positive_control_img_mode(harness: Harness) -> None:
    """``<img>`` never runs SVG script or fetches for it, so no attack can be seen there: prove the
    raw script vector really loaded as an image and that a dialog on that page is caught."""
    harness.phase = "raw:img"
    try:
        quiet, width, events = harness.run(_img_control(harness))
    finally:
        harness.phase = "idle"
    assert width == 100, f"the raw vector did not load as an image (naturalWidth {width})"
    assert not quiet.bad(), quiet  # Chromium: no script, no fetch for an SVG in <img>
    assert events.dialogs == ["alert('harness probe')"], events


# -- summary ------------------------------------------------------------------------------------------


def test_summary(harness: Harness, served: dict[str, Served], capsys: pytest.CaptureFixture[str]) -> None:
    """Every mode swept; no aborted request or server-side beacon during a guarded sweep; counts printed."""
    started = time.monotonic()
    for mode in MODES:
        harness.sweep(mode)
    statuses = Counter(answer.status for answer in served.values())
    reasons = Counter(answer.reason for answer in served.values() if answer.status != 200)
    by_set: dict[str, Counter[int]] = {}
    for key, answer in served.items():
        by_set.setdefault(browser_app.ENTRIES[key].set, Counter())[answer.status] += 1
    unsafe = sorted(
        f"{mode}:{key}"
        for mode in MODES
        for key, result in harness.sweeps[mode].items()
        if result.events.bad()
    )
    subrequests = sorted(
        {
            request
            for mode in MODES
            for result in harness.sweeps[mode].values()
            for request in result.events.subrequests
        }
    )
    csp: dict[str, str] = {}
    for mode in MODES:
        for key, result in harness.sweeps[mode].items():
            for message in result.events.csp:
                csp.setdefault(key, f"{mode}: {message.split(': ', 1)[-1][:110]}")
    guarded_blocked = [(phase, url) for phase, url in harness.blocked if phase.startswith("guarded:")]
    timings = {mode: round(seconds, 1) for mode, seconds in harness.timings.items()}
    lines = [
        "",
        f"browser SVG sweep: {len(served)} SVGs ({len(browser_app.CORPUS_ENTRIES)} from the corpus, "
        f"{len(browser_app.VECTOR_ENTRIES)} own vectors) x {len(MODES)} modes {MODES}",
        f"  imageguard answered: {dict(statuses)}; refusal reasons: {dict(reasons)}",
        *(f"    {name}: {dict(counter)}" for name, counter in sorted(by_set.items())),
        f"  sweep seconds: {timings} (+{time.monotonic() - started:.1f}s in this test)",
        f"  unsafe (mode:key): {unsafe or 'none'}",
        f"  aborted requests during guarded sweeps: {guarded_blocked or 'none'}",
        f"  server-side beacon hits during guarded sweeps: {sum(map(len, harness.server_beacons.values()))}",
        f"  same-origin subrequests from served SVGs: {subrequests or 'none'}",
        f"  the CSP header blocked something in {len(csp)} served SVGs:",
        *(f"    {key}: {message}" for key, message in sorted(csp.items())),
    ]
    with capsys.disabled():
        print("\n".join(lines))
    assert not guarded_blocked, guarded_blocked
    assert not any(harness.server_beacons.values()), harness.server_beacons
    assert not unsafe, unsafe
