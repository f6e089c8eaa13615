"""Validate and re-encode raster images (JPEG, PNG, GIF, WebP, AVIF) with Pillow.

Use :func:`sanitize_raster` on every raster body before it is cached or served
(DESIGN §4). What it returns is a *fresh encode*: the pixels of the input and
nothing else. Metadata (EXIF, XMP, IPTC, ICC, comments, text chunks) and any
bytes after the image end are gone because nothing is copied from the input
file; the EXIF orientation and an embedded ICC profile are applied to the
pixels so that the image still looks the same without them.

The order of work is the defence:

1. :func:`sniff` decides the format from magic bytes. Anything that is not an
   allowed format is refused before Pillow sees it.
2. Cheap header walks (PNG IHDR, JPEG SOF, WebP canvas, every GIF image
   descriptor) check width, height, pixels, frame count and total pixels
   against :class:`RasterLimits` before Pillow allocates anything.
3. ``Image.open(..., formats=[ONE])`` runs exactly one Pillow plugin, the one
   for the sniffed format; the same limits are checked again on what Pillow
   parsed (size, tile extents of every frame) before each frame is decoded.
4. Decoding (JPEG in draft mode when downscaling), EXIF orientation, the
   :class:`Transform`, ICC to sRGB, then encoding with fixed settings, so
   equal input gives equal bytes (a stable ETag). Animated GIF, APNG, WebP
   and AVIF keep their frames, durations, loop count and disposal when the
   output format can animate; JPEG output takes the first frame.

:func:`sanitize_raster` raises :class:`~imageguard.errors.InvalidImage` and
nothing else. Reason codes: ``not_image``, ``format_not_allowed``,
``side_too_large``, ``too_many_pixels``, ``too_many_frames``,
``truncated_image``, ``corrupt_image``.

Nothing here changes Pillow's global state (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``, the warnings filters): the host
application keeps its own settings, and the functions are safe to call from
worker threads.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Final

# Importing the plugins registers them, so that ``Image.open(formats=[...])``
# finds the requested format without calling ``Image.init()``, which would
# import every other plugin Pillow has.
from PIL import (
    GifImagePlugin,
    Image,
    ImageCms,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
    features,
)

from .errors import BadRequest, ConfigError, InvalidImage

try:  # Pillow >= 11.2 ships the plugin; the codec itself is optional.
    from PIL import AvifImagePlugin  # noqa: F401  (imported to register AVIF)
except ImportError:  # pragma: no cover - depends on the Pillow build
    _AVIF_AVAILABLE = False
else:
    _AVIF_AVAILABLE = bool(features.check("avif"))

__all__ = [
    "CONTENT_TYPES",
    "RASTER_FORMATS",
    "RasterLimits",
    "SanitizedImage",
    "Transform",
    "sanitize_raster",
    "sniff",
]

#: Raster formats imageguard can accept and produce (lower-case names).
RASTER_FORMATS: frozenset[str] = frozenset({"jpeg", "png", "gif", "webp", "avif"})

#: ``Content-Type`` of every format imageguard serves.
CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
    "svg": "image/svg+xml",
}

# Pillow's format name for each of ours: the one plugin Image.open may run.
_PIL_FORMATS: Final = {
    "jpeg": JpegImagePlugin.JpegImageFile.format,
    "png": PngImagePlugin.PngImageFile.format,
    "gif": GifImagePlugin.GifImageFile.format,
    "webp": WebPImagePlugin.WebPImageFile.format,
    "avif": "AVIF",
}

# Formats that this Pillow build can decode and encode.
_AVAILABLE: Final = RASTER_FORMATS if _AVIF_AVAILABLE else RASTER_FORMATS - {"avif"}
#: Formats this Pillow build can encode (AVIF only where Pillow has libavif).
OUTPUT_AVAILABLE: Final = _AVAILABLE

# Output formats that keep an animation; JPEG output takes the first frame.
_ANIMATED_OUTPUT: Final = frozenset({"gif", "png", "webp", "avif"})

# An animation may decode at most this many times ``max_pixels`` in total.
# Pillow's GIF and APNG writers keep every frame until the file is written, so
# the total is also the peak memory: 2 x 50 Mpx x 4 bytes (RGBA) = 400 MB with
# the defaults. That still admits 200 frames of 700x700, or 48 frames of
# 1080p, while 200 frames just under the per-frame limit are refused.
_TOTAL_PIXELS_FACTOR: Final = 2

# Default qualities when the signed URL has no ``q``: the usual web defaults,
# where artefacts are hard to see and files are small (libjpeg 85, libwebp 80,
# AVIF 60 on Pillow's 0..100 scale, roughly JPEG 85 in perceived quality).
_DEFAULT_QUALITY: Final = {"jpeg": 85, "webp": 80, "avif": 60}

# Fixed encoder settings: nothing depends on the clock, the host or the input
# file's metadata, so the same pixels always give the same bytes.
_WEBP_METHOD: Final = 4  # libwebp's default speed/size trade-off
_AVIF_SPEED: Final = 6  # Pillow's default
# libaom's output differs between 1 thread and more (row multithreading), but
# is the same for any count from 2 up (checked 2..16), so a fixed count keeps
# the bytes independent of the host's CPU count.
_AVIF_THREADS: Final = 2
_PNG_COMPRESS_LEVEL: Final = 6  # zlib's default

# Downscaling: Pillow's ``reducing_gap`` first reduces by an integer factor
# (JPEG: DCT scaling in the decoder via draft mode; others: Image.reduce), then
# resamples the last step (at most this factor) with Lanczos. 2.0 is what
# Image.thumbnail uses and is visually indistinguishable from a full Lanczos.
_REDUCING_GAP: Final = 2.0

# JPEG output of an image with transparency is composited onto this colour.
_JPEG_BACKGROUND: Final = (255, 255, 255)

# EXIF orientation -> the transpose that undoes it, as ImageOps.exif_transpose.
_ORIENTATION: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG: Final = 0x0112
_SWAPS_AXES: Final = frozenset({5, 6, 7, 8})

_FITS: Final = frozenset({"contain", "cover", "fill"})

# Sniffing an SVG decodes at most this much of the body (XML declaration,
# comments and DOCTYPE before the root element must fit into it).
_SVG_SNIFF_BYTES: Final = 65536

_MESSAGES: Final = {
    "not_image": "upstream response is not an image",
    "format_not_allowed": "image format is not allowed",
    "side_too_large": "image width or height exceeds the limit",
    "too_many_pixels": "image has too many pixels",
    "too_many_frames": "image has too many frames",
    "truncated_image": "image data is truncated",
    "corrupt_image": "image data is corrupt",
}


@dataclass(frozen=True, slots=True)
class RasterLimits:
    """Limits checked on every frame before any pixel is decoded.

    :param max_pixels: largest ``width * height`` of one frame.
    :param max_side: largest width or height.
    :param max_frames: most frames of an animation.
    :param formats: accepted input formats (lower-case names; ``svg`` may be
        listed but is handled by the SVG pipeline, never here).
    :raises ConfigError: a limit is not a positive integer, or a format is
        unknown.

    .. versionadded:: 0.1
    """

    max_pixels: int = 50_000_000
    max_side: int = 16384
    max_frames: int = 200
    formats: frozenset[str] = RASTER_FORMATS

    def __post_init__(self) -> None:
        for variable, value in (
            ("IMAGEGUARD_MAX_PIXELS", self.max_pixels),
            ("IMAGEGUARD_MAX_SIDE", self.max_side),
            ("IMAGEGUARD_MAX_FRAMES", self.max_frames),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(variable, value, "a positive integer")
        unknown = set(self.formats) - RASTER_FORMATS - {"svg"}
        if unknown:
            raise ConfigError(
                "IMAGEGUARD_FORMATS",
                ",".join(sorted(unknown)),
                "jpeg, png, gif, webp, avif, svg",
            )

    @property
    def max_total_pixels(self) -> int:
        """Most pixels decoded across all frames of one image."""
        return self.max_pixels * _TOTAL_PIXELS_FACTOR


@dataclass(frozen=True, slots=True)
class Transform:
    """The signed transform of one request (DESIGN §4).

    :param w: output width; alone, the height follows the aspect ratio.
    :param h: output height; alone, the width follows the aspect ratio.
    :param fit: with both ``w`` and ``h``: ``contain`` (fit inside the box),
        ``cover`` (fill the box, centre crop) or ``fill`` (stretch).
    :param q: quality 1..100 for lossy output (JPEG, WebP, AVIF).
    :param fmt: output format; ``None`` keeps the input format.
    :raises BadRequest: a value is out of range (reason ``bad_param_value``).

    Images are never enlarged: a box larger than the source gives the source
    size (``contain``), the largest centred crop with the box's aspect ratio
    (``cover``) or the box scaled down to fit the source (``fill``). Upscaling
    adds no information, and refusing it bounds the output by the input, which
    the limits already bound.

    .. versionadded:: 0.1
    """

    w: int | None = None
    h: int | None = None
    fit: str = "contain"
    q: int | None = None
    fmt: str | None = None

    def __post_init__(self) -> None:
        # The core validates the query first; this is the backstop for any
        # other caller, with the core's reason code.
        for name, value, high in (("w", self.w, None), ("h", self.h, None), ("q", self.q, 100)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequest("bad_param_value", f"{name} must be a positive integer")
            if high is not None and value > high:
                raise BadRequest("bad_param_value", f"{name} must be between 1 and {high}")
        if self.fit not in _FITS:
            raise BadRequest("bad_param_value", "fit must be contain, cover or fill")
        if self.fmt is not None and self.fmt not in RASTER_FORMATS:
            raise BadRequest("bad_param_value", "fmt must be jpeg, png, gif, webp or avif")


@dataclass(frozen=True, slots=True)
class SanitizedImage:
    """A fresh encode made by :func:`sanitize_raster`.

    .. versionadded:: 0.1
    """

    #: The encoded image: pixels only, no metadata.
    body: bytes
    #: Output format, lower case (``jpeg``, ``png``, ``gif``, ``webp``, ``avif``).
    format: str
    #: ``Content-Type`` of :attr:`body`.
    content_type: str
    #: Output width in pixels.
    width: int
    #: Output height in pixels.
    height: int
    #: Frames in :attr:`body` (1 for a still image).
    frames: int
    #: The input format as sniffed from its magic bytes.
    source_format: str


# --------------------------------------------------------------------------
# Sniffing
# --------------------------------------------------------------------------

# (prefix, name): formats recognised by a fixed signature at offset 0.
_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG", "png"),  # a damaged rest of the signature is a corrupt PNG
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"8BPS", "psd"),
    (b"%!PS", "eps"),
    (b"\xc5\xd0\xd3\xc6", "eps"),  # DOS EPS binary header
    (b"%PDF-", "pdf"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "jp2"),  # JPEG 2000 codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\xff\x0a", "jxl"),
    (b"qoif", "qoi"),
    (b"icns", "icns"),
    (b"DDS ", "dds"),
    (b"BLP1", "blp"),
    (b"BLP2", "blp"),
    (b"FTEX", "ftex"),
    (b"\x59\xa6\x6a\x95", "sun"),
    (b"\xb1\x68\xde\x3a", "dcx"),
    (b"SIMPLE  =", "fits"),
    (b"Image type:", "im"),
    (b"DanM", "msp"),
    (b"LinS", "msp"),
    (b"/* XPM */", "xpm"),
    (b"\x00\x00\x00\x00\x00\x00\x00\x04", "mcidas"),
    (b"\xd7\xcd\xc6\x9a", "wmf"),  # placeable metafile
    (b"\x01\x00\x09\x00\x00\x03", "wmf"),
    (b"AT&TFORM", "djvu"),
    (b"gimp xcf", "xcf"),
    (b"\x76\x2f\x31\x01", "exr"),
    (b"\x8aMNG\r\n\x1a\n", "mng"),
    (b"\x8bJNG\r\n\x1a\n", "jng"),
    (b"SDPX", "dpx"),
    (b"XPDS", "dpx"),
    (b"\x80\x2a\x5f\xd7", "cin"),
)

_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_PNM_RE: Final = re.compile(rb"P[1-7fF][\s#]")
_SVG_ROOT_RE: Final = re.compile(r"<(?:[A-Za-z_][\w.\-]*:)?svg[\s/>]")
_XML_SPACE: Final = " \t\r\n"


def sniff(data: bytes) -> str | None:
    """Return the format of ``data`` judged from its magic bytes only.

    ``'jpeg'``, ``'png'``, ``'gif'``, ``'webp'``, ``'avif'`` and ``'svg'`` are
    the formats imageguard can accept. Other image formats that the signature
    identifies are returned by name (``'bmp'``, ``'tiff'``, ``'ico'``,
    ``'psd'``, ``'eps'``, ``'pdf'``, ``'jp2'``, ``'heic'``, ``'jxl'``, ...)
    so that the caller can say *format not allowed* rather than *not an
    image*. ``None`` means it does not look like an image at all (HTML,
    JavaScript, text, ZIP, video, empty).

    An SVG is recognised after an optional UTF-8 or UTF-16 byte order mark
    and whitespace, optional XML declaration, processing instructions,
    comments and DOCTYPE, by an ``<svg`` (or ``<prefix:svg``) root element;
    UTF-16 without a BOM is recognised by its zero bytes. Whether it really is
    an SVG is for the SVG pipeline's XML parser to decide.

    AVIF is an ISO-BMFF ``ftyp`` box whose major or compatible brands include
    ``avif`` or ``avis``; other HEIF brands give ``'heic'``.

    .. versionadded:: 0.1
    """
    if not data:
        return None
    for prefix, name in _SIGNATURES:
        if data.startswith(prefix):
            return name
    head = data[:32]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    small = _sniff_small_magic(head)
    if small is not None:
        return small
    if _PNM_RE.match(head):
        return "ppm"
    if len(data) >= 24 and data[20:24] == b"GIMP":
        return "gbr"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 44 and head[:4] == b"\x01\x00\x00\x00" and head[40:44] == b" EMF":
        return "emf"
    if data.endswith(b"TRUEVISION-XFILE.\x00"):
        return "tga"
    if data[:256].lstrip().startswith(b"#define"):
        return "xbm"
    if _sniff_svg(data):
        return "svg"
    return None


def _sniff_small_magic(head: bytes) -> str | None:
    """Formats whose short magic needs a plausible header field as well."""
    if len(head) < 18:
        return None
    if head.startswith(b"BM") and struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
        return "bmp"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] != b"\x00\x00":
        return "ico" if head[2] == 1 else "cur"
    if head[:2] == b"\x01\xda" and head[2] in (0, 1) and head[3] in (1, 2):
        return "sgi"
    if head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] in (0, 1) and head[3] in (1, 2, 4, 8):
        return "pcx"
    if head[4:6] in (b"\x11\xaf", b"\x12\xaf") and head[14:16] in (b"\x00\x00", b"\x03\x00"):
        return "fli"
    return None


def _sniff_ftyp(data: bytes) -> str | None:
    box_size = struct.unpack_from(">I", data, 0)[0]
    end = min(len(data), box_size if box_size >= 16 else 16, 4096)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if b"avif" in brands or b"avis" in brands:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heic"
    if b"crx " in brands:
        return "cr3"
    if b"jp2 " in brands or b"jpx " in brands:
        return "jp2"
    return None  # MP4, QuickTime and other ISO-BMFF video


def _sniff_svg(data: bytes) -> bool:
    text = _decode_xml_head(data[:_SVG_SNIFF_BYTES])
    pos = 0
    end = len(text)
    while True:
        while pos < end and text[pos] in _XML_SPACE:
            pos += 1
        if text.startswith("<?", pos):  # XML declaration, processing instruction
            close = text.find("?>", pos + 2)
            if close < 0:
                return False
            pos = close + 2
        elif text.startswith("<!--", pos):
            close = text.find("-->", pos + 4)
            if close < 0:
                return False
            pos = close + 3
        elif text[pos : pos + 9].upper() == "<!DOCTYPE":
            pos = _skip_doctype(text, pos + 9)
            if pos < 0:
                return False
        else:
            return _SVG_ROOT_RE.match(text, pos) is not None


def _decode_xml_head(head: bytes) -> str:
    if head.startswith(b"\xef\xbb\xbf"):
        return head[3:].decode("utf-8", "replace")
    if head.startswith(b"\xff\xfe"):
        return head[2:].decode("utf-16-le", "replace")
    if head.startswith(b"\xfe\xff"):
        return head[2:].decode("utf-16-be", "replace")
    if len(head) >= 4 and head[1] == 0 and head[3] == 0 and head[0] and head[2]:
        return head.decode("utf-16-le", "replace")
    if len(head) >= 4 and head[0] == 0 and head[2] == 0 and head[1] and head[3]:
        return head.decode("utf-16-be", "replace")
    return head.decode("utf-8", "replace")


def _skip_doctype(text: str, pos: int) -> int:
    """Index after the DOCTYPE that ends after ``pos``, or -1 if it does not end."""
    quote = ""
    depth = 0
    for index in range(pos, len(text)):
        char = text[index]
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == ">" and depth <= 0:
            return index + 1
    return -1


# --------------------------------------------------------------------------
# Limits, checked on headers before Pillow opens the file
# --------------------------------------------------------------------------


def _check_size(width: int, height: int, limits: RasterLimits) -> None:
    size = {"width": width, "height": height}
    if width > limits.max_side or height > limits.max_side:
        raise InvalidImage(
            "side_too_large", _MESSAGES["side_too_large"], facts={**size, "limit": limits.max_side}
        )
    pixels = width * height
    # Pillow's own bomb threshold counts too: its warning is an error here,
    # without touching the warnings filters of the host application.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pixels > limits.max_pixels or (pillow_limit is not None and pixels > pillow_limit):
        raise InvalidImage(
            "too_many_pixels", _MESSAGES["too_many_pixels"], facts={**size, "limit": limits.max_pixels}
        )


def _check_frames(frames: int, pixels_per_frame: int, limits: RasterLimits) -> None:
    if frames > limits.max_frames:
        raise InvalidImage("too_many_frames", _MESSAGES["too_many_frames"], facts={"frames": frames})
    if frames * pixels_per_frame > limits.max_total_pixels:
        raise InvalidImage(
            "too_many_pixels",
            _MESSAGES["too_many_pixels"],
            facts={"frames": frames, "pixels": pixels_per_frame},
        )


def _precheck(fmt: str, data: bytes, limits: RasterLimits) -> int | None:
    """Check limits on the headers; return the GIF frame count (else None).

    These walks only ever refuse: when they cannot read a header they let
    Pillow decide, and the same limits are checked again on what Pillow parsed.
    """
    size: tuple[int, int] | None = None
    if fmt == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            size = struct.unpack_from(">II", data, 16)
    elif fmt == "jpeg":
        size = _jpeg_size(data)
    elif fmt == "webp":
        # libwebp allocates the whole canvas when the decoder is created.
        size = _webp_size(data)
    elif fmt == "gif":
        return _scan_gif(data, limits)
    if size is not None:
        _check_size(size[0], size[1], limits)
    return None


_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


# Pillow's GIF reader skips any byte that does not start a block.
_GIF_BLOCK_RE: Final = re.compile(rb"[!,;]")


def _scan_gif(data: bytes, limits: RasterLimits) -> int:
    """Walk every GIF image descriptor without decoding; return the frame count.

    A later frame can be the bomb: Pillow grows the canvas to a frame's
    extents when it seeks to that frame (Pillow's
    ``decompression_bomb_extents.gif``), and allocates a disposal buffer of
    the frame's size, so every descriptor is checked here, before ``open``.
    """
    end = len(data)
    if end < 13:
        return 0
    canvas_w, canvas_h = struct.unpack_from("<HH", data, 6)
    _check_size(canvas_w, canvas_h, limits)
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    total = 0
    while pos < end:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor
            if pos + 10 > end:
                break
            left, top, width, height = struct.unpack_from("<HHHH", data, pos + 1)
            _check_size(width, height, limits)
            canvas_w, canvas_h = max(canvas_w, left + width), max(canvas_h, top + height)
            _check_size(canvas_w, canvas_h, limits)
            frames += 1
            total += canvas_w * canvas_h
            if frames > limits.max_frames:
                raise InvalidImage("too_many_frames", _MESSAGES["too_many_frames"], facts={"frames": frames})
            if total > limits.max_total_pixels:
                raise InvalidImage(
                    "too_many_pixels", _MESSAGES["too_many_pixels"], facts={"frames": frames, "pixels": total}
                )
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW code size
        else:
            match = _GIF_BLOCK_RE.search(data, pos + 1)
            if match is None:
                break
            pos = match.start()
    return frames


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    # Linear in the number of sub-blocks: ~80k for 20 MB written by a normal
    # encoder (255-byte blocks); even 1-byte blocks cost only ~35 ms per MB.
    end = len(data)
    while pos < end:
        length = data[pos]
        if not length:
            return pos + 1
        pos += length + 1
    return pos


def _check_opened_frame(im: Image.Image, limits: RasterLimits) -> None:
    """Limits on what Pillow parsed for the current frame, before it is loaded."""
    width, height = im.size
    if width < 1 or height < 1:
        raise InvalidImage("corrupt_image", _MESSAGES["corrupt_image"])
    _check_size(width, height, limits)
    for tile in getattr(im, "tile", None) or ():
        x0, y0, x1, y1 = tile.extents or (0, 0, width, height)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height or x1 < x0 or y1 < y0:
            raise InvalidImage("corrupt_image", _MESSAGES["corrupt_image"])
        _check_size(x1 - x0, y1 - y0, limits)


# --------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    size: tuple[int, int]  # output size
    box: tuple[float, float, float, float]  # source region, oriented coordinates


def _plan(width: int, height: int, transform: Transform) -> _Plan | None:
    """Output size and source region for ``transform``, or None to keep the size."""
    w, h = transform.w, transform.h
    box = (0.0, 0.0, float(width), float(height))
    if w is None and h is None:
        return None
    if w is not None and h is None:
        out_w = min(w, width)
        size = (out_w, max(1, round(height * out_w / width)))
    elif h is not None and w is None:
        out_h = min(h, height)
        size = (max(1, round(width * out_h / height)), out_h)
    else:
        assert w is not None and h is not None
        if transform.fit == "contain":
            scale = min(w / width, h / height, 1.0)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
        elif transform.fit == "fill":
            shrink = min(1.0, width / w, height / h)
            size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
        else:  # cover: the largest centred region with the box's aspect ratio
            if width * h > height * w:
                crop_w, crop_h = height * w / h, float(height)
            else:
                crop_w, crop_h = float(width), width * h / w
            left, top = (width - crop_w) / 2, (height - crop_h) / 2
            box = (left, top, left + crop_w, top + crop_h)
            # Never enlarge: a box larger than the crop gives the crop itself.
            size = (w, h) if w <= crop_w else (max(1, round(crop_w)), max(1, round(crop_h)))
    if size == (width, height) and box == (0.0, 0.0, float(width), float(height)):
        return None
    return _Plan(size, box)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is dropped anyway; keep the pixels
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION else 1


def _draft_jpeg(im: ImageFile.ImageFile, plan: _Plan, orientation: int) -> float:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale; return the scale applied.

    As ``Image.thumbnail`` does, the decoder keeps at least ``_REDUCING_GAP``
    times the output size, and Lanczos does the rest.
    """
    width, height = im.size
    swaps = orientation in _SWAPS_AXES
    oriented_w, oriented_h = (height, width) if swaps else (width, height)
    x0, y0, x1, y1 = plan.box
    want_w = math.ceil(oriented_w * plan.size[0] / (x1 - x0) * _REDUCING_GAP)
    want_h = math.ceil(oriented_h * plan.size[1] / (y1 - y0) * _REDUCING_GAP)
    if swaps:
        want_w, want_h = want_h, want_w
    result = im.draft(None, (max(1, want_w), max(1, want_h)))
    if result is None:
        return 1.0
    return result[1][2] / width


