"""The raster pipeline: sniffing, limits before decoding, pixels-only re-encoding, transforms.

Everything runs real Pillow on real bytes: inputs are built here with Pillow and
byte concatenation, or read from ../shared/corpus (tests marked ``corpus``).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps

from imageguard.errors import BadRequest, InvalidImage
from imageguard.raster import (
    CONTENT_TYPES,
    RASTER_FORMATS,
    RasterLimits,
    SanitizedImage,
    Transform,
    sanitize_raster,
    sniff,
)
from tests.support import PIL_NAMES, RASTER_REASONS

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
LIMITS = RasterLimits()
#: Strings the metadata payloads of the corpus and of our own polyglots carry.
PAYLOADS = (b"<script", b"<?php", b"<?=", b"onload=", b"onclick=", b"onmouseover=", b"<svg")


@pytest.fixture(autouse=True, scope="module")
def _no_ghostscript() -> Iterator[None]:
    """Corpus rule 3: Pillow must never hand a file to Ghostscript in this process."""
    from PIL import EpsImagePlugin

    saved = EpsImagePlugin.gs_binary
    EpsImagePlugin.gs_binary = False
    yield
    EpsImagePlugin.gs_binary = saved


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def photo(width: int = 400, height: int = 300, mode: str = "RGB") -> Image.Image:
    """Gradients and noise: something with structure that compresses like a photo."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.radial_gradient("L").resize((width, height))
    blue = Image.effect_noise((width, height), 30)
    image = Image.merge("RGB", (red, green, blue))
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height, with a few bytes of zlib data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


GIF_1X1_PIXELS = b"\x02\x02\x44\x01\x00"  # LZW code size 2, one sub-block, terminator


