"""The sans-I/O core: every decision imageguard makes, and none of its I/O.

Use :class:`Core` from an adapter. The adapter turns a WSGI environ or an ASGI
scope into a :class:`Request`, asks :meth:`Core.decide`, and then either passes
the request through, answers a cached :class:`Entry`, or fills: it calls the
upstream app as :class:`FillPlan` says, reads at most ``max_bytes`` of its
answer and hands status, headers and body to :meth:`Core.complete`. Every
:class:`~imageguard.errors.Rejected` raised on the way is turned into a reply by
:meth:`Core.reject`.

Invariants (each has a test):

* Only bytes produced by our own encoder (or sanitizer) are ever stored or
  served with status 200 on a guarded path. Upstream bytes never pass through.
* The cache key is an HMAC over the generation, the normalised path, the
  canonical transform, the canonical source parameters (and the host when
  ``IMAGEGUARD_KEY_HOSTS`` is set). Nothing else the client sends can select or
  change an entry, because nothing else reaches the upstream: the fill request
  carries no client header at all (:data:`FORWARDED_HEADERS` is empty), no body,
  and only the keyed query parameters.
* Every reply the core builds for an error carries ``Cache-Control: no-store``,
  ``X-Content-Type-Options: nosniff`` and ``X-ImageGuard-Reason``.
* A hit is a dictionary look-up: status line, headers, ETag and body of an
  :class:`Entry` are computed once, when it is stored.

This module imports no web framework and reads no environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import quote, unquote, unquote_plus, unquote_to_bytes

from .anomaly import AnomalyDetector
from .cache import RecordTier
from .cache.envelope import Record, Sealer, source_hash
from .cache.memory import MemoryCache
from .config import Settings
from .errors import BadRequest, ConfigError, InvalidImage, InvalidSignature, RateLimited, Rejected
from .events import security_event
from .metrics import METRICS
from .raster import (
    CONTENT_TYPES,
    OUTPUT_AVAILABLE,
    RasterLimits,
    SanitizedImage,
    Transform,
    sanitize_raster,
    sniff,
)
from .ratelimit import MissLimiter
from .signing import SIGNATURE_LENGTH, URLSigner, canonical_form
from .svg import SanitizedSvg, SvgLimits, sanitize_svg

if TYPE_CHECKING:
    from .remote import RemoteFetcher, RemotePolicy, RemoteURL

#: Query parameters that change the produced image; they must be signed.
TRANSFORM_PARAMS: Final = ("w", "h", "fit", "q", "fmt")
#: Every name imageguard itself owns in a query string.
RESERVED_PARAMS: Final = frozenset((*TRANSFORM_PARAMS, "s", "e"))
#: What the remote route accepts: the reserved parameters and the signed ``url``.
_REMOTE_PARAMS: Final = RESERVED_PARAMS | frozenset({"url"})
#: The signed reserved parameters in canonical (sorted) order.
_SIGNED_ORDER: Final = tuple(sorted(RESERVED_PARAMS - {"s"}))
#: Path endings that make a path an image path (lower case): the image formats
#: Pillow knows, plus SVG, HEIF and JPEG XL. Formats outside
#: ``IMAGEGUARD_FORMATS`` are guarded too, so that they are refused (fail
#: closed) instead of passed through. Documents and data (PDF, PostScript,
#: MPEG, HDF5, FITS, GRIB, BUFR) are left to the app.
IMAGE_EXTENSIONS: Final = frozenset(
    [
        "apng",
        "avif",
        "avifs",
        "blp",
        "bmp",
        "bw",
        "cur",
        "dcx",
        "dds",
        "dib",
        "emf",
        "eps",
        "flc",
        "fli",
        "ftc",
        "ftu",
        "gbr",
        "gif",
        "heic",
        "heif",
        "icb",
        "icns",
        "ico",
        "iim",
        "im",
        "j2c",
        "j2k",
        "jfif",
        "jp2",
        "jpc",
        "jpe",
        "jpeg",
        "jpf",
        "jpg",
        "jpx",
        "jxl",
        "mpo",
        "msp",
        "palm",
        "pbm",
        "pcd",
        "pcx",
        "pfm",
        "pgm",
        "pjp",
        "pjpeg",
        "png",
        "pnm",
        "ppm",
        "psd",
        "pxr",
        "qoi",
        "ras",
        "rgb",
        "rgba",
        "sgi",
        "svg",
        "svgz",
        "tga",
        "tif",
        "tiff",
        "vda",
        "vst",
        "webp",
        "wmf",
        "xbm",
        "xpm",
    ]
)
#: Output formats a client may ask for with ``fmt``.
OUTPUT_FORMATS: Final = frozenset(("jpeg", "png", "webp", "avif", "gif"))
FITS: Final = frozenset(("contain", "cover", "fill"))
#: Declared Content-Types and the format each one must sniff as.
DECLARED_TYPES: Final = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/png": "png",
    "image/apng": "png",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/svg+xml": "svg",
}
#: Request headers forwarded to the upstream on a fill: none. Cookies,
#: Authorization, Accept-Encoding, X-Forwarded-*, X-Original-URL, method
#: overrides... any of them could make the upstream answer differently under a
#: key that does not include them (web cache poisoning, or one user's private
#: image served to everyone). Guarded paths must serve public images.
FORWARDED_HEADERS: Final[frozenset[str]] = frozenset()
#: Upstream response headers kept on a served image (besides what we compute).
KEPT_UPSTREAM_HEADERS: Final = frozenset(("last-modified",))
#: Sandboxing policy sent with every image (DESIGN §3); harmless on rasters.
CONTENT_SECURITY_POLICY: Final = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
_NO_TRANSFORM: Final = Transform()
#: Verified requests remembered so a hit skips parsing and HMAC verification.
ROUTE_MEMO_SIZE: Final = 4096
#: Seconds a request waits for another thread's fill of the same key.
FOLLOWER_TIMEOUT: Final = 120.0
#: Times a request retries a fill that was refused because *another* client was over its miss budget.
FOLLOW_ATTEMPTS: Final = 3

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_SIDE_RE: Final = re.compile(r"[1-9][0-9]{0,5}")
_QUALITY_RE: Final = re.compile(r"100|[1-9][0-9]?")
_EXPIRY_RE: Final = re.compile(r"[1-9][0-9]{0,11}")
_PERCENT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
# Encoded slash, backslash, NUL and percent (double encoding) change what the
# path means to the next hop: refuse them rather than guess.
_FORBIDDEN_ENCODED: Final = frozenset(("2f", "5c", "00", "25"))
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def status_line(status: int) -> str:
    """``"404 Not Found"`` for 404 (WSGI form)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Request:
    """What the core needs to know of one request.

    :param method: the HTTP method, upper case.
    :param path: the decoded path (``SCRIPT_NAME + PATH_INFO``; ASGI ``root_path + path``).
    :param query: the raw query string (still percent-encoded).
    :param raw_path: the path as sent, percent-encoded, when the server tells it.
    :param host: the ``Host`` header, if any.
    :param if_none_match: the ``If-None-Match`` header, if any.
    :param client: the client address (:meth:`Core.client_address`): rate limits, logs.
    :param accept: the ``Accept`` header, if any (used only with ``IMAGEGUARD_NEGOTIATE``).
    """

    method: str
    path: str
    query: str = ""
    raw_path: str | None = None
    host: str | None = None
    if_none_match: str | None = None
    client: str | None = None
    accept: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response built by the core (errors and upstream non-200s)."""

    status: int
    headers: Headers
    body: bytes

    @property
    def status_line(self) -> str:
        return status_line(self.status)


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """A sanitized image with everything a hit needs, computed once.

    The adapters send :attr:`headers` and :attr:`body` as they are; nothing is
    hashed, encoded or copied per hit.
    """

    key: str
    body: bytes
    content_type: str
    etag: str
    source_path: str
    #: Headers of a 200 (GET and HEAD alike).
    headers: Headers
    #: Headers of a 304.
    headers_304: Headers
    created: float
    #: The same headers, latin-1 encoded, as ASGI wants them.
    raw_headers: list[tuple[bytes, bytes]] = field(repr=False)
    raw_headers_304: list[tuple[bytes, bytes]] = field(repr=False)
    #: The upstream's ``Last-Modified`` (HTTP date), the one upstream header kept.
    last_modified: str | None = None
    #: :func:`~imageguard.cache.envelope.source_hash` of :attr:`source_path`.
    source_hash: str = ""
    #: Where this entry came from: ``fill`` (the upstream), or the tier it was read from.
    origin: str = "fill"

    def record(self) -> Record:
        """What the lower tiers store for this entry (headers are rebuilt on read)."""
        return Record(
            key=self.key,
            content_type=self.content_type,
            etag=self.etag,
            source_path=self.source_path,
            last_modified=self.last_modified,
            created=self.created,
            body=self.body,
        )

    def matches(self, if_none_match: str | None) -> bool:
        """Whether ``If-None-Match`` names this entry (weak comparison, RFC 9110 §13.1.2)."""
        if not if_none_match:
            return False
        if if_none_match.strip() == "*":
            return True
        for tag in if_none_match.split(","):
            tag = tag.strip()
            if tag.startswith("W/"):
                tag = tag[2:]
            if tag == self.etag:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Hit:
    """Answer from the cache: 200 with the entry, or 304 when ``not_modified``."""

    entry: Entry
    not_modified: bool
    head: bool


@dataclass(frozen=True, slots=True)
class FillPlan:
    """A miss: how to call the upstream and what to do with its answer.

    :param key: the cache key (also the single-flight key).
    :param path: the normalised path (the upstream is called on it).
    :param upstream_query: the only query string the upstream sees.
    :param upstream_host: the ``Host`` the upstream sees; ``None`` means the
        server's own name (the client's ``Host`` is not keyed, so not forwarded).
    :param transform: the verified transform.
    :param head: the client asked with HEAD (the upstream is called with GET).
    """

    key: str
    path: str
    upstream_query: str
    upstream_host: str | None
    transform: Transform
    head: bool
    if_none_match: str | None
    client: str | None
    #: ``fmt`` was chosen from ``Accept`` (IMAGEGUARD_NEGOTIATE), not signed in the URL.
    negotiated: bool = False
    #: The purge generation the key was derived in; a fill from an older one is not stored.
    generation: int = 0
    #: Fetch :attr:`path` (a checked, normalised URL) from the network instead of calling the app.
    remote: bool = False

    @property
    def raw_path(self) -> str:
        """The fill's path, percent-encoded (REQUEST_URI, ASGI ``raw_path``)."""
        return quote(self.path, safe="/!$&'()*+,:;=@")

    def host(self, server: str, port: int | str | None) -> str:
        """The ``Host`` the fill sends: the keyed host, else the server's own name.

        The client's Host is not part of the key (unless IMAGEGUARD_KEY_HOSTS),
        so it may not reach the app.
        """
        if self.upstream_host is not None:
            return self.upstream_host
        return server if str(port or "") in ("", "80", "443") else f"{server}:{port}"