def _resize(frame: Image.Image, plan: _Plan, scale: float) -> Image.Image:
    if frame.mode == "1":  # Pillow resizes "1" and "P" with NEAREST
        frame = frame.convert("L")
    elif frame.mode in ("P", "PA"):
        frame = frame.convert("RGBA" if _has_alpha(frame) else "RGB")
    elif frame.mode.startswith("I;16"):
        frame = frame.convert("I")
    x0, y0, x1, y1 = plan.box
    box = (x0 * scale, y0 * scale, x1 * scale, y1 * scale)
    return frame.resize(plan.size, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def _has_alpha(frame: Image.Image) -> bool:
    return frame.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in frame.info


_Converter = Callable[[Image.Image], Image.Image]


def _srgb_converter(icc: bytes) -> _Converter | None:
    """A function that converts pixels described by ``icc`` to sRGB, or None.

    ``None`` means the profile is dropped and the pixels are kept as they are:
    the profile is unreadable, or does not describe pixels of this kind.
    """
    try:
        source = ImageCms.ImageCmsProfile(BytesIO(icc))
        space = source.profile.xcolor_space.strip()
    except Exception:
        return None
    transforms: dict[str, ImageCms.ImageCmsTransform | None] = {}

    def transform_for(in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform | None:
        key = f"{in_mode}>{out_mode}"
        if key not in transforms:
            try:
                srgb = ImageCms.createProfile("sRGB")
                transforms[key] = ImageCms.buildTransform(source, srgb, in_mode, out_mode)
            except Exception:
                transforms[key] = None
        return transforms[key]

    def convert(frame: Image.Image) -> Image.Image:
        mode = frame.mode
        alpha = None
        if space == "RGB" and mode in ("P", "PA", "LA", "L", "1"):
            frame = frame.convert("RGBA" if _has_alpha(frame) else "RGB")
            mode = frame.mode
        if space == "GRAY" and mode in ("LA", "L"):
            if mode == "LA":
                alpha = frame.getchannel("A")
                frame = frame.convert("L")
            mode = "L"
        in_mode = {
            ("RGB", "RGB"): "RGB",
            ("RGB", "RGBA"): "RGBA",
            ("CMYK", "CMYK"): "CMYK",
            ("GRAY", "L"): "L",
        }.get((space, mode))
        if in_mode is None:
            return frame
        out_mode = "RGBA" if in_mode == "RGBA" else "RGB"
        transform = transform_for(in_mode, out_mode)
        if transform is None:
            return frame
        try:
            result = ImageCms.applyTransform(frame, transform)
        except Exception:
            return frame
        if result is None:  # pragma: no cover - only with inPlace=True
            return frame
        if alpha is not None:
            result.putalpha(alpha)
        return result

    return convert


def _scale_16bit(frame: Image.Image) -> Image.Image:
    # Pillow clips I;16 -> L at 255; scale the 0..65535 range instead.
    return frame.convert("I").point(lambda value: value / 257).convert("L")


def _for_encoder(frame: Image.Image, out_fmt: str) -> Image.Image:
    """Convert to a mode the output format stores as it is (no implicit conversions)."""
    mode = frame.mode
    if mode.startswith("I;16") or mode == "I":
        if out_fmt == "png":  # PNG keeps 16-bit grey
            return frame if mode == "I;16" else frame.convert("I;16")
        frame = _scale_16bit(frame)
    elif mode == "F":
        frame = frame.convert("L")
    elif mode in ("La", "RGBa"):
        frame = frame.convert("LA" if mode == "La" else "RGBA")
    mode = frame.mode
    alpha = _has_alpha(frame)
    if out_fmt == "jpeg":
        if alpha:
            return _flatten(frame)
        return frame if mode in ("L", "RGB") else frame.convert("RGB")
    if out_fmt == "png":
        if mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
            return frame
        return frame.convert("RGBA" if alpha else "RGB")
    if out_fmt == "gif":
        if mode in ("1", "L") and not alpha:
            return frame
        if mode == "P" and isinstance(frame.info.get("transparency", 0), int):
            return frame
        # The GIF encoder palettises RGB(A) with an adaptive palette and maps
        # fully transparent pixels to a transparent index.
        return frame.convert("RGBA" if alpha else "RGB")
    # webp, avif (AVIF also stores grey as it is)
    if mode in ("RGB", "RGBA") or (out_fmt == "avif" and mode == "L" and not alpha):
        return frame
    return frame.convert("RGBA" if alpha else "RGB")


def _flatten(frame: Image.Image) -> Image.Image:
    """Composite onto white: JPEG has no alpha channel."""
    if frame.mode in ("L", "LA"):
        la = frame.convert("LA")
        background = Image.new("L", frame.size, _JPEG_BACKGROUND[0])
        background.paste(la.getchannel("L"), mask=la.getchannel("A"))
        return background
    rgba = frame.convert("RGBA")
    background = Image.new("RGB", frame.size, _JPEG_BACKGROUND)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _clean_info(frame: Image.Image) -> None:
    """Keep only what is part of the pixels: the transparent colour or index."""
    transparency = frame.info.get("transparency")
    frame.info = {}
    if transparency is not None and frame.mode in ("1", "L", "P", "RGB", "I;16"):
        frame.info["transparency"] = transparency


def _process(
    frame: Image.Image,
    orientation: int,
    plan: _Plan | None,
    scale: float,
    converter: _Converter | None,
    out_fmt: str,
) -> Image.Image:
    # Orientation first: w, h and the cover crop refer to the image as displayed.
    if orientation in _ORIENTATION:
        frame = frame.transpose(_ORIENTATION[orientation])
    if plan is not None:
        frame = _resize(frame, plan, scale)
    # Colour conversion after downscaling: the same result (resampling happens
    # in the encoded values either way) for a fraction of the pixels.
    if converter is not None:
        frame = converter(frame)
    return _for_encoder(frame, out_fmt)


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _encode(frames: list[Image.Image], out_fmt: str, q: int | None, anim: _Animation | None) -> bytes:
    first = frames[0]
    options: dict[str, object] = {}
    if out_fmt == "jpeg":
        options = {"quality": q or _DEFAULT_QUALITY["jpeg"]}
    elif out_fmt == "png":
        options = {"compress_level": _PNG_COMPRESS_LEVEL}
    elif out_fmt == "webp":
        options = {"quality": q or _DEFAULT_QUALITY["webp"], "method": _WEBP_METHOD}
    elif out_fmt == "avif":
        options = {
            "quality": q or _DEFAULT_QUALITY["avif"],
            "speed": _AVIF_SPEED,
            "max_threads": _AVIF_THREADS,
        }
    if anim is not None and len(frames) > 1:
        options["save_all"] = True
        options["append_images"] = frames[1:]
        options["duration"] = anim.durations
        if out_fmt == "gif":
            options["disposal"] = anim.gif_disposals()
            if anim.loop is not None:
                options["loop"] = anim.loop
        elif out_fmt == "png":
            options["disposal"] = anim.apng_disposals()
            options["blend"] = PngImagePlugin.Blend.OP_SOURCE  # frames are composited
            options["loop"] = anim.loop_or_default()
        elif out_fmt == "webp":
            options["loop"] = anim.loop_or_default()
    out = BytesIO()
    first.save(out, _PIL_FORMATS[out_fmt], **options)
    body = out.getvalue()
    if out_fmt == "avif" and len(frames) > 1:
        body = _zero_bmff_times(body)
    return body


@dataclass(slots=True)
class _Animation:
    source_format: str
    loop: int | None
    durations: list[int]
    disposals: list[int]  # as read: GIF disposal method or APNG dispose_op
    has_alpha: bool

    def gif_disposals(self) -> list[int]:
        if self.source_format == "gif":
            # Pillow hands us composited frames and its GIF writer diffs each
            # frame against the previous one, so "restore to previous" (3) is
            # written as "restore to background" (2), which it handles.
            return [2 if value in (2, 3) else value for value in self.disposals]
        if self.source_format == "png":
            return [{1: 2, 2: 2}.get(value, 1) for value in self.disposals]
        # WebP/AVIF frames are full canvases; clear between them when any
        # pixel can be transparent, so that no frame shows through the next.
        return [2 if self.has_alpha else 1] * len(self.durations)

    def apng_disposals(self) -> list[int]:
        if self.source_format == "png":
            return list(self.disposals)
        if self.source_format == "gif":
            return [{2: 1, 3: 2}.get(value, 0) for value in self.disposals]
        return [0] * len(self.durations)

    def loop_or_default(self) -> int:
        if self.loop is not None:
            return self.loop
        return 1 if self.source_format == "gif" else 0  # GIF without NETSCAPE: play once


# ISO-BMFF boxes that carry creation/modification times (seconds since 1904).
_BMFF_CONTAINERS: Final = frozenset({b"moov", b"trak", b"mdia"})
_BMFF_TIMED: Final = frozenset({b"mvhd", b"tkhd", b"mdhd"})


def _zero_bmff_times(body: bytes) -> bytes:
    """Zero the clock times libavif writes into an AVIF image sequence.

    They are the only bytes that differ between two encodes of the same
    frames, and identical output is what keeps the ETag stable.
    """
    buffer = bytearray(body)

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end:
            size = struct.unpack_from(">I", buffer, pos)[0]
            kind = bytes(buffer[pos + 4 : pos + 8])
            if size < 8 or pos + size > end:
                return
            if kind in _BMFF_CONTAINERS:
                walk(pos + 8, pos + size)
            elif kind in _BMFF_TIMED and size >= 12:
                width = 8 if buffer[pos + 8] == 1 else 4  # full box version
                fields = pos + 12
                if fields + 2 * width <= pos + size:
                    buffer[fields : fields + 2 * width] = bytes(2 * width)
            pos += size

    walk(0, len(buffer))
    return bytes(buffer)


def _count_frames(body: bytes, out_fmt: str) -> int:
    # Encoders merge identical consecutive frames; report what was written.
    with Image.open(BytesIO(body), formats=[_PIL_FORMATS[out_fmt]]) as written:
        return int(getattr(written, "n_frames", 1))


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def sanitize_raster(data: bytes, limits: RasterLimits, transform: Transform = Transform()) -> SanitizedImage:
    """Validate ``data`` against ``limits``, apply ``transform`` and re-encode.

    :param data: the upstream body.
    :param limits: size, frame and format limits (checked before decoding).
    :param transform: the signed transform; the default keeps size and format.
    :returns: a fresh encode carrying pixels only.
    :raises InvalidImage: with :attr:`~imageguard.errors.Rejected.reason`
        ``not_image``, ``format_not_allowed`` (also for SVG, which has its own
        pipeline, and for an output format this Pillow cannot write),
        ``side_too_large``, ``too_many_pixels``, ``too_many_frames``,
        ``truncated_image`` or ``corrupt_image``; the Pillow exception, if
        any, is the ``original_error``. Nothing else is raised.

    .. versionadded:: 0.1
    """
    try:
        return _sanitize(data, limits, transform)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage("too_many_pixels", _MESSAGES["too_many_pixels"], original_error=exc) from exc
    except Exception as exc:  # every decoder failure is a refusal, never a 500
        reason = "corrupt_image"
        if isinstance(exc, EOFError) or (
            isinstance(exc, (OSError, ValueError, SyntaxError)) and "truncat" in str(exc).lower()
        ):
            reason = "truncated_image"
        raise InvalidImage(reason, _MESSAGES[reason], original_error=exc) from exc


def _sanitize(data: bytes, limits: RasterLimits, transform: Transform) -> SanitizedImage:
    fmt = sniff(data)
    if fmt is None:
        raise InvalidImage("not_image", _MESSAGES["not_image"])
    if fmt not in limits.formats or fmt not in _AVAILABLE:
        raise InvalidImage("format_not_allowed", _MESSAGES["format_not_allowed"])
    out_fmt = transform.fmt or fmt
    if out_fmt not in _AVAILABLE:
        raise InvalidImage("format_not_allowed", f"output format {out_fmt} is not available")

    gif_frames = _precheck(fmt, data, limits)

    with Image.open(BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as im:
        _check_opened_frame(im, limits)
        width, height = im.size
        if fmt == "jpeg":  # an MPO's further images are not served
            declared = 1
        elif gif_frames is not None:
            declared = max(gif_frames, 1)
        else:
            declared = int(getattr(im, "n_frames", 1))
        _check_frames(declared, width * height, limits)

        if fmt in ("png", "webp", "avif"):
            # Decode now (no draft mode for these): PNG's getexif() would load
            # the image itself, and a load that fails must raise here, not
            # leave a half-decoded image behind for a second load() to return.
            im.load()
        orientation = _orientation(im) if fmt != "gif" else 1
        oriented = (height, width) if orientation in _SWAPS_AXES else (width, height)
        plan = _plan(oriented[0], oriented[1], transform)
        icc = im.info.get("icc_profile")
        converter = _srgb_converter(icc) if isinstance(icc, bytes) and icc else None

        if declared > 1 and out_fmt in _ANIMATED_OUTPUT:
            frames, anim = _animated(im, fmt, limits, orientation, plan, converter, out_fmt)
        else:
            scale = 1.0
            if fmt == "jpeg" and plan is not None:
                scale = _draft_jpeg(im, plan, orientation)
            im.load()
            frame = _process(im, orientation, plan, scale, converter, out_fmt)
            _clean_info(frame)
            frames, anim = [frame], None

        body = _encode(frames, out_fmt, transform.q, anim)
    count = _count_frames(body, out_fmt) if len(frames) > 1 else 1
    return SanitizedImage(
        body=body,
        format=out_fmt,
        content_type=CONTENT_TYPES[out_fmt],
        width=frames[0].size[0],
        height=frames[0].size[1],
        frames=count,
        source_format=fmt,
    )


def _animated(
    im: Image.Image,
    fmt: str,
    limits: RasterLimits,
    orientation: int,
    plan: _Plan | None,
    converter: _Converter | None,
    out_fmt: str,
) -> tuple[list[Image.Image], _Animation]:
    first_size = im.size
    loop = im.info.get("loop")
    anim = _Animation(
        source_format=fmt,
        loop=loop if isinstance(loop, int) else None,
        durations=[],
        disposals=[],
        has_alpha=False,
    )
    frames: list[Image.Image] = []
    total = 0
    # An APNG whose IDAT image is not part of the animation: skip it.
    start = 1 if fmt == "png" and im.info.get("default_image") else 0
    for index in range(limits.max_frames + 1):
        try:
            im.seek(index)
        except EOFError:
            break
        if index == limits.max_frames:
            raise InvalidImage("too_many_frames", _MESSAGES["too_many_frames"], facts={"frames": index + 1})
        _check_opened_frame(im, limits)
        total += im.size[0] * im.size[1]
        if total > limits.max_total_pixels:
            raise InvalidImage(
                "too_many_pixels", _MESSAGES["too_many_pixels"], facts={"frames": index + 1, "pixels": total}
            )
        im.load()
        if index < start:
            continue
        frame: Image.Image = im
        if frame.size != first_size:  # a GIF frame grew the canvas: clip to it
            frame = frame.crop((0, 0, *first_size))
        duration = im.info.get("duration", 0)
        anim.durations.append(round(duration) if isinstance(duration, (int, float)) else 0)
        if fmt == "gif":
            anim.disposals.append(int(getattr(im, "disposal_method", 0)))
        else:
            disposal = im.info.get("disposal", 0)
            anim.disposals.append(disposal if isinstance(disposal, int) else 0)
        anim.has_alpha = anim.has_alpha or _has_alpha(frame)
        frame = _process(frame, orientation, plan, 1.0, converter, out_fmt)
        if frame is im:
            frame = im.copy()
        _clean_info(frame)
        frames.append(frame)
    if not frames:
        raise InvalidImage("corrupt_image", _MESSAGES["corrupt_image"])
    return frames, anim