def gif_bytes(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF built by hand: the logical screen and one descriptor per frame (tiny pixel data)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for left, top, width, height in frames:
        out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 100 ms
        out += b"\x2c" + struct.pack("<HHHHB", left, top, width, height, 0) + GIF_1X1_PIXELS
    out += b"\x3b"
    return bytes(out)


def animated_gif(
    size: tuple[int, int] = (32, 32),
    durations: tuple[int, ...] = (100, 200, 300, 400),
    transparent: bool = False,
) -> bytes:
    frames = []
    for index in range(len(durations)):
        frame = Image.new("RGBA" if transparent else "RGB", size, (0, 0, 0, 0) if transparent else "white")
        x = index * size[0] // len(durations)
        frame.paste((200, 40 * index, 30, 255), (x, 0, x + size[0] // len(durations), size[1]))
        frames.append(frame)
    return encode(
        frames[0],
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=list(durations),
        loop=0,
        disposal=2 if transparent else 1,
    )


def frames_of(body: bytes) -> list[tuple[Image.Image, int]]:
    """Every frame of an image as Pillow composites it, with its duration."""
    result = []
    with Image.open(io.BytesIO(body)) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()
            result.append((image.convert("RGBA"), round(image.info.get("duration", 0))))
    return result


def visible(image: Image.Image) -> Image.Image:
    """RGBA with fully transparent pixels normalised to (0, 0, 0, 0)."""
    rgba = image.convert("RGBA")
    out = Image.new("RGBA", rgba.size, (0, 0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A").point(lambda a: 255 if a else 0))
    return out


# ---------------------------------------------------------------------------
# "Pixels only": what a fresh encode may contain
# ---------------------------------------------------------------------------

PNG_CHUNKS_ALLOWED = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"}
JPEG_MARKERS_ALLOWED = {0xDB, 0xC4, 0xDD} | set(range(0xC0, 0xC3))  # DQT DHT DRI SOF0-2
WEBP_CHUNKS_ALLOWED = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"}


def png_chunk_types(body: bytes) -> list[bytes]:
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    pos, kinds = 8, []
    while pos < len(body):
        length, kind = struct.unpack_from(">I4s", body, pos)
        kinds.append(kind)
        pos += 12 + length
        if kind == b"IEND":
            break
    assert pos == len(body), "bytes after IEND"
    return kinds


def jpeg_segments(body: bytes) -> list[tuple[int, bytes]]:
    assert body.startswith(b"\xff\xd8")
    assert body.endswith(b"\xff\xd9"), "bytes after EOI"
    pos, segments = 2, []
    while True:
        assert body[pos] == 0xFF
        marker = body[pos + 1]
        if marker == 0xDA:
            return segments
        length = struct.unpack_from(">H", body, pos + 2)[0]
        segments.append((marker, body[pos + 4 : pos + 2 + length]))
        pos += 2 + length


def gif_extensions(body: bytes) -> list[tuple[int, bytes]]:
    assert body[:6] in (b"GIF87a", b"GIF89a")
    flags = body[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    extensions = []

    def skip(pos: int) -> int:
        while body[pos]:
            pos += body[pos] + 1
        return pos + 1

    while body[pos] != 0x3B:
        if body[pos] == 0x21:
            extensions.append((body[pos + 1], body[pos + 3 : pos + 3 + body[pos + 2]]))
            pos = skip(pos + 2)
        else:
            assert body[pos] == 0x2C
            flags = body[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = skip(pos + 1)
    assert pos == len(body) - 1, "bytes after the GIF trailer"
    return extensions


def webp_chunk_types(body: bytes) -> list[bytes]:
    assert body[:4] == b"RIFF" and body[8:12] == b"WEBP"
    assert struct.unpack_from("<I", body, 4)[0] + 8 == len(body), "bytes after the RIFF"
    pos, kinds = 12, []
    while pos < len(body):
        kind, length = struct.unpack_from("<4sI", body, pos)
        kinds.append(kind)
        if kind == b"ANMF":  # frames nest their own chunks after a 16-byte header
            inner = pos + 8 + 16
            while inner < pos + 8 + length:
                sub, sub_length = struct.unpack_from("<4sI", body, inner)
                kinds.append(sub)
                inner += 8 + sub_length + (sub_length & 1)
        pos += 8 + length + (length & 1)
    return kinds


def assert_pixels_only(result: SanitizedImage, limits: RasterLimits = LIMITS) -> Image.Image:
    """The output is a fresh encode of the declared format with no metadata, within limits."""
    assert isinstance(result, SanitizedImage)
    assert result.format in RASTER_FORMATS
    assert result.content_type == CONTENT_TYPES[result.format]
    assert sniff(result.body) == result.format
    body = result.body
    if result.format == "png":
        assert set(png_chunk_types(body)) <= PNG_CHUNKS_ALLOWED
    elif result.format == "jpeg":
        for marker, data in jpeg_segments(body):
            if marker == 0xE0:
                assert data.startswith(b"JFIF\x00")
            else:
                assert marker in JPEG_MARKERS_ALLOWED, hex(marker)
    elif result.format == "gif":
        for label, data in gif_extensions(body):
            assert label == 0xF9 or (label == 0xFF and data == b"NETSCAPE2.0"), (label, data)
    elif result.format == "webp":
        assert set(webp_chunk_types(body)) <= WEBP_CHUNKS_ALLOWED
    else:  # avif: no Exif or XMP item, no ICC colour box
        assert b"Exif" not in body and b"mime" not in body
        assert b"colrprof" not in body and b"colrrICC" not in body
    image = Image.open(io.BytesIO(body), formats=[PIL_NAMES[result.format]])
    image.load()
    assert image.size == (result.width, result.height)
    assert getattr(image, "n_frames", 1) == result.frames
    for key in ("exif", "xmp", "icc_profile", "comment", "photoshop", "XML:com.adobe.xmp"):
        assert key not in image.info, key
    assert result.width <= limits.max_side and result.height <= limits.max_side
    assert result.width * result.height <= limits.max_pixels
    assert result.frames <= limits.max_frames
    return image


def outcome(
    data: bytes, limits: RasterLimits = LIMITS, transform: Transform | None = None
) -> SanitizedImage | InvalidImage:
    """The result, or the InvalidImage raised; any other exception fails the test."""
    try:
        return sanitize_raster(data, limits, transform or Transform())
    except InvalidImage as exc:
        return exc


def refused(data: bytes, limits: RasterLimits = LIMITS, transform: Transform | None = None) -> InvalidImage:
    with pytest.raises(InvalidImage) as caught:
        sanitize_raster(data, limits, transform or Transform())
    assert caught.value.reason in RASTER_REASONS
    assert caught.value.status == 502
    return caught.value


# ---------------------------------------------------------------------------
# Polyglots and metadata payloads
# ---------------------------------------------------------------------------

SCRIPT = b"<script>alert(document.domain)</script>"


def png_with_trailing_html() -> bytes:
    return encode(photo(64, 48), "PNG") + b"<html><body>" + SCRIPT + b"</body></html>"


def jpeg_with_metadata() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = SCRIPT.decode()  # ImageDescription
    exif[0x013B] = "<?php system($_GET['c']); ?>"  # Artist
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><svg onload=alert(1)/></rdf:RDF></x:xmpmeta>'
    return encode(photo(64, 48), "JPEG", exif=exif, xmp=xmp, comment=b"<img src=x onerror=alert(1)>" + SCRIPT)


def png_with_text_and_icc() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SCRIPT.decode())
    info.add_text("Title", "<?php echo 1; ?>", zip=True)
    info.add_itxt("XML:com.adobe.xmp", "<svg onload=alert(1)>")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010E] = SCRIPT.decode()
    return encode(photo(64, 48), "PNG", pnginfo=info, icc_profile=icc, exif=exif)


def gif_with_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Main-Class: Evil\n")
        jar.writestr("Evil.class", SCRIPT)
    return encode(photo(64, 48).convert("P"), "GIF", comment=b"<?php phpinfo(); ?>") + archive.getvalue()


@pytest.mark.parametrize(
    ("build", "fmt", "payloads"),
    [
        pytest.param(png_with_trailing_html, "png", (SCRIPT, b"<html"), id="png-trailing-html"),
        pytest.param(
            jpeg_with_metadata, "jpeg", (SCRIPT, b"<?php", b"onload=", b"onerror="), id="jpeg-exif-xmp-com"
        ),
        pytest.param(
            png_with_text_and_icc, "png", (SCRIPT, b"<?php", b"onload="), id="png-text-itxt-ztxt-icc-exif"
        ),
        pytest.param(gif_with_zip, "gif", (SCRIPT, b"PK\x03\x04", b"MANIFEST", b"<?php"), id="gif-zip-gifar"),
    ],
)
def test_polyglot_payloads_do_not_survive(build: Any, fmt: str, payloads: tuple[bytes, ...]) -> None:
    data = build()
    assert payloads[0] in data  # the input really carries the payload
    result = sanitize_raster(data, LIMITS)
    image = assert_pixels_only(result)
    assert result.format == result.source_format == fmt
    assert (result.width, result.height) == (64, 48) == image.size
    for payload in payloads:
        assert payload not in result.body
    assert result.body != data


# ---------------------------------------------------------------------------
# Sniffing and the format allowlist
# ---------------------------------------------------------------------------


def psd_header() -> bytes:
    return b"8BPS" + struct.pack(">H6sHIIHH", 1, b"", 3, 1, 1, 8, 3) + b"\x00" * 14


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n0 0 moveto showpage\n%%EOF\n"

FOREIGN_FORMATS = {
    "tiff": lambda: encode(photo(8, 8), "TIFF"),
    "bmp": lambda: encode(photo(8, 8), "BMP"),
    "ico": lambda: encode(photo(16, 16), "ICO"),
    "psd": psd_header,
    "eps": lambda: EPS,
    "jp2": lambda: b"\xff\x4f\xff\x51\x00\x29" + b"\x00" * 64,
    "qoi": lambda: b"qoif\x00\x00\x00\x01\x00\x00\x00\x01\x03\x00" + b"\x00" * 16,
    "dds": lambda: b"DDS \x7c\x00\x00\x00" + b"\x00" * 120,
    "sgi": lambda: b"\x01\xda\x01\x01\x00\x03\x00\x01\x00\x01\x00\x03" + b"\x00" * 500,
    "pcx": lambda: b"\x0a\x05\x01\x08" + b"\x00" * 124,
}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", None, id="empty"),
        pytest.param(b"<!DOCTYPE html><html><script>alert(1)</script></html>", None, id="html"),
        pytest.param(b"<script>alert(1)</script>", None, id="script-tag"),
        pytest.param(b"alert(document.cookie);//", None, id="javascript"),
        pytest.param(b"PK\x03\x04\x14\x00\x00\x00", None, id="zip"),
        pytest.param(b"hello world\n", None, id="text"),
        pytest.param(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None, id="mp4"),
        pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg", id="jpeg"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png", id="png"),
        pytest.param(b"GIF89a\x01\x00\x01\x00", "gif", id="gif89a"),
        pytest.param(b"GIF87a\x01\x00\x01\x00", "gif", id="gif87a"),
        pytest.param(b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp", id="webp"),
        pytest.param(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "avif", id="avif-major"),
        pytest.param(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "avif", id="avif-compatible"),
        pytest.param(b"\x00\x00\x00\x18ftypavis\x00\x00\x00\x00avismsf1", "avif", id="avis"),
        pytest.param(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic", id="heic"),
        pytest.param(b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00mif1", "heic", id="mif1-without-avif"),
        pytest.param(b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl", id="jxl-container"),
        pytest.param(b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2", id="jp2"),
        pytest.param(b"%PDF-1.7\n", "pdf", id="pdf"),
        pytest.param(b"P6\n1 1\n255\n\x00\x00\x00", "ppm", id="ppm"),
        pytest.param(b"#define x_width 1\n", "xbm", id="xbm"),
        pytest.param(b"AT&TFORM\x00\x00\x00\x00DJVM", "djvu", id="djvu"),
    ],
)
def test_sniff_table(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5" height="5"/></svg>'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(SVG.encode(), "svg", id="plain"),
        pytest.param(b"\n\t  " + SVG.encode(), "svg", id="leading-whitespace"),
        pytest.param(b"\xef\xbb\xbf" + SVG.encode(), "svg", id="utf8-bom"),
        pytest.param(b"\xff\xfe" + SVG.encode("utf-16-le"), "svg", id="utf16le-bom"),
        pytest.param(b"\xfe\xff" + SVG.encode("utf-16-be"), "svg", id="utf16be-bom"),
        pytest.param(SVG.encode("utf-16-le"), "svg", id="utf16le-no-bom"),
        pytest.param(
            b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<!-- Created with Inkscape -->\n'
            b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
            b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n' + SVG.encode(),
            "svg",
            id="declaration-comment-doctype",
        ),
        pytest.param(
            b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "<x>">]><svg/>', "svg", id="internal-subset"
        ),
        pytest.param(b'<svg:svg xmlns:svg="http://www.w3.org/2000/svg"/>', "svg", id="prefixed-root"),
        pytest.param(b"<!DOCTYPE html><html><body><svg></svg></body></html>", None, id="html-with-svg"),
        pytest.param(b"<svgfoo/>", None, id="not-svg-element"),
        pytest.param(b"<!-- unterminated <svg>", None, id="unterminated-comment"),
        pytest.param(b'<a:script xmlns:a="http://www.w3.org/1999/xhtml">1</a:script>', None, id="xhtml"),
    ],
)
def test_sniff_svg(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


def test_svg_is_not_handled_by_the_raster_pipeline() -> None:
    error = refused(SVG.encode())
    assert error.reason == "format_not_allowed"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html><script>alert(1)</script></html>", id="html"),
        pytest.param(b"document.location='https://example.com/?'+document.cookie", id="javascript"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 40, id="zip"),
        pytest.param(b'{"image": "cat.png"}', id="json"),
    ],
)
def test_not_an_image(data: bytes) -> None:
    error = refused(data)
    assert error.reason == "not_image"
    assert error.original_error is None


@pytest.mark.parametrize("name", sorted(FOREIGN_FORMATS))
def test_foreign_formats_are_refused_by_sniffing(name: str) -> None:
    data = FOREIGN_FORMATS[name]()
    assert sniff(data) == name
    error = refused(data)
    assert error.reason == "format_not_allowed"
    assert error.original_error is None  # refused before any decoder ran


def test_allowed_formats_come_from_the_limits() -> None:
    jpeg = encode(photo(16, 16), "JPEG")
    error = refused(jpeg, RasterLimits(formats=frozenset({"png", "svg"})))
    assert error.reason == "format_not_allowed"
    assert sanitize_raster(jpeg, RasterLimits(formats=frozenset({"jpeg"}))).format == "jpeg"


SUBPROCESS_SCRIPT = r"""
import json, sys
from imageguard.errors import InvalidImage
from imageguard.raster import RasterLimits, sanitize_raster

def plugins():
    return sorted(m for m in sys.modules if m.startswith("PIL.") and m.endswith("ImagePlugin"))

reasons = {}
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        sanitize_raster(data, RasterLimits())
        reasons[path] = "accepted"
    except InvalidImage as exc:
        reasons[path] = exc.reason
after_refusals = plugins()
with open(sys.argv[1] + ".png", "rb") as handle:
    accepted = sanitize_raster(handle.read(), RasterLimits()).format
print(json.dumps({"reasons": reasons, "after_refusals": after_refusals,
                  "after_png": plugins(), "accepted": accepted}))
"""

NEVER_IMPORTED = {
    "PIL.TiffImagePlugin",
    "PIL.EpsImagePlugin",
    "PIL.PsdImagePlugin",
    "PIL.IcoImagePlugin",
    "PIL.Jpeg2KImagePlugin",
    "PIL.QoiImagePlugin",
    "PIL.DdsImagePlugin",
    "PIL.SgiImagePlugin",
    "PIL.PcxImagePlugin",
    "PIL.FliImagePlugin",
    "PIL.BlpImagePlugin",
    "PIL.IcnsImagePlugin",
}
OUR_PLUGINS = {
    "PIL.GifImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.PngImagePlugin",
    "PIL.WebPImagePlugin",
    "PIL.AvifImagePlugin",
}


def test_foreign_plugins_are_never_imported(tmp_path: Path) -> None:
    """In a fresh interpreter, refusing TIFF/EPS/PSD/ICO/... never imports their Pillow plugin."""
    paths = []
    for name, build in sorted(FOREIGN_FORMATS.items()):
        path = tmp_path / f"payload.{name}"
        path.write_bytes(build())
        paths.append(str(path))
    Path(paths[0] + ".png").write_bytes(encode(photo(8, 8), "PNG"))
    run = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report["reasons"].values()) == {"format_not_allowed"}
    # Only the plugins of the allowed formats were ever imported.
    assert set(report["after_refusals"]) <= OUR_PLUGINS
    assert report["accepted"] == "png"
    # Opening a PNG makes Pillow preinit() its five common plugins (BMP/PPM
    # among them: imported, never asked to open anything); nothing else.
    assert not set(report["after_png"]) & NEVER_IMPORTED
    assert set(report["after_png"]) <= OUR_PLUGINS | {"PIL.BmpImagePlugin", "PIL.PpmImagePlugin"}


# ---------------------------------------------------------------------------
# Limits before decoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "limits", "reasons"),
    [
        pytest.param((30000, 30000), LIMITS, {"side_too_large", "too_many_pixels"}, id="30000x30000"),
        pytest.param(
            (30000, 30000), RasterLimits(max_side=40000), {"too_many_pixels"}, id="30000x30000-pixels-limit"
        ),
        pytest.param((100000, 1), LIMITS, {"side_too_large"}, id="100000-wide"),
        pytest.param(
            (20000, 20000),
            RasterLimits(max_pixels=10**10, max_side=10**6),
            {"too_many_pixels"},
            id="beyond-pillow-bomb-limit",
        ),
    ],
)
@pytest.mark.timeout(60)  # a hang guard; speed is measured in benchmarks/
def test_png_bomb_is_refused_from_its_header(
    size: tuple[int, int], limits: RasterLimits, reasons: set[str]
) -> None:
    data = png_bomb(*size)
    assert len(data) < 2000
    error = refused(data, limits)
    assert error.reason in reasons
    assert error.original_error is None  # our header check, before Pillow opened it


BOMB_IN_SUBPROCESS = r"""
import resource, struct, sys, zlib
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from imageguard.errors import InvalidImage
from imageguard.raster import RasterLimits, sanitize_raster

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
idat = zlib.compress(b"\0" * 4096)
data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
for limits in (RasterLimits(), RasterLimits(max_pixels=10**9, max_side=10**5)):
    try:
        sanitize_raster(data, limits)
    except InvalidImage as exc:
        print(exc.reason, type(exc.original_error).__name__)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is Linux-specific")
def test_png_bomb_never_allocates_pixels() -> None:
    """Under a 1 GiB address-space limit, a 900 MB frame is refused, not allocated (MemoryError)."""
    run = subprocess.run(
        [sys.executable, "-c", BOMB_IN_SUBPROCESS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    # Default limits: the side limit. Generous limits: Pillow's own bomb threshold
    # (far below 900 Mpx) still applies, as an error, before anything is decoded.
    assert run.stdout.split() == ["side_too_large", "NoneType", "too_many_pixels", "NoneType"]


@pytest.mark.timeout(60)  # a hang guard; speed is measured in benchmarks/
def test_gif_with_ten_thousand_frames() -> None:
    data = gif_bytes((1, 1), [(0, 0, 1, 1)] * 10_000)
    error = refused(data)
    assert error.reason == "too_many_frames"


def test_gif_frame_limit_is_configurable() -> None:
    data = animated_gif(durations=(100, 100, 100, 100, 100))
    assert refused(data, RasterLimits(max_frames=4)).reason == "too_many_frames"
    assert sanitize_raster(data, RasterLimits(max_frames=5)).frames == 5


def test_animation_of_many_mid_size_frames() -> None:
    """150 frames of 1000x1000: each frame is fine, the total (150 Mpx) is not."""
    data = gif_bytes((1000, 1000), [(0, 0, 1000, 1000)] * 150)
    assert LIMITS.max_total_pixels < 150 * 1000 * 1000
    error = refused(data)
    assert error.reason == "too_many_pixels"
    assert error.original_error is None


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        pytest.param([(0, 0, 10, 10), (0, 0, 20000, 20000)], "side_too_large", id="second-frame-20000"),
        pytest.param([(0, 0, 10, 10), (9000, 0, 1, 9000)], "too_many_pixels", id="second-frame-extents"),
        pytest.param([(0, 0, 10, 10)] * 3 + [(0, 0, 9000, 9000)], "too_many_pixels", id="fourth-frame"),
    ],
)
def test_a_later_gif_frame_is_the_bomb(frames: list[tuple[int, int, int, int]], reason: str) -> None:
    error = refused(gif_bytes((10, 10), frames))
    assert error.reason == reason
    assert error.original_error is None


def test_webp_canvas_is_checked_before_the_decoder_allocates_it() -> None:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (16383).to_bytes(3, "little") * 2
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    error = refused(data)
    assert error.reason == "too_many_pixels"
    assert error.original_error is None


@pytest.mark.parametrize(
    ("side", "original"),
    [
        pytest.param(9000, type(None), id="our-limit"),
        pytest.param(14000, Image.DecompressionBombError, id="pillow-bomb-error"),
    ],
)
def test_avif_size_is_checked_before_decoding(side: int, original: type) -> None:
    """AVIF has no header walk of ours: the size Pillow parsed is checked, and its bomb error maps."""
    data = bytearray(encode(photo(64, 64), "AVIF"))
    ispe = data.index(b"ispe")
    struct.pack_into(">II", data, ispe + 8, side, side)  # the image spatial extents property
    error = refused(bytes(data))
    assert error.reason == "too_many_pixels"
    assert isinstance(error.original_error, original)


def test_apng_frame_count_is_checked_before_decoding() -> None:
    frames = [Image.new("RGB", (8, 8), (index * 60, 0, 0)) for index in range(3)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    actl = data.index(b"acTL") - 4
    patched = data[:actl] + png_chunk(b"acTL", struct.pack(">II", 100_000, 0)) + data[actl + 20 :]
    assert refused(patched).reason == "too_many_frames"
    assert sanitize_raster(data, LIMITS).frames == 3


def test_limits_are_validated() -> None:
    from imageguard.errors import ConfigError

    with pytest.raises(ConfigError):
        RasterLimits(max_pixels=0)
    with pytest.raises(ConfigError):
        RasterLimits(formats=frozenset({"bmp"}))


# ---------------------------------------------------------------------------
# Truncated and corrupt input: always InvalidImage, never anything else
# ---------------------------------------------------------------------------


def test_truncated_png_and_jpeg() -> None:
    png = encode(photo(64, 64), "PNG")
    jpeg = encode(photo(64, 64), "JPEG")
    assert refused(png[: len(png) // 2]).reason == "truncated_image"
    assert refused(jpeg[: len(jpeg) // 2]).reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def seeds() -> dict[str, bytes]:
    still = photo(24, 16)
    frames = [still.rotate(angle) for angle in (0, 90, 180)]
    return {
        "png": encode(still, "PNG"),
        "jpeg": encode(still, "JPEG"),
        "gif": animated_gif((24, 16)),
        "webp": encode(still, "WEBP"),
        "apng": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "webp-anim": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    }


@pytest.mark.parametrize("name", ["png", "jpeg", "gif", "webp", "apng", "webp-anim"])
def test_mutated_inputs_raise_only_invalid_image(name: str) -> None:
    """Truncations and byte flips: a result or InvalidImage, no other exception escapes."""
    data = seeds()[name]
    rng = random.Random(name)
    variants = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 12))]
    for _ in range(40):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        variants.append(bytes(mutated))
    for variant in variants:
        result = outcome(variant)
        if isinstance(result, InvalidImage):
            assert result.reason in RASTER_REASONS
        else:
            assert_pixels_only(result)


def test_pillow_global_state_is_untouched() -> None:
    filters = list(warnings.filters)
    max_pixels = Image.MAX_IMAGE_PIXELS
    for data in (png_bomb(30000, 30000), animated_gif(), encode(photo(), "JPEG"), b"junk"):
        outcome(data, LIMITS, Transform(w=100))
    assert warnings.filters == filters
    assert max_pixels == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "size"),
    [
        pytest.param(Transform(), (400, 300), id="none"),
        pytest.param(Transform(w=100), (100, 75), id="w-only"),
        pytest.param(Transform(h=150), (200, 150), id="h-only"),
        pytest.param(Transform(w=200, h=200), (200, 150), id="contain"),
        pytest.param(Transform(w=200, h=200, fit="cover"), (200, 200), id="cover"),
        pytest.param(Transform(w=200, h=100, fit="fill"), (200, 100), id="fill"),
        pytest.param(Transform(w=800), (400, 300), id="w-no-enlarge"),
        pytest.param(Transform(h=900), (400, 300), id="h-no-enlarge"),
        pytest.param(Transform(w=800, h=800), (400, 300), id="contain-no-enlarge"),
        pytest.param(Transform(w=800, h=400, fit="cover"), (400, 200), id="cover-no-enlarge"),
        pytest.param(Transform(w=800, h=300, fit="fill"), (400, 150), id="fill-no-enlarge"),
        pytest.param(Transform(w=1, h=1, fit="cover"), (1, 1), id="tiny"),
    ],
)
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_transform_sizes(fmt: str, transform: Transform, size: tuple[int, int]) -> None:
    data = encode(photo(400, 300), PIL_NAMES[fmt])
    result = sanitize_raster(data, LIMITS, transform)
    assert (result.width, result.height) == size
    assert assert_pixels_only(result).size == size


def test_cover_crops_the_centre() -> None:
    image = Image.new("RGB", (400, 300), "white")
    image.paste((0, 0, 0), (150, 100, 250, 200))
    result = sanitize_raster(encode(image, "PNG"), LIMITS, Transform(w=100, h=100, fit="cover"))
    out = Image.open(io.BytesIO(result.body)).convert("RGB")
    assert out.size == (100, 100)
    assert out.getpixel((50, 50)) == (0, 0, 0)
    assert min(out.getpixel((2, 50))) > 240  # the crop is 300x300 around the centre
    assert out.getpixel((2, 2))[0] > 240


def test_fill_stretches() -> None:
    image = Image.new("RGB", (200, 200), "white")
    image.paste((0, 0, 0), (0, 0, 100, 200))  # left half black
    result = sanitize_raster(encode(image, "PNG"), LIMITS, Transform(w=100, h=40, fit="fill"))
    out = Image.open(io.BytesIO(result.body)).convert("L")
    assert out.size == (100, 40)
    assert out.getpixel((10, 20)) < 10 and out.getpixel((90, 20)) > 245


@pytest.mark.parametrize("source", ["jpeg", "png", "gif", "webp", "avif"])
@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif", "gif"])
def test_format_conversion(source: str, fmt: str) -> None:
    data = encode(photo(48, 32), PIL_NAMES[source])
    result = sanitize_raster(data, LIMITS, Transform(fmt=fmt))
    image = assert_pixels_only(result)
    assert result.format == fmt and result.source_format == source
    assert image.format == PIL_NAMES[fmt]
    assert result.content_type == CONTENT_TYPES[fmt]
    assert image.size == (48, 32)
    if fmt == "gif":
        assert image.mode == "P"


def test_jpeg_output_composites_alpha_onto_white() -> None:
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 10, 20))
    result = sanitize_raster(encode(image, "PNG"), LIMITS, Transform(fmt="jpeg"))
    out = Image.open(io.BytesIO(result.body)).convert("RGB")
    assert min(out.getpixel((15, 10))) > 245  # transparent -> white
    assert out.getpixel((3, 10))[2] > 200 and out.getpixel((3, 10))[0] < 40


def test_transparency_is_kept_where_the_format_has_it() -> None:
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    image.paste((0, 200, 0, 255), (0, 0, 10, 20))
    data = encode(image, "PNG")
    for fmt in ("png", "webp", "gif", "avif"):
        out = Image.open(io.BytesIO(sanitize_raster(data, LIMITS, Transform(fmt=fmt)).body)).convert("RGBA")
        assert out.getpixel((15, 10))[3] == 0, fmt
        assert out.getpixel((3, 10))[3] == 255, fmt


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_quality_changes_the_size(fmt: str) -> None:
    data = encode(photo(160, 120), "PNG")
    low = sanitize_raster(data, LIMITS, Transform(fmt=fmt, q=10))
    high = sanitize_raster(data, LIMITS, Transform(fmt=fmt, q=95))
    assert len(low.body) < len(high.body)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif", "gif"])
def test_deterministic_output(fmt: str) -> None:
    data = encode(photo(120, 90), "JPEG", quality=95)
    first = sanitize_raster(data, LIMITS, Transform(w=100, fmt=fmt))
    second = sanitize_raster(data, LIMITS, Transform(w=100, fmt=fmt))
    assert first.body == second.body


def test_deterministic_animation_across_seconds() -> None:
    """Animated AVIF carries clock times in its boxes: they must not reach the output."""
    data = animated_gif()
    outputs = {}
    for fmt in ("gif", "png", "webp", "avif"):
        outputs[fmt] = sanitize_raster(data, LIMITS, Transform(fmt=fmt)).body
    time.sleep(1.1)
    for fmt, body in outputs.items():
        assert sanitize_raster(data, LIMITS, Transform(fmt=fmt)).body == body, fmt


def oriented_jpeg(orientation: int, size: tuple[int, int] = (40, 20)) -> bytes:
    image = Image.new("RGB", size, (220, 20, 20))  # red
    image.paste((20, 20, 220), (0, size[1] // 2, size[0], size[1]))  # bottom half blue
    image.paste((20, 200, 20), (0, 0, size[0] // 4, size[1] // 2))  # a green corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "<script>alert(1)</script>"
    return encode(image, "JPEG", exif=exif, quality=95)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_dropped(orientation: int) -> None:
    data = oriented_jpeg(orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    result = sanitize_raster(data, LIMITS)
    out = assert_pixels_only(result).convert("RGB")
    assert out.size == expected.size
    for point in ((2, 2), (out.width - 3, 2), (2, out.height - 3), (out.width - 3, out.height - 3)):
        pairs = zip(out.getpixel(point), expected.getpixel(point), strict=True)
        assert all(abs(a - b) < 40 for a, b in pairs)
    assert b"<script" not in result.body


def test_orientation_with_downscale_uses_the_displayed_size() -> None:
    data = oriented_jpeg(6, (800, 400))  # stored landscape, displayed portrait
    result = sanitize_raster(data, LIMITS, Transform(w=100))
    assert (result.width, result.height) == (100, 200)
    out = assert_pixels_only(result).convert("RGB")
    # Orientation 6: the stored top (red) is displayed on the right.
    assert out.getpixel((90, 150))[0] > 150 and out.getpixel((10, 150))[2] > 150


def test_jpeg_draft_downscale_keeps_the_picture() -> None:
    source = photo(2000, 1500)
    data = encode(source, "JPEG", quality=90)
    result = sanitize_raster(data, LIMITS, Transform(w=320))
    assert (result.width, result.height) == (320, 240)
    out = Image.open(io.BytesIO(result.body)).convert("RGB")
    reference = source.resize((320, 240), Image.Resampling.LANCZOS)
    diff = [abs(a - b) for a, b in zip(out.tobytes(), reference.tobytes(), strict=True)]
    assert sum(diff) / len(diff) < 8  # mean absolute error per channel (of 255)


def test_icc_profile_is_converted_to_srgb_and_dropped() -> None:
    pixels = photo(32, 32)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for fmt in ("JPEG", "PNG", "WEBP"):
        result = sanitize_raster(encode(pixels, fmt, icc_profile=srgb), LIMITS)
        assert "icc_profile" not in assert_pixels_only(result).info
    broken = encode(pixels, "PNG", icc_profile=b"not an icc profile at all")
    assert_pixels_only(sanitize_raster(broken, LIMITS))


def test_cmyk_jpeg_becomes_rgb() -> None:
    result = sanitize_raster(encode(photo(32, 32, "CMYK"), "JPEG"), LIMITS)
    assert assert_pixels_only(result).mode == "RGB"


def test_sixteen_bit_grey() -> None:
    image = Image.new("I;16", (8, 8), 32768)
    data = encode(image, "PNG")
    assert (
        sanitize_raster(data, LIMITS).body
        and Image.open(io.BytesIO(sanitize_raster(data, LIMITS).body)).mode == "I;16"
    )
    jpeg = Image.open(io.BytesIO(sanitize_raster(data, LIMITS, Transform(fmt="jpeg")).body))
    assert jpeg.mode == "L" and abs(jpeg.getpixel((4, 4)) - 128) <= 2  # scaled, not clipped to 255


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"w": 0}, id="w-zero"),
        pytest.param({"h": -5}, id="h-negative"),
        pytest.param({"q": 101}, id="q-too-high"),
        pytest.param({"q": 0}, id="q-zero"),
        pytest.param({"w": True}, id="w-bool"),
        pytest.param({"fit": "stretch"}, id="unknown-fit"),
        pytest.param({"fmt": "bmp"}, id="unknown-fmt"),
        pytest.param({"fmt": "svg"}, id="svg-fmt"),
    ],
)
def test_bad_transforms_are_bad_requests(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as caught:
        Transform(**kwargs)
    assert caught.value.reason == "bad_param_value"


# ---------------------------------------------------------------------------
# Animation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gif", "png", "webp", "avif"])
def test_animated_gif_keeps_frames_and_durations(fmt: str) -> None:
    data = animated_gif()
    result = sanitize_raster(data, LIMITS, Transform(fmt=fmt))
    assert result.frames == 4
    assert_pixels_only(result)
    assert [duration for _, duration in frames_of(result.body)] == [100, 200, 300, 400]
    if fmt in ("gif", "png", "webp"):
        with Image.open(io.BytesIO(result.body)) as image:
            assert image.info.get("loop") == 0


def test_animated_gif_to_jpeg_takes_the_first_frame() -> None:
    result = sanitize_raster(animated_gif(), LIMITS, Transform(fmt="jpeg"))
    assert result.frames == 1 and result.format == "jpeg"


def test_transform_applies_to_every_frame() -> None:
    result = sanitize_raster(animated_gif((64, 64)), LIMITS, Transform(w=16))
    frames = frames_of(result.body)
    assert len(frames) == 4
    assert {frame.size for frame, _ in frames} == {(16, 16)}


@pytest.mark.parametrize("fmt", ["gif", "png"])
def test_disposal_keeps_what_is_displayed(fmt: str) -> None:
    """Frames on a transparent background that must be cleared between frames (disposal 2)."""
    data = animated_gif(transparent=True)
    expected = frames_of(data)
    result = sanitize_raster(data, LIMITS, Transform(fmt=fmt))
    got = frames_of(result.body)
    assert len(got) == len(expected)
    for (want, want_ms), (have, have_ms) in zip(expected, got, strict=True):
        assert visible(want).tobytes() == visible(have).tobytes()
        assert want_ms == have_ms


def gif_frame(size: tuple[int, int], colour: int) -> tuple[bytes, bytes]:
    """(image descriptor + data, global palette) of a one-colour GIF made by Pillow."""
    image = Image.new("P", size, colour)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    data = encode(image, "GIF", optimize=False)
    return data[data.index(b"\x2c") : -1], data[13 : 13 + 768]


def test_a_gif_frame_that_grows_the_canvas_is_clipped() -> None:
    first, palette = gif_frame((10, 10), 1)
    second, _ = gif_frame((20, 20), 2)
    control = b"\x21\xf9\x04\x00\x0a\x00\x00\x00"
    data = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0xF7, 0, 0) + palette
    data += control + first + control + second + b";"
    with Image.open(io.BytesIO(data)) as image:
        image.seek(1)
        assert image.size == (20, 20)  # Pillow grows the canvas at frame 1
    for fmt in ("gif", "webp", "png"):
        result = sanitize_raster(data, LIMITS, Transform(fmt=fmt))
        assert (result.width, result.height, result.frames) == (10, 10, 2)
        assert_pixels_only(result)


def test_mpo_serves_its_first_image() -> None:
    first, second = photo(100, 80), photo(100, 80).rotate(180)
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    result = sanitize_raster(data, LIMITS, Transform(w=50))
    assert (result.format, result.width, result.height, result.frames) == ("jpeg", 50, 40, 1)
    assert_pixels_only(result)


def test_concurrent_calls_give_the_same_bytes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (encode(photo(300, 200), "JPEG"), Transform(w=120)),
        (encode(photo(120, 90), "PNG"), Transform(fmt="webp")),
        (animated_gif(), Transform(w=16, fmt="png")),
        (encode(photo(64, 64), "WEBP"), Transform(fmt="avif")),
    ] * 3
    expected = [sanitize_raster(data, LIMITS, transform).body for data, transform in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: sanitize_raster(job[0], LIMITS, job[1]).body, jobs))
    assert got == expected


def test_animated_webp_and_apng_round_trip() -> None:
    frames = [photo(32, 24).rotate(angle) for angle in (0, 90, 180)]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=[50, 60, 70], loop=3)
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=[50, 60, 70], loop=3)
    for data, fmt in ((webp, "webp"), (apng, "png")):
        result = sanitize_raster(data, LIMITS)
        assert result.format == fmt and result.frames == 3
        assert [ms for _, ms in frames_of(result.body)] == [50, 60, 70]
        with Image.open(io.BytesIO(result.body)) as image:
            assert image.info["loop"] == 3


# ---------------------------------------------------------------------------
# The shared corpus
# ---------------------------------------------------------------------------

ACCEPT, REFUSE, SNIFF_REFUSE, EITHER = "accept", "refuse", "sniff-refuse", "either"
NOT_RASTER = {".json", ".md", ".txt", ".svg", ".xml", ".xsl", ".dtd", ".xxe", ".svgz", ".toml", ".upstream"}

#: pillow-tests-images/manifest.json "expectations_by_folder", as rules.
PILLOW_FOLDER_RULES = {
    "bombs": REFUSE,  # before allocation; any limit reason
    "crash": SNIFF_REFUSE,
    "timeout": SNIFF_REFUSE,
    "format-allowlist": SNIFF_REFUSE,
    "bmp-bad": SNIFF_REFUSE,  # BMP is not on the allowlist
    "metadata": ACCEPT,  # and stripped
    "controls": ACCEPT,  # the allowed ones; BMP/ICO/TIFF below
    "truncated-corrupt": EITHER,  # truncated ones refused, see below
}
SPECIFIC_RULES = {
    "pillow-tests-images/controls/hopper.bmp": SNIFF_REFUSE,
    "pillow-tests-images/controls/hopper.ico": SNIFF_REFUSE,
    "pillow-tests-images/controls/hopper.tif": SNIFF_REFUSE,
    "pillow-tests-images/truncated-corrupt/truncated_image.png": REFUSE,
    "pillow-tests-images/truncated-corrupt/truncated_jpeg.jpg": REFUSE,
    "pillow-tests-images/truncated-corrupt/truncated_end_chunk.png": REFUSE,
    "pillow-tests-images/truncated-corrupt/broken_data_stream.png": REFUSE,
    "pillow-tests-images/truncated-corrupt/hopper_idat_after_image_end.png": ACCEPT,
    "pngsuite/corrupt/xcsn0g01.png": ACCEPT,  # wrong IDAT CRC but decodes: re-encoded
    "image-png-bugfixes/x_interlaced_chck.png": ACCEPT,
    "image-png-bugfixes/cicp_pq.png": EITHER,
    "payloadsallthethings/image-metadata/CVE-2021-22204_exiftool_echo.jpg": SNIFF_REFUSE,  # DjVu
    "h5sc-html5sec/attachments/test.gif": ACCEPT,  # a JPEG; served as what it is
}
#: Sets whose payload strings must be gone from the output (metadata, not pixels).
STRIP_PAYLOADS = ("payloadsallthethings/image-metadata/", "payloadsallthethings/imagemagick-delegates/")
#: Payloads carried by the pixels / entropy-coded data, built to survive re-encoding: the
#: *-xss-ecs.jpeg pair is a fixed point of libjpeg at quality 85 (our default), like the
#: pixel-payload set. Their defence is the served type (see the test below), not byte absence.
PIXEL_BORNE = (
    "payloadsallthethings/image-pixel-payload/",
    "payloadsallthethings/image-metadata/mouseover-xss-ecs.jpeg",
    "payloadsallthethings/image-metadata/onclick-xss-ecs.jpeg",
)


def corpus_files() -> list[str]:
    if not CORPUS.is_dir():
        return ["<corpus absent>"]
    manifest = json.loads((CORPUS / "pillow-tests-images" / "manifest.json").read_text())
    files = [f"pillow-tests-images/{name}" for name in manifest["files"]]
    for pattern in (
        "pngsuite/valid/*.png",
        "pngsuite/corrupt/*.png",
        "image-png-bugfixes/*.png",
        "payloadsallthethings/image-metadata/*",
        "payloadsallthethings/image-pixel-payload/*",
        "payloadsallthethings/imagemagick-delegates/*",
        "payloadsallthethings/format-confusion/*",
        "h5sc-html5sec/attachments/test.gif",
    ):
        files += [
            path.relative_to(CORPUS).as_posix()
            for path in sorted(CORPUS.glob(pattern))
            if path.suffix not in NOT_RASTER
        ]
    return sorted(set(files))


def expectation(relative: str) -> str:
    if relative in SPECIFIC_RULES:
        return SPECIFIC_RULES[relative]
    parts = relative.split("/")
    if parts[0] == "pillow-tests-images":
        rule = PILLOW_FOLDER_RULES[parts[1]]
        if parts[1] == "truncated-corrupt" and Path(relative).suffix in (".psd", ".tif", ".ppm", ".bin"):
            return SNIFF_REFUSE
        return rule
    if parts[0] == "pngsuite":
        return ACCEPT if parts[1] == "valid" else REFUSE
    if parts[0] == "image-png-bugfixes":
        return REFUSE if parts[1].startswith("x_") else ACCEPT
    if relative.startswith("payloadsallthethings/format-confusion/"):
        return SNIFF_REFUSE
    if relative.startswith("payloadsallthethings/imagemagick-delegates/"):
        return ACCEPT if relative.endswith(".png") else SNIFF_REFUSE
    return ACCEPT  # image-metadata, image-pixel-payload


@pytest.mark.corpus
def test_corpus_manifest_folders_all_have_a_rule(corpus_dir: Path) -> None:
    manifest = json.loads((corpus_dir / "pillow-tests-images" / "manifest.json").read_text())
    assert set(manifest["expectations_by_folder"]) == set(PILLOW_FOLDER_RULES)


@pytest.mark.corpus
@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Invalid APNG:UserWarning")
@pytest.mark.parametrize("relative", corpus_files())
def test_corpus_file(corpus_dir: Path, relative: str) -> None:
    data = (corpus_dir / relative).read_bytes()
    rule = expectation(relative)
    result = outcome(data)
    if isinstance(result, InvalidImage):
        assert rule in (REFUSE, SNIFF_REFUSE, EITHER), f"refused ({result.reason}: {result.original_error!r})"
        assert result.reason in RASTER_REASONS
        if rule == SNIFF_REFUSE:
            assert result.reason in ("not_image", "format_not_allowed")
            assert result.original_error is None  # no decoder ran
        return
    assert rule in (ACCEPT, EITHER), "accepted a file that must be refused"
    assert_pixels_only(result)  # (a clean PNG at zlib level 6 can be its own re-encode)
    assert result.source_format == sniff(data)
    if (relative.startswith(STRIP_PAYLOADS) or "/metadata/" in relative) and not relative.startswith(
        PIXEL_BORNE
    ):
        for payload in (*PAYLOADS, b"/etc/passwd", b"Exif", b"Photoshop 3.0", b"http://ns.adobe.com"):
            assert payload not in result.body, payload
    if relative == "h5sc-html5sec/attachments/test.gif":
        assert result.format == "jpeg" and b"Content-Type:multipart" not in result.body


@pytest.mark.corpus
def test_corpus_extents_bomb_is_refused(corpus_dir: Path) -> None:
    data = (corpus_dir / "pillow-tests-images/bombs/decompression_bomb_extents.gif").read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (100, 100)  # what a first-frame-only check would see
    error = refused(data)
    assert error.reason in ("side_too_large", "too_many_pixels")


@pytest.mark.corpus
@pytest.mark.parametrize("relative", [p.rstrip("/") for p in PIXEL_BORNE])
def test_corpus_pixel_payloads_are_served_as_their_type(corpus_dir: Path, relative: str) -> None:
    """Re-encoding may keep pixel-borne bytes; what makes them harmless is the type (with nosniff)."""
    target = corpus_dir / relative
    for path in sorted(target.iterdir()) if target.is_dir() else [target]:
        result = sanitize_raster(path.read_bytes(), LIMITS)
        assert result.content_type == CONTENT_TYPES[result.format] == f"image/{result.format}"
        assert result.format == result.source_format
        assert sniff(result.body) == result.format


@pytest.mark.corpus
def test_corpus_ecs_payload_is_a_fixed_point_of_quality_85(corpus_dir: Path) -> None:
    """Why the ECS pair is pixel-borne: the scan survives q=85 byte for byte, not q=75."""
    data = (corpus_dir / "payloadsallthethings/image-metadata/mouseover-xss-ecs.jpeg").read_bytes()
    assert b"ONmouseOVER" in sanitize_raster(data, LIMITS).body
    assert b"ONmouseOVER" not in sanitize_raster(data, LIMITS, Transform(q=75)).body


@pytest.mark.corpus
def test_corpus_display_p3_profile_is_converted_to_srgb(corpus_dir: Path) -> None:
    """A wide-gamut profile changes the pixel values; the profile itself is not served."""
    with Image.open(corpus_dir / "image-png-bugfixes/broken_iccp.png") as source:
        p3 = source.info["icc_profile"]
    assert b"Display P3" in p3 or b"D\x00i\x00s\x00p" in p3
    colour = (200, 100, 50)
    data = encode(Image.new("RGB", (8, 8), colour), "PNG", icc_profile=p3)
    result = sanitize_raster(data, LIMITS)
    out = assert_pixels_only(result).convert("RGB").getpixel((4, 4))
    source_profile = ImageCms.ImageCmsProfile(io.BytesIO(p3))
    srgb = ImageCms.createProfile("sRGB")
    reference = ImageCms.profileToProfile(Image.new("RGB", (1, 1), colour), source_profile, srgb)
    assert reference is not None
    expected = reference.getpixel((0, 0))
    assert out == expected
    assert max(abs(a - b) for a, b in zip(out, colour, strict=True)) >= 5