class BodyLimit:
    """Counts a fill's body against ``IMAGEGUARD_MAX_BYTES``; both adapters feed it.

    :raises InvalidImage: ``too_large``, as soon as the declared length or the
        bytes read so far exceed the limit (the adapter then stops reading).
    """

    __slots__ = ("limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0

    def declared(self, headers: Iterable[tuple[str, str]]) -> None:
        """Refuse before reading when the upstream says up front that it is too large."""
        length = _header(headers, "content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            raise _too_large(int(length), self.limit)

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _too_large(self.size, self.limit)


def _too_large(size: int | None = None, limit: int | None = None) -> InvalidImage:
    return InvalidImage(
        "too_large", "the upstream body exceeds IMAGEGUARD_MAX_BYTES", facts={"size": size, "limit": limit}
    )


@dataclass(frozen=True, slots=True)
class _Route:
    """A verified request: what :meth:`Core.route` remembers."""

    path: str
    key: str
    transform: Transform
    upstream_query: str
    host: str | None
    expiry: int | None
    generation: int
    negotiated: bool = False
    #: A remote image (the proxy route): ``path`` is the checked, normalised URL.
    remote: bool = False


class _Pass:
    """Not ours: hand the request to the app untouched."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


#: The decision for a request imageguard does not guard.
PASS: Final = _Pass()

Decision = _Pass | Hit | FillPlan
Outcome = Entry | Reply


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _has_image_extension(path: str) -> bool:
    # Trailing dots, spaces, slashes and "." segments are dropped by file systems
    # and by the apps' own path joining (Starlette StaticFiles, werkzeug safe_join
    # normalise "/a.png/." to "/a.png"): none of them may take an image past the guard.
    name = path.rstrip(". /")
    dot = name.rfind(".")
    return dot > name.rfind("/") and name[dot + 1 :].lower() in IMAGE_EXTENSIONS


def normalise_path(path: str, raw_path: str | None = None) -> str:
    """Check the request path once; return it or raise :class:`BadRequest`.

    Refused (DESIGN §3): ``..`` and ``.`` segments, empty segments (``//``),
    segments ending in a dot (``x.png.`` is ``x.png`` to some file systems),
    backslashes, NUL and control characters, encoded ``/``, ``\\``, NUL and
    ``%`` (double encoding), encoded unreserved characters (``%2e``: a second
    spelling of the same path) and malformed escapes.
    """
    if raw_path is not None:
        if _PERCENT_RE.search(raw_path):
            raise BadRequest("bad_path", "malformed percent-encoding in the path")
        try:
            unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest("bad_path", "the path is not UTF-8", original_error=exc) from exc
        for code in _ENCODED_RE.findall(raw_path):
            low = code.lower()
            if low in _FORBIDDEN_ENCODED or chr(int(code, 16)) in _UNRESERVED:
                raise BadRequest("bad_path", f"forbidden encoding %{code} in the path")
    if not path.startswith("/"):
        raise BadRequest("bad_path", "the path must start with /")
    if any(ch < " " or ch == "\x7f" or ch == "\\" for ch in path):
        raise BadRequest("bad_path", "control character or backslash in the path")
    if ";" in path or "%" in path:
        # Path parameters and a percent sign left after decoding (double
        # encoding) mean something else to the next hop: refuse, never guess.
        raise BadRequest("bad_path", "path parameters or double encoding in the path")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                if _has_image_extension(path):
                    # "/a.png/" is "/a.png" to the app's file lookup: one image, one spelling.
                    raise BadRequest("bad_path", "a trailing slash after an image name")
                continue  # a trailing slash
            raise BadRequest("bad_path", "empty path segment")
        if segment.endswith("."):
            raise BadRequest("bad_path", "dot segment or trailing dot in the path")
    return path


def parse_transform(params: dict[str, str], *, max_side: int) -> Transform:
    """Validate the transform parameters (canonical spellings only) into a :class:`Transform`."""
    w = h = q = None
    if "w" in params:
        w = _parse_int(params, "w", _SIDE_RE, 1, max_side)
    if "h" in params:
        h = _parse_int(params, "h", _SIDE_RE, 1, max_side)
    if "q" in params:
        q = _parse_int(params, "q", _QUALITY_RE, 1, 100)
    fit = params.get("fit", "contain")
    if fit not in FITS:
        raise BadRequest("bad_param_value", "fit must be contain, cover or fill")
    if "fit" in params and (w is None or h is None):
        raise BadRequest("bad_param_value", "fit needs both w and h")
    fmt = params.get("fmt")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise BadRequest("bad_param_value", "fmt must be one of " + ", ".join(sorted(OUTPUT_FORMATS)))
    return Transform(w=w, h=h, fit=fit, q=q, fmt=fmt)


def _parse_int(params: dict[str, str], name: str, pattern: re.Pattern[str], low: int, high: int) -> int:
    text = params[name]
    if not pattern.fullmatch(text):
        raise BadRequest("bad_param_value", f"{name} must be a canonical integer")
    value = int(text)
    if not low <= value <= high:
        raise BadRequest("bad_param_value", f"{name} must be between {low} and {high}")
    return value


def canonical_transform(transform: Transform) -> str:
    """One spelling per output: ``fit=contain`` and no ``fit`` key the same entry."""
    return (
        f"w={transform.w or ''}&h={transform.h or ''}&fit={transform.fit}"
        f"&q={transform.q or ''}&fmt={transform.fmt or ''}"
    )


class Core:
    """The decisions of one middleware instance.

    :param settings: validated settings.
    :param cache: the L1 tier; built from the settings when not given.
    :param lower: the L2/L3 tiers, fastest first; built from the settings
        (``IMAGEGUARD_DISK_CACHE_DIR``, ``IMAGEGUARD_REDIS_URL``) when not given.
    :param listen: hear other instances' purges (Redis pub/sub); the command
        line only publishes.
    :param clock: wall clock in seconds (signature expiry), injectable for tests.
    :raises ~imageguard.errors.ConfigError: the disk cache directory is unsafe.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        cache: MemoryCache | None = None,
        lower: Sequence[RecordTier] | None = None,
        listen: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.signer = URLSigner(settings.secret_key)
        self._signing = settings.signing  # read on every uncached request
        self._max_age = settings.signature_max_age
        self.cache = cache if cache is not None else MemoryCache(settings.cache_bytes, settings.cache_ttl)
        self.clock = clock
        self.generation = 0
        self._generation_lock = threading.Lock()
        #: Rejections by reason since start-up (``stats()``), and the rolling view
        #: that raises an ``anomaly`` event when one reason jumps.
        self.rejections: Counter[str] = Counter()
        self._rejections_lock = threading.Lock()
        self.anomaly = AnomalyDetector()
        self._flushed: dict[str, int] = {}
        #: Seals L2/L3 entries and purge messages with the first (signing) key.
        self.sealer = Sealer(settings.secret_key[0])
        self.lower: tuple[RecordTier, ...] = tuple(lower) if lower is not None else self._build_lower()
        self._shared = next((t for t in self.lower if hasattr(t, "publish")), None)
        if self._shared is not None:
            shared: Any = self._shared
            generation = shared.generation()
            if generation is not None:
                self.generation = generation
            if listen:
                shared.start_listener()
                _restart_listener_after_fork(self)
        self.limits = RasterLimits(
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            max_frames=settings.max_frames,
            formats=frozenset(settings.formats) & frozenset(CONTENT_TYPES) - {"svg"},
        )
        self.svg_limits = SvgLimits(
            max_bytes=settings.max_svg_bytes,
            max_nodes=settings.svg_max_nodes,
            data_images=settings.svg_data_images,
            raster=self.limits,
            # An <svg> root without xmlns (SVG written for inline HTML use) is read
            # as SVG, the way a browser's HTML parser reads it, and comes out in the
            # SVG namespace; the corpus's benign ariaDataTest.svg is such a file.
            # Any other root is still refused (svg_not_svg).
            accept_unnamespaced=True,
        )
        # Precomputed at start-up: the route check is a prefix test per request.
        self._prefixes = tuple(settings.paths)
        self._allowed_params = RESERVED_PARAMS | frozenset(settings.source_params)
        self._key_hosts = frozenset(settings.key_hosts)
        self._routes: dict[tuple[str, str | None, str, str | None, str | None], _Route] = {}
        # AVIF first when this Pillow can encode it: smaller than WebP at equal quality.
        self._negotiable = ("avif", "webp") if "avif" in OUTPUT_AVAILABLE else ("webp",)
        common: list[tuple[str, str]] = [
            ("Cache-Control", settings.cache_control),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ]
        if settings.cross_origin_resource_policy != "off":
            common.append(("Cross-Origin-Resource-Policy", settings.cross_origin_resource_policy))
        self._common_headers: Headers = tuple(common)
        self.limiter = (
            MissLimiter(settings.miss_rate, namespace=self.sealer.fingerprint, redis_url=settings.redis_url)
            if settings.miss_rate is not None
            else None
        )
        self._trusted_proxies = settings.trusted_proxies
        #: The remote (proxy) route's policy, or ``None`` when IMAGEGUARD_REMOTE_HOSTS is empty.
        self.remote_policy: RemotePolicy | None = None
        self._remote_path: str | None = None
        self._remote_fetcher: RemoteFetcher | None = None
        if settings.remote_hosts:
            try:
                from .remote import RemotePolicy
            except ImportError as exc:  # httpx is the [remote] extra
                raise ConfigError(
                    variable="IMAGEGUARD_REMOTE_HOSTS",
                    value=",".join(settings.remote_hosts),
                    accepted="remote images need httpx: pip install 'imageguard[remote]'",
                ) from exc

            timeout = float(settings.remote_timeout)
            self.remote_policy = RemotePolicy(
                hosts=settings.remote_hosts,
                schemes=settings.remote_schemes,
                allow_private=settings.remote_allow_private,
                max_bytes=settings.max_bytes,
                timeout=timeout,
                connect_timeout=min(5.0, timeout),
            )
            self._remote_path = settings.remote_path
        self.metrics = METRICS
        self.metrics.watch(self)  # imageguard_cache_bytes{tier}, read at scrape time
        self._surrogate_names: tuple[str, ...] = {
            "off": (),
            "surrogate-key": ("Surrogate-Key",),
            "cache-tag": ("Cache-Tag",),
            "both": ("Surrogate-Key", "Cache-Tag"),
        }[settings.surrogate_key]

    def _build_lower(self) -> tuple[RecordTier, ...]:
        tiers: list[RecordTier] = []
        settings = self.settings
        if settings.disk_cache_dir is not None:
            from .cache.disk import DiskCache

            tiers.append(
                DiskCache(settings.disk_cache_dir, settings.disk_cache_bytes, settings.cache_ttl, self.sealer)
            )
        if settings.redis_url is not None:
            from .cache.redis import RedisCache

            tiers.append(
                RedisCache(
                    settings.redis_url,
                    settings.cache_ttl,
                    self.sealer,
                    on_purge=self._remote_purge,
                    on_resync=self._resync,
                    on_tick=self.flush_counters,
                )
            )
        return tuple(tiers)

    # -- routing -----------------------------------------------------------------

    def is_guarded(self, path: str, query: str) -> bool:
        """Step 1 of DESIGN §3: under a guarded prefix, and an image path or transform query.

        The remote route (when enabled) is always guarded, wherever it lies.
        """
        if path == self._remote_path:
            return True
        if not path.startswith(self._prefixes):
            return False
        if _has_image_extension(path):
            return True
        # Spellings that a later layer may still turn into an image path must not
        # slip past as "not an image": a second percent-decoding ("/a.png%252e"),
        # backslashes as separators, ";" path parameters ("/a.png;x"). They are
        # guarded, and normalise_path() then refuses them.
        if ("%" in path and _has_image_extension(unquote(path))) or (
            ("\\" in path or ";" in path) and _has_image_extension(path.replace("\\", "/").split(";", 1)[0])
        ):
            return True
        if query:
            for part in query.replace(";", "&").split("&"):
                if part.partition("=")[0] in TRANSFORM_PARAMS:
                    return True
        return False

    # -- remote images -------------------------------------------------------------

    def _check_remote(self, url: str) -> RemoteURL:
        from .remote import check_url

        if self.remote_policy is None:  # pragma: no cover - the route exists only with a policy
            raise BadRequest("remote_url_invalid", "remote images are not enabled")
        return check_url(url, self.remote_policy)

    @property
    def remote_fetcher(self) -> RemoteFetcher:
        """The fetcher of the remote route (built on first use; I/O: the adapters call it)."""
        if self._remote_fetcher is None:
            from .remote import RemoteFetcher

            if self.remote_policy is None:
                raise RuntimeError("remote images are not enabled (IMAGEGUARD_REMOTE_HOSTS)")
            self._remote_fetcher = RemoteFetcher(self.remote_policy)
        return self._remote_fetcher

    # -- clients -----------------------------------------------------------------

    def client_address(
        self, remote: str | None, forwarded_for: str | None = None, forwarded: str | None = None
    ) -> str | None:
        """The client of a request: *remote* unless trusted proxies say otherwise.

        With ``IMAGEGUARD_TRUSTED_PROXIES=n``, the n-th address from the right of
        ``X-Forwarded-For`` (werkzeug ``ProxyFix(x_for=n)`` semantics: each
        trusted proxy appended one); without that header, the n-th ``for=`` of
        ``Forwarded`` (RFC 7239). Fewer hops than trusted, or a value that is not
        an IP address, leaves *remote*: a client can prepend anything, but it
        cannot push its own value into the trusted part. With 0 (the default)
        both headers are ignored.
        """
        trusted = self._trusted_proxies
        if trusted <= 0:
            return remote
        if forwarded_for:
            hops = [part.strip() for part in forwarded_for.split(",")]
        elif forwarded:
            hops = _forwarded_for(forwarded)
        else:
            return remote
        if len(hops) < trusted:
            return remote
        return _ip(hops[-trusted]) or remote

    def charge_fill(self, plan: FillPlan) -> None:
        """Charge a fill (an upstream call) to the plan's client (``IMAGEGUARD_MISS_RATE``).

        Called by the adapter that leads a fill, after L2/L3 missed; hits and
        waiters are never charged.

        :raises RateLimited: the client is over its budget (429 with ``Retry-After``).
        """
        if self.limiter is None:
            return
        retry_after = self.limiter.charge(plan.client)
        if retry_after is not None:
            raise RateLimited(
                "rate_limited",
                "too many cache misses from this client",
                retry_after=retry_after,
                facts={"client": plan.client},
            )

    @staticmethod
    def retries_fill(error: RateLimited, plan: FillPlan, attempt: int) -> bool:
        """Whether a request that waited on a fill refused with *error* starts its own.

        Yes when the fill was charged to another client (its budget is not this
        request's), for at most :data:`FOLLOW_ATTEMPTS` attempts.
        """
        return error.facts.get("client") != plan.client and attempt < FOLLOW_ATTEMPTS - 1

    # -- request side ------------------------------------------------------------

    def decide(self, request: Request, *, guarded: bool = False) -> Decision:
        """Route, normalise, parse, verify, key and look up one request.

        :param guarded: the adapter already checked :meth:`is_guarded` (saves a repeat).
        :raises BadRequest: malformed path or query (400).
        :raises InvalidSignature: missing, invalid or expired signature (403).
        """
        if not guarded and not self.is_guarded(request.path, request.query):
            return PASS
        if request.method not in ("GET", "HEAD"):
            return PASS
        route = self.route(request)
        head = request.method == "HEAD"
        entry = self.cache.get(route.key)
        if entry is not None:
            not_modified = entry.matches(request.if_none_match)
            self.metrics.hit("l1")
            self.metrics.request("not_modified" if not_modified else "hit")
            return Hit(entry, not_modified, head)
        return FillPlan(
            key=route.key,
            path=route.path,
            upstream_query=route.upstream_query,
            upstream_host=route.host,
            transform=route.transform,
            head=head,
            if_none_match=request.if_none_match,
            client=request.client,
            negotiated=route.negotiated,
            generation=route.generation,
            remote=route.remote,
        )

    def negotiate(self, accept: str | None) -> str | None:
        """The output format ``Accept`` asks for: ``avif``, ``webp`` or ``None`` (keep the source's).

        Only explicit ``image/avif`` / ``image/webp`` with a non-zero q count
        (``image/*`` does not promise either), so the key takes one of three
        values per URL, never the raw header.
        """
        if not accept:
            return None
        accepted: set[str] = set()
        for part in accept.split(","):
            media, _, params = part.partition(";")
            quality = 1.0
            for param in params.split(";"):
                name, _, value = param.strip().partition("=")
                if name.lower() == "q":
                    try:
                        quality = float(value)
                    except ValueError:
                        quality = 0.0
            if quality > 0:
                accepted.add(media.strip().lower())
        for fmt in self._negotiable:
            if f"image/{fmt}" in accepted:
                return fmt
        return None

    def route(self, request: Request) -> _Route:
        """Steps 3 to 6 of DESIGN §3 for a guarded GET/HEAD: normalise, parse, verify, key.

        The outcome for one exact (path, raw path, query, host) is remembered,
        so a hit on a signed URL does not re-verify its signature; only the
        expiry, which depends on the clock, is checked again. Only accepted
        requests are remembered, and a purge of everything forgets them all.
        """
        negotiated = self.negotiate(request.accept) if self.settings.negotiate else None
        memo_key = (request.path, request.raw_path, request.query, request.host, negotiated)
        route = self._routes.get(memo_key)
        if route is not None and route.generation == self.generation:
            if route.expiry is not None and route.expiry < self.clock():
                raise InvalidSignature("expired_signature", "the signed URL has expired")
            return route
        path = normalise_path(request.path, request.raw_path)
        remote = path == self._remote_path
        if remote:
            # The proxy route: ``url`` is the only other parameter, and a signature is
            # always required, whatever IMAGEGUARD_SIGNING says (DESIGN, issue 8).
            params, source = self.parse_query(request.query, allowed=_REMOTE_PARAMS)
            transform = parse_transform(params, max_side=self.settings.max_side)
            self.verify(path, params, source, always=True)
            if "url" not in source:
                raise BadRequest("remote_url_invalid", "the remote route needs a url parameter")
            path = self._check_remote(unquote(source["url"])).url
            source = {}
        else:
            params, source = self.parse_query(request.query)
            transform = parse_transform(params, max_side=self.settings.max_side)
            self.verify(path, params, source)
        if negotiated is not None and transform.fmt is None:
            transform = dataclasses.replace(transform, fmt=negotiated)  # keyed like a signed fmt
        else:
            negotiated = None  # a signed fmt wins over Accept
        host = self._keyed_host(request.host)
        upstream_query = "&".join(f"{k}={source[k]}" for k in sorted(source))
        generation = self.generation
        expiry = params.get("e")
        if expiry is not None and not _EXPIRY_RE.fullmatch(expiry):
            # Checked here too: verify() only looks at e on a signed URL.
            raise BadRequest("bad_param_value", "e must be a canonical integer (unix time)")
        route = _Route(
            path=path,
            key=self.key_for(path, transform, upstream_query, host, generation),
            transform=transform,
            upstream_query=upstream_query,
            host=host,
            expiry=int(expiry) if expiry is not None else None,
            generation=generation,
            negotiated=negotiated is not None,
            remote=remote,
        )
        if len(self._routes) >= ROUTE_MEMO_SIZE:
            self._routes.clear()  # cheap, and bounded: an attacker gains nothing by filling it
        self._routes[memo_key] = route
        return route

    def parse_query(
        self, query: str, *, allowed: frozenset[str] | None = None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Split the query strictly into (imageguard params, source params).

        Source parameter values are decoded and re-encoded in one canonical
        spelling, which is what the upstream receives and what is keyed.

        :raises BadRequest: ``;`` separators, empty or nameless parts, unknown
            or duplicate names, encoded names, undecodable values.
        """
        params: dict[str, str] = {}
        source: dict[str, str] = {}
        if not query:
            return params, source
        if ";" in query:
            raise BadRequest("bad_query", "';' is not a query separator here")
        for part in query.split("&"):
            name, sep, value = part.partition("=")
            if not sep or not name:
                raise BadRequest("bad_query", "every query part must be name=value")
            if not _NAME_RE.fullmatch(name):
                raise BadRequest("bad_query", "query parameter names must be plain ASCII")
            if name not in (self._allowed_params if allowed is None else allowed):
                raise BadRequest("unknown_param", f"unknown query parameter {name!r}")
            if name in params or name in source:
                raise BadRequest("duplicate_param", f"duplicate query parameter {name!r}")
            if name in RESERVED_PARAMS:
                params[name] = value
            else:
                try:
                    decoded = unquote_plus(value, errors="strict")
                except UnicodeDecodeError as exc:
                    raise BadRequest("bad_query", "undecodable query value", original_error=exc) from exc
                source[name] = quote(decoded, safe="")
        return params, source

    def verify(
        self, path: str, params: dict[str, str], source: dict[str, str], *, always: bool = False
    ) -> None:
        """Check ``s`` and ``e`` per ``IMAGEGUARD_SIGNING`` (DESIGN §6).

        :raises InvalidSignature: a signature is required and missing, does not
            verify under any key, or has expired.
        """
        mode = "always" if always else self._signing
        if mode == "off":
            return
        signature = params.get("s")
        if signature is None:
            if mode == "always" or not params.keys().isdisjoint(TRANSFORM_PARAMS):
                raise InvalidSignature("missing_signature", "this URL must be signed")
            return
        if len(signature) != SIGNATURE_LENGTH:  # the alphabet is checked by the comparison
            raise InvalidSignature("bad_signature", "malformed signature")
        expiry = params.get("e")
        if expiry is not None:
            if not _EXPIRY_RE.fullmatch(expiry):
                raise BadRequest("bad_param_value", "e must be a canonical integer (unix time)")
        elif self._max_age is not None:
            raise InvalidSignature("missing_expiry", "signed URLs must carry an expiry (e)")
        # canonical_form(), inlined (this runs for every route not yet remembered):
        # without source parameters the names are known, and so is their order.
        if source:
            signed = {**params, **source}
            query = "&".join([f"{k}={signed[k]}" for k in sorted(signed) if k != "s"])
        else:
            query = "&".join([f"{k}={params[k]}" for k in _SIGNED_ORDER if k in params])
        canonical = f"{path}?{query}" if query else path
        if not self.signer.verify(canonical, signature):
            raise InvalidSignature("bad_signature", "the signature does not match")
        if expiry is not None and int(expiry) < self.clock():
            raise InvalidSignature("expired_signature", "the signed URL has expired")

    def _keyed_host(self, host: str | None) -> str | None:
        if not self._key_hosts:
            return None
        name = (host or "").strip().lower()
        if name not in self._key_hosts:
            raise BadRequest("host_not_allowed", "this Host is not served")
        return name

    def key_for(
        self,
        path: str,
        transform: Transform,
        upstream_query: str,
        host: str | None,
        generation: int | None = None,
    ) -> str:
        """The cache key: an HMAC over the canonical, verified request (DESIGN §3 step 6)."""
        t = transform  # canonical_transform(), inlined: this runs for every uncached route
        material = (
            f"{self.generation if generation is None else generation}\x1f{host or ''}\x1f{path}"
            f"\x1fw={t.w or ''}&h={t.h or ''}&fit={t.fit}&q={t.q or ''}&fmt={t.fmt or ''}"
            f"\x1f{upstream_query}"
        )
        return self.signer.cache_key(material)

    def lookup(self, key: str) -> Entry | None:
        """The cached entry for *key* (the adapters re-check once they lead a fill; not counted again)."""
        return self.cache.get(key, count=False)

    def lookup_lower(self, plan: FillPlan) -> Entry | None:
        """Look *plan* up in L2, then L3; a verified hit is promoted to the faster tiers.

        Blocking I/O (disk, Redis): the WSGI adapter calls it in the request's
        thread, the ASGI adapter in a worker thread, both inside the key's
        single flight. Entries that fail their integrity check are deleted and
        logged by the tier and count as misses, so the image is filled again.
        """
        if not self.lower:
            return None
        wanted = source_hash(plan.path)
        for index, tier in enumerate(self.lower):
            record = tier.get(plan.key, wanted)
            if record is None:
                continue
            entry = self.entry_from_record(record, origin=tier.name)
            self.metrics.hit(tier.name)
            self.cache.set(plan.key, entry)
            for faster in self.lower[:index]:
                faster.set(record)
            return entry
        return None

    def entry_from_record(self, record: Record, *, origin: str = "l2") -> Entry:
        """An :class:`Entry` for a verified record, with this instance's headers."""
        return self._entry(
            record.key,
            record.source_path,
            record.body,
            record.content_type,
            record.etag,
            record.last_modified,
            record.created,
            origin=origin,
        )

    def url(self, path: str | None = None, /, *, remote: str | None = None, **params: object) -> str:
        """A signed URL for *path* (or for the *remote* image) with transform and source parameters.

        :param path: the decoded path, as the app routes it (``/static/cat.jpg``).
        :param remote: instead of *path*: an image URL on an allowed host
            (``IMAGEGUARD_REMOTE_HOSTS``); the result is the remote route with a
            signed ``url`` (always signed, whatever ``IMAGEGUARD_SIGNING`` says).
        :param params: ``w``, ``h``, ``fit``, ``q``, ``fmt``, ``e`` and the names of
            ``IMAGEGUARD_SOURCE_PARAMS``; ``None`` values are left out.
        :raises ValueError: an unknown parameter or a value the middleware would refuse,
            a remote URL it would refuse, or neither or both of *path* and *remote*.
        """
        if (path is None) == (remote is None):
            raise ValueError("url() takes a path or remote=, not both or neither")
        allowed = self._allowed_params
        always = False
        if remote is not None:
            if self._remote_path is None:
                raise ValueError("remote images are not enabled: set IMAGEGUARD_REMOTE_HOSTS")
            try:
                checked = self._check_remote(remote).url
            except Rejected as exc:
                raise ValueError(f"{exc.reason}: {exc}") from exc
            path, allowed, always = self._remote_path, _REMOTE_PARAMS, True
            params = {**params, "url": checked}
        assert path is not None  # for mypy: one of the two, checked above
        path = normalise_path(path)
        given = {k: str(v) for k, v in params.items() if v is not None}
        if self.settings.signature_max_age is not None and "e" not in given:
            given["e"] = str(int(self.clock()) + self.settings.signature_max_age)
        signed: dict[str, str] = {}
        for name, value in given.items():
            if name == "s" or name not in allowed:
                raise ValueError(f"unknown image URL parameter {name!r}")
            signed[name] = value if name in RESERVED_PARAMS else quote(value, safe="")
        try:
            parse_transform(signed, max_side=self.settings.max_side)
        except BadRequest as exc:
            raise ValueError(str(exc)) from exc
        if "e" in signed and not _EXPIRY_RE.fullmatch(signed["e"]):
            raise ValueError("e must be a canonical integer (unix time), e.g. 1800000000")
        canonical = canonical_form(path, signed)
        quoted_path = quote(path, safe="/!$&'()*+,:=@")
        query = "&".join(f"{k}={signed[k]}" for k in sorted(signed))
        mode = "always" if always else self.settings.signing
        if mode != "off" and (signed or mode == "always"):
            signature = self.signer.signature(canonical)
            query = f"{query}&s={signature}" if query else f"s={signature}"
        return f"{quoted_path}?{query}" if query else quoted_path

    # -- response side -----------------------------------------------------------

    def complete(
        self,
        plan: FillPlan,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> Outcome:
        """Judge the upstream's answer; sanitize, store and return it as an :class:`Entry`.

        A non-200 answer is passed on as a :class:`Reply` with ``no-store``
        forced (never cached). This does the CPU work: run it in a worker
        thread under ASGI.

        :raises InvalidImage: the body is not an allowed, valid image (502).
        """
        if status != 200:
            return self._pass_on(status, headers, body)
        if len(body) > self.settings.max_bytes:
            raise _too_large(len(body), self.settings.max_bytes)
        length = _header(headers, "content-length")
        if length is not None and length.strip().isdigit() and int(length) != len(body):
            # A body cut short can still parse (a GIF cut at a frame boundary):
            # the upstream's own Content-Length says it is not the whole image.
            raise InvalidImage(
                "truncated_image",
                "the upstream body does not match its Content-Length",
                facts={"size": len(body), "declared": int(length)},
            )
        encoding = _header(headers, "content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            raise InvalidImage("unsupported_encoding", "the upstream body is content-encoded")
        declared = (_header(headers, "content-type") or "").partition(";")[0].strip().lower()
        sniffed = sniff(body)
        facts: dict[str, object] = {"declared": declared or None, "sniffed": sniffed, "size": len(body)}
        if sniffed is None:
            raise InvalidImage("not_image", "the upstream body is not an image", facts=facts)
        if sniffed not in self.settings.formats or (sniffed != "svg" and sniffed not in self.limits.formats):
            raise InvalidImage("format_not_allowed", f"{sniffed} images are not allowed", facts=facts)
        if DECLARED_TYPES.get(declared) != sniffed:
            raise InvalidImage(
                "type_mismatch", f"declared {declared or 'no type'} but the bytes are {sniffed}", facts=facts
            )
        started = time.perf_counter()
        if sniffed == "svg":
            entry = self._complete_svg(plan, headers, body)
            self.metrics.sanitize_seconds("svg", time.perf_counter() - started)
            return entry
        image = sanitize_raster(body, self.limits, plan.transform)
        self.metrics.sanitize_seconds(sniffed, time.perf_counter() - started)
        entry = self.make_entry(plan.key, plan.path, image, headers)
        self.store(entry, plan.generation)
        return entry

    def _complete_svg(self, plan: FillPlan, headers: Sequence[tuple[str, str]], body: bytes) -> Entry:
        """Sanitize an SVG (DESIGN §5), log what was removed, store and return it."""
        if self.settings.svg == "reject":
            raise InvalidImage("svg_not_allowed", "SVG images are not served here (IMAGEGUARD_SVG=reject)")
        transform = dataclasses.replace(plan.transform, fmt=None) if plan.negotiated else plan.transform
        if transform != _NO_TRANSFORM:
            # No rasterizer: resizing or converting an SVG is not something we can do safely.
            raise InvalidImage("svg_transform_unsupported", "SVG images cannot be resized or converted")
        if len(body) > self.svg_limits.max_bytes:
            raise InvalidImage(
                "too_large",
                "the SVG exceeds IMAGEGUARD_MAX_SVG_BYTES",
                facts={"size": len(body), "limit": self.svg_limits.max_bytes},
            )
        svg = sanitize_svg(body, self.svg_limits)
        for reason in svg.removed:
            security_event(
                reason, "removed from an SVG", path=plan.path, client=plan.client, key=plan.key[:12]
            )
        entry = self.make_entry(plan.key, plan.path, svg, headers)
        self.store(entry, plan.generation)
        return entry

    def store(self, entry: Entry, generation: int | None = None) -> None:
        """Put *entry* in every tier (DESIGN §3 step 10).

        A fill that started before a purge of everything (*generation* older
        than the current one) is served to its waiters but not stored: its
        key can never be looked up again, and a shared tier must not keep it.
        """
        if generation is not None and generation != self.generation:
            return
        self.cache.set(entry.key, entry)
        if self.lower:
            record = entry.record()
            for tier in self.lower:
                tier.set(record)

    def make_entry(
        self,
        key: str,
        source_path: str,
        image: SanitizedImage | SanitizedSvg,
        upstream_headers: Sequence[tuple[str, str]] = (),
    ) -> Entry:
        """Build an :class:`Entry`: every header of a hit, computed once."""
        body = image.body
        return self._entry(
            key,
            source_path,
            body,
            image.content_type,
            '"' + hashlib.sha256(body).hexdigest()[:32] + '"',
            _http_date(_header(upstream_headers, "last-modified")),
            self.clock(),
        )

    def _entry(
        self,
        key: str,
        source_path: str,
        body: bytes,
        content_type: str,
        etag: str,
        last_modified: str | None,
        created: float,
        *,
        origin: str = "fill",
    ) -> Entry:
        validators: list[tuple[str, str]] = [("ETag", etag)]
        if last_modified:
            validators.append(("Last-Modified", last_modified))
        if self.settings.negotiate:
            # The same URL answers differently by Accept: caches must key on it.
            validators.append(("Vary", "Accept"))
        hashed = source_hash(source_path)
        # A CDN purges every variant of a source by this tag (IMAGEGUARD_SURROGATE_KEY).
        surrogate = tuple((name, hashed) for name in self._surrogate_names)
        headers = (
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *validators,
            *self._common_headers,
            *surrogate,
            ("Accept-Ranges", "none"),
        )
        headers_304 = (*validators, *self._common_headers, *surrogate)
        return Entry(
            key=key,
            body=body,
            content_type=content_type,
            etag=etag,
            source_path=source_path,
            headers=headers,
            headers_304=headers_304,
            created=created,
            raw_headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            raw_headers_304=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers_304],
            last_modified=last_modified,
            source_hash=hashed,
            origin=origin,
        )

    def _pass_on(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> Reply:
        # Upstream errors and redirects are passed on but never cached
        # (CPDoS, DESIGN §1), and never set cookies on a guarded path.
        dropped = {"set-cookie", "cache-control", "content-length", "expires", "pragma"}
        kept = tuple((k, v) for k, v in headers if k.lower() not in dropped)
        out = (
            *kept,
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        )
        return Reply(status, out, body)

    def reject(self, error: Rejected, request: Request | None = None, *, key: str | None = None) -> Reply:
        """Log a security event for *error*, count it, and build its reply (DESIGN §9)."""
        with self._rejections_lock:
            self.rejections[error.reason] += 1
        self.metrics.rejection(error.reason)
        self.metrics.request(_OUTCOME_BY_STATUS.get(error.status, "rejected"))
        self.anomaly.observe(error.reason)
        security_event(
            error.reason,
            error.message,
            **{
                **error.facts,
                "status": error.status,
                "path": request.path if request else None,
                "client": request.client if request else None,
                "key": key[:12] if key else None,
            },
        )
        return error_reply(error)

    # -- purge ----------------------------------------------------------------

    def purge(self, *, key: str | None = None, path: str | None = None, remote: str | None = None) -> int:
        """Drop one entry by *key*, or every variant of the source *path* or *remote* URL, from every tier.

        With Redis, the other instances drop it from their L1 and L2 too.

        :returns: how many entries the fullest tier held.
        """
        if sum(x is not None for x in (key, path, remote)) != 1:
            raise TypeError("purge() takes exactly one of key=, path= or remote=")
        if remote is not None:
            try:
                hashed = source_hash(self._check_remote(remote).url)
            except Rejected as exc:
                raise ValueError(f"not a remote URL imageguard serves: {remote!r} ({exc})") from exc
            removed = self._drop_source(hashed, shared=True)
            self._publish("source", hashed)
            return removed
        if key is not None:
            removed = self._drop_key(key, shared=True)
            self._publish("key", key)
            return removed
        assert path is not None  # for mypy; checked above
        try:
            hashed = source_hash(normalise_path(path))
        except BadRequest as exc:
            raise ValueError(f"not a path imageguard serves: {path!r} ({exc})") from exc
        removed = self._drop_source(hashed, shared=True)
        self._publish("source", hashed)
        return removed

    def purge_all(self) -> None:
        """Forget everything: bump the generation (old keys can never match) and empty the tiers.

        With Redis the generation is shared (``INCR``), and every instance
        learns it at once by pub/sub, or when it reconnects.
        """
        generation: int | None = None
        if self._shared is not None:
            generation = cast(Any, self._shared).bump_generation()
        with self._generation_lock:
            self.generation = generation if generation is not None else self.generation + 1
            current = self.generation
        self._forget(shared=True)
        self._publish("all", "", current)

    def _drop_key(self, key: str, *, shared: bool) -> int:
        counts = [int(self.cache.delete(key))]
        counts += [int(t.delete(key)) for t in self.lower if shared or t is not self._shared]
        return max(counts)

    def _drop_source(self, hashed: str, *, shared: bool) -> int:
        counts = [self.cache.delete_source(hashed)]
        counts += [t.delete_source(hashed) for t in self.lower if shared or t is not self._shared]
        return max(counts)

    def _forget(self, *, shared: bool) -> None:
        self._routes.clear()
        self.cache.clear()
        for tier in self.lower:
            if shared or tier is not self._shared:
                tier.clear()

    def _publish(self, op: str, value: str, generation: int | None = None) -> None:
        if self._shared is None:
            return
        from .cache.redis import PurgeMessage

        shared: Any = self._shared
        shared.publish(
            PurgeMessage(
                op=op,  # type: ignore[arg-type]
                value=value,
                generation=self.generation if generation is None else generation,
                origin=shared.origin,
            )
        )

    def _remote_purge(self, message: Any) -> None:
        """A purge made by another instance (pub/sub): drop it here, outside the shared tier."""
        if message.op == "key":
            self._drop_key(message.value, shared=False)
        elif message.op == "source":
            self._drop_source(message.value, shared=False)
        elif message.op == "all":
            self._resync(message.generation)

    def _resync(self, generation: int) -> None:
        """Catch up with the shared generation (after a purge of everything, or a reconnect)."""
        with self._generation_lock:
            if generation == self.generation:
                return
            self.generation = generation
        self._forget(shared=False)

    def served(self, outcome: Outcome) -> None:
        """Count a request answered past L1: ``hit`` (L2/L3), ``miss`` (a fill) or ``passed_on``."""
        if isinstance(outcome, Entry):
            self.metrics.request("miss" if outcome.origin == "fill" else "hit")
        else:
            self.metrics.request("passed_on")

    def stats(self) -> dict[str, object]:
        """Per tier: entries, bytes, hits, misses and hit ratio; rejections by reason.

        ``rejections`` counts since start-up, ``rejections_recent`` over the
        anomaly detector's rolling window (ten minutes).
        """
        out: dict[str, object] = {"generation": self.generation}
        for name, counters in (("l1", self.cache.stats()), *((t.name, t.stats()) for t in self.lower)):
            hits, misses = int(counters.get("hits", 0)), int(counters.get("misses", 0))
            out[name] = {**counters, "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None}
        with self._rejections_lock:
            out["rejections"] = dict(self.rejections)
        out["rejections_recent"] = self.anomaly.counts()
        return out

    def counter_totals(self) -> dict[str, int]:
        """This instance's counters since start-up, flat (``l1.hits``, ``rejections.bad_signature``)."""
        totals: dict[str, int] = {}
        for name, counters in (("l1", self.cache.stats()), *((t.name, t.stats()) for t in self.lower)):
            for counter in ("hits", "misses", "integrity_failures"):
                if counter in counters:
                    totals[f"{name}.{counter}"] = int(counters[counter])
        with self._rejections_lock:
            totals.update({f"rejections.{reason}": n for reason, n in self.rejections.items()})
        return totals

    def flush_counters(self) -> None:
        """Add what this instance counted since the last flush to the fleet-wide counters in Redis.

        Called about every ten seconds by the Redis listener thread, so
        ``imageguard cache stats`` shows hit ratios and rejections of every
        instance. Nothing is lost while Redis is down: the next flush adds it.
        """
        if self._shared is None:
            return
        totals = self.counter_totals()
        deltas = {k: v - self._flushed.get(k, 0) for k, v in totals.items() if v != self._flushed.get(k, 0)}
        if deltas and cast(Any, self._shared).add_counters(deltas):
            self._flushed = totals

    def tier_bytes(self) -> dict[str, int]:
        """Bytes used per tier (the metrics collector reads it at scrape time)."""
        sizes = {"l1": int(self.cache.stats()["bytes"])}
        for tier in self.lower:
            sizes[tier.name] = int(tier.stats().get("bytes", 0))
        return sizes

    def close(self) -> None:
        """Release the lower tiers' files, connections and threads, and the remote fetcher."""
        for tier in self.lower:
            tier.close()
        if self._remote_fetcher is not None:
            self._remote_fetcher.close()


def _restart_listener_after_fork(core: Core) -> None:
    """Restart the pub/sub listener in a forked worker (gunicorn ``--preload``).

    Threads do not survive ``fork()``; without this a preloaded worker would
    never hear another instance's purge. Held weakly: a discarded core is not kept.
    """
    ref = weakref.ref(core)

    def after_in_child() -> None:
        alive = ref()
        if alive is not None and alive._shared is not None:
            cast(Any, alive._shared).start_listener()

    os.register_at_fork(after_in_child=after_in_child)


#: ``imageguard_requests_total{outcome}`` of a rejection, by status.
_OUTCOME_BY_STATUS: Final = {429: "rate_limited", 503: "shed"}


def _forwarded_for(header: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header, in order (RFC 7239)."""
    hops: list[str] = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.strip().lower() == "for":
                hops.append(value.strip().strip('"'))
    return hops


def _ip(value: str) -> str | None:
    """*value* as a plain IP address (``[v6]:port`` and ``v4:port`` unwrapped), or ``None``."""
    text = value.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def error_reply(error: Rejected) -> Reply:
    """The response for a rejection: short text, ``no-store``, reason header.

    Adapters send no body for HEAD, for this and every other :class:`Reply`.
    """
    body = f"{error.status} {HTTPStatus(error.status).phrase}: {error.reason}\n".encode()
    headers: list[tuple[str, str]] = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-ImageGuard-Reason", error.reason),
    ]
    if error.retry_after is not None:
        headers.append(("Retry-After", str(error.retry_after)))
    return Reply(error.status, tuple(headers), body)


def _http_date(value: str | None) -> str | None:
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return format_datetime(moment.astimezone(timezone.utc), usegmt=True)
