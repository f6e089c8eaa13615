"""Sanitize SVG documents: parse safely, rebuild from an allowlist, serialise.

Use :func:`sanitize_svg` on every SVG body before it is cached or served
(DESIGN §5). What it returns is a *new document* written from the allowlisted
parts of the input (:mod:`imageguard.svg_policy`); nothing of the input is
passed through that was not looked at and kept on purpose.

The order of work is the defence:

1. Size limit (``too_large``), before any parsing.
2. defusedxml's expat parser with entity declarations and external references
   forbidden (``svg_entities_forbidden``). A DOCTYPE without an internal subset
   (Inkscape and Illustrator write ``<!DOCTYPE svg PUBLIC ...>``) is accepted
   and dropped; its DTD is never fetched. A DOCTYPE with an internal subset is
   refused (``svg_dtd_forbidden``): besides entities, an ``ATTLIST`` there could
   give elements default attributes. The parser decides the encoding (UTF-8,
   UTF-16 with BOM, a declared single-byte charset); bytes are never filtered.
   Not well-formed XML is refused (``svg_malformed``), never repaired.
3. The document is rebuilt *while it is parsed*: each parser event is checked
   against the allowlists and, if kept, written to the output. Element count
   (``svg_too_many_nodes``) and nesting depth (``svg_too_deep``) are counted on
   the input as it streams, so a hostile document stops the parser early.
4. ``<use>`` references are checked on the rebuilt document: count, chain
   length, cycles and the number of elements they would instantiate
   (``svg_use_limit``). These are renderer denial-of-service guards, so the
   whole document is refused rather than trimmed. CSS that needs the full
   tokenizer is bounded too (``svg_css_limit``), as it is the slowest part.

What is dropped (each with a reason code in :attr:`SanitizedSvg.removed`):

- elements of any namespace but SVG, and unknown SVG elements, with their
  content: ``script`` (``svg_script_removed``), ``foreignObject``,
  ``handler``/``listener``, SVG fonts, ``metadata``... (``svg_element_removed``);
- ``<a>`` is unwrapped: its children stay, the link goes; ``title``, ``desc``
  and ``style`` keep text only (their child elements go);
- every attribute whose local name starts with ``on`` in any case and any
  namespace (``svg_event_handler_removed``), attributes not on the allowlist
  and attributes of other namespaces (``svg_attribute_removed``); XLink is
  kept for ``href`` only and written as ``xlink:href``, ``xml:`` for ``lang``
  and ``space`` only;
- URLs (``svg_url_removed``): ``href``/``xlink:href`` may only be a
  same-document ``#id`` (on the elements that take a reference), or, on
  ``image``/``feImage``, a ``data:image/{png,jpeg,gif,webp};base64`` URL whose
  payload goes through :func:`~imageguard.raster.sanitize_raster`
  (``svg_data_image_removed`` when it fails or ``data_images`` is off).
  Whitespace and control characters are removed before deciding, so
  ``java&#9;script:`` or a padded ``#id`` are judged as a browser would; anything that
  does not *start* with ``#`` or ``data:`` is gone, which covers every scheme,
  protocol-relative and relative URL and their percent-encodings. In
  attribute values that CSS parses (``fill``, ``stroke``, ``filter``,
  ``clip-path``, ``mask``, ``marker-*``, ``cursor``) only ``url(#id)`` may
  appear; in every other attribute, any ``url(`` that does not point to
  ``#``, and ``javascript:``, ``vbscript:`` or ``data:`` anywhere, drop the
  attribute;
- CSS (``svg_css_removed``): ``<style>`` and ``style=""`` are tokenised with
  tinycss2 and rebuilt from allowed properties whose values hold only
  allowed tokens and functions; every at-rule (``@import``, ``@font-face``,
  ``@media``, ``@namespace``, ...) is dropped; selectors are kept only when
  made of type, class, id, attribute and simple pseudo-class parts;
- animation (``svg_animation_removed``): ``animate``, ``set``,
  ``animateTransform`` and ``animateMotion`` are dropped whole when they
  target anything but a drawing attribute (never ``href``, ``on*``, ``style``,
  ``id``, ``class`` or a namespaced name) or when ``values``/``from``/``to``/
  ``by`` hold ``url(``, a scheme (``:``) or a CSS escape;
- comments (``svg_comment_removed``), processing instructions including
  ``<?xml-stylesheet?>`` (``svg_pi_removed``), the DOCTYPE
  (``svg_doctype_removed``).

The output is UTF-8 XML without an XML declaration or DOCTYPE, with the SVG
namespace as the default namespace on the root ``<svg>`` and ``xmlns:xlink``
declared there when an ``xlink:href`` is kept. Text is escaped (``&``, ``<``,
``>``), so CDATA content comes out as text and stays text when a browser parses
the SVG as inline SVG in HTML. Attributes keep their input order. The result
is deterministic and idempotent: sanitising the output again gives the same
bytes (lossy ``data:`` images are re-encoded as PNG for that reason).

A root ``<svg>`` element without a namespace (an SVG fragment written for
inline HTML, such as ``<svg viewBox=...>`` with no ``xmlns``) is refused
(``svg_not_svg``) unless :attr:`SvgLimits.accept_unnamespaced` is set; then
its un-namespaced elements are read as SVG elements, as the browser's HTML
parser reads inline SVG, and the output carries the SVG namespace.

Nothing is ever fetched. Only :class:`~imageguard.errors.InvalidImage`
escapes; its reasons are listed under :func:`sanitize_svg`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import tinycss2  # type: ignore[import-untyped,unused-ignore]
import tinycss2.ast  # type: ignore[import-untyped,unused-ignore]
from defusedxml.common import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from . import svg_policy
from .errors import InvalidImage
from .raster import RasterLimits, Transform, sanitize_raster, sniff

__all__ = ["CONTENT_TYPE", "SVG_NS", "XLINK_NS", "SanitizedSvg", "SvgLimits", "clear_caches", "sanitize_svg"]

#: The SVG namespace; the root of every accepted document is ``svg`` in it.
SVG_NS: Final = svg_policy.SVG_NS
#: The XLink namespace; only ``xlink:href`` is kept from it.
XLINK_NS: Final = svg_policy.XLINK_NS

#: Content type of every sanitized SVG.
CONTENT_TYPE: Final = "image/svg+xml"

_MESSAGES: Final = {
    "too_large": "SVG exceeds the size limit",
    "svg_malformed": "SVG is not well-formed XML",
    "svg_entities_forbidden": "SVG declares entities or references external entities",
    "svg_dtd_forbidden": "SVG has a DOCTYPE with an internal subset",
    "svg_not_svg": "document root is not an SVG <svg> element",
    "svg_too_many_nodes": "SVG has too many elements",
    "svg_too_deep": "SVG elements are nested too deeply",
    "svg_use_limit": "SVG <use> references exceed the limits (count, chain length, cycle or expansion)",
    "svg_css_limit": "SVG holds more CSS than the limit",
}


@dataclass(frozen=True, slots=True)
class SvgLimits:
    """Limits for :func:`sanitize_svg`.

    :param max_bytes: largest input, and largest output (``IMAGEGUARD_MAX_SVG_BYTES``).
    :param max_nodes: most elements in the input, in any namespace
        (``IMAGEGUARD_SVG_MAX_NODES``).
    :param max_depth: deepest element nesting (the root is depth 1). 64 is far
        beyond what editors write (Inkscape layers and groups rarely pass 20)
        and keeps renderers' recursive layout well inside their stacks.
    :param max_use: most ``<use>`` elements in the output.
    :param max_use_depth: longest chain of ``<use>`` instantiations: a
        ``<use>`` whose target is or contains another ``<use>`` adds one. The
        US flag built from nested stars needs 4.
    :param max_use_expansion: most elements all ``<use>`` references together
        would instantiate, counting nested references (an over-estimate).
        Bounds the exponential fan-out of "billion laughs" built from ``<use>``.
    :param max_css_bytes: most characters of CSS that need the full CSS
        tokenizer in one document: ``<style>`` sheets, and ``style``/paint
        attribute values that are more than plain ``name:value`` keywords,
        numbers, colours, font names and ``url(#id)``. tinycss2 reads about
        0.3 MB/s, so this bounds the time a CSS-heavy document can cost
        (about a second).
    :param data_images: keep ``data:image/{png,jpeg,gif,webp};base64`` hrefs on
        ``image``/``feImage`` (re-encoded) instead of dropping them.
    :param accept_unnamespaced: accept a root ``<svg>`` without a namespace (an
        SVG fragment written for inline HTML, like ``<svg viewBox=...>`` with
        no ``xmlns``): its un-namespaced elements are read as SVG elements, as
        a browser's HTML parser reads inline SVG, and the output carries the
        SVG namespace. Off by default: DESIGN §5 requires the SVG-namespace
        root, and a browser does not render such a document as SVG either.
    :param raster: limits for those embedded images.

    .. versionadded:: 0.1
    """

    max_bytes: int = 2 * 1024 * 1024
    max_nodes: int = 20_000
    max_depth: int = 64
    max_use: int = 256
    max_use_depth: int = 4
    max_use_expansion: int = 100_000
    max_css_bytes: int = 256 * 1024
    data_images: bool = True
    accept_unnamespaced: bool = False
    raster: RasterLimits = RasterLimits()  # noqa: RUF009 - frozen, so one shared default is safe


@dataclass(frozen=True, slots=True)
class SanitizedSvg:
    """A document rebuilt by :func:`sanitize_svg`.

    .. versionadded:: 0.1
    """

    #: UTF-8 XML, no XML declaration, no DOCTYPE, root ``<svg xmlns="http://www.w3.org/2000/svg">``.
    body: bytes
    #: Always ``image/svg+xml``.
    content_type: str
    #: Reason codes of what was removed, deduplicated and sorted (empty if nothing was).
    removed: tuple[str, ...]


class _Refused(Exception):
    """Raised inside parser callbacks to stop parsing; becomes :class:`InvalidImage`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------
# Precomputed tables (expat reports names as "namespace}local", attributes
# without a namespace as "local"; these tables use that form directly)
# --------------------------------------------------------------------------

_SVG_PREFIX: Final = SVG_NS + "}"

# Element kinds.
_NORMAL: Final = 0
_UNWRAP: Final = 1
_TEXT: Final = 2  # title, desc: text only
_STYLE: Final = 3  # text only, rebuilt as CSS
_ANIMATION: Final = 4


def _element_kind(local: str) -> int:
    if local in svg_policy.UNWRAPPED_ELEMENTS:
        return _UNWRAP
    if local == "style":
        return _STYLE
    if local in svg_policy.TEXT_ONLY_ELEMENTS:
        return _TEXT
    if local in svg_policy.ANIMATION_ELEMENTS:
        return _ANIMATION
    return _NORMAL


# name as expat reports it -> (local name, kind)
_SVG_ELEMENTS: Final[dict[str, tuple[str, int]]] = {
    _SVG_PREFIX + local: (local, _element_kind(local)) for local in svg_policy.ELEMENTS
}
# For a root <svg> without namespace: un-namespaced names count as SVG too.
_SVG_AND_BARE_ELEMENTS: Final[dict[str, tuple[str, int]]] = {
    **_SVG_ELEMENTS,
    **{local: (local, _element_kind(local)) for local in svg_policy.ELEMENTS},
}

# Attribute kinds.
_PLAIN: Final = 0  # inert text; checked for schemes and url(
_PAINT: Final = 1  # CSS value that may hold url(): only url(#id)
_STYLE_ATTR: Final = 2
_HREF: Final = 3
_ID: Final = 4

# Presentation attributes whose CSS value can load a resource through url().
_URL_PROPERTIES: Final = frozenset(
    {"fill", "stroke", "clip-path", "mask", "filter", "marker-start", "marker-mid", "marker-end", "cursor"}
)


def _expat_name(name: str) -> str:
    return name[1:] if name.startswith("{") else name


def _attribute_kind(name: str) -> int:
    if name in ("href", "{" + XLINK_NS + "}href"):
        return _HREF
    if name == "style":
        return _STYLE_ATTR
    if name == "id":
        return _ID
    if name in _URL_PROPERTIES:
        return _PAINT
    return _PLAIN


# name as expat reports it -> (name as written in the output, kind)
_ATTRIBUTES: Final[dict[str, tuple[str, int]]] = {
    _expat_name(name): (
        name.replace("{" + XLINK_NS + "}", "xlink:").replace("{" + svg_policy.XML_NS + "}", "xml:"),
        _attribute_kind(name),
    )
    for name in svg_policy.ATTRIBUTES
}

_DATA_IMAGE_ELEMENTS: Final = svg_policy.DATA_IMAGE_ELEMENTS
_HREF_ELEMENTS: Final = svg_policy.HREF_ELEMENTS
_ANIMATABLE: Final = svg_policy.ANIMATABLE_ATTRIBUTES

# ASCII whitespace, C0 controls and DEL: browsers strip or ignore them inside
# URL schemes ("java\tscript:"), so they are removed before any URL decision.
_STRIP_CONTROLS: Final = {c: None for c in (*range(0x21), 0x7F)}

_ASCII_WHITESPACE: Final = " \t\n\r\f"
_TAB_NEWLINE: Final = {ord("\t"): None, ord("\n"): None, ord("\r"): None}

# Attribute values that hold one of these (after _STRIP_CONTROLS and lower-
# casing) are dropped whatever the attribute: nothing legitimate in a drawing
# attribute names a script scheme or a data: URL (data: images are only
# accepted, separately, in href).
_BAD_SUBSTRINGS: Final = ("javascript:", "vbscript:", "livescript:", "mocha:", "data:")

# A same-document reference: "#" and an XML NCName-like id (no ":"; letters,
# digits, "_", "-", "." in any script).
_FRAGMENT_ID: Final = re.compile(r"[\w.\-]{1,256}")
_URL_FRAGMENT: Final = re.compile(
    r"""[ \t\n\r\f]*url\([ \t\n\r\f]*(["']?)#(?P<id>[\w.\-]{1,256})\1[ \t\n\r\f]*\)[ \t\n\r\f]*"""
)
_DATA_IMAGE: Final = re.compile(r"data:(image/(?:png|jpeg|gif|webp));base64,", re.IGNORECASE)
_CSS_ESCAPE: Final = re.compile(r"\\(?:([0-9a-fA-F]{1,6})[ \t\r\n\f]?|(.))", re.DOTALL)
# A paint value kept without parsing: keywords, numbers and #colours only.
_PLAIN_PAINT: Final = re.compile(r"[\w#%., \-]*", re.ASCII)
_ATTR_SPECIALS: Final = re.compile(r'[&<>"\t\n\r]')
# Characters without which a value can hold no scheme, url( or escape of one.
_URL_SUSPECT: Final = re.compile(r"[:(&\\]")
_SPECIALS: Final = re.compile(r'[:(&\\<>"\t\n\r]')
_TEXT_SPECIALS: Final = re.compile(r"[&<>\r]")

# Lossy formats are re-encoded losslessly: a second lossy encode would change
# the bytes, and sanitising must be idempotent (stable ETag, stable cache).
_DATA_IMAGE_OUTPUT: Final = {"png": "png", "gif": "gif", "jpeg": "png", "webp": "png"}


def _escape_attr(value: str) -> str:
    if _ATTR_SPECIALS.search(value) is None:
        return value
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )


def _escape_text(text: str) -> str:
    if _TEXT_SPECIALS.search(text) is None:
        return text
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _normalise(value: str) -> str:
    """What a URL decision looks at: no whitespace or control characters, lower case,
    and character references decoded once more (a value that reaches an HTML parser
    again, or a careless consumer, must not turn into a scheme then)."""
    if "&" in value:
        value = html.unescape(value)
    if "\\" in value:  # CSS escapes: u\72 l( is url( wherever CSS might read the value
        value = _CSS_ESCAPE.sub(_css_unescape, value)
    return value.translate(_STRIP_CONTROLS).lower()


def _css_unescape(match: re.Match[str]) -> str:
    hex_digits, char = match.group(1), match.group(2)
    if hex_digits:
        code = int(hex_digits, 16)
        return chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"
    return char


def _fragment(value: str) -> str | None:
    """``#id`` if ``value`` is a same-document reference, as a browser's URL parser reads it
    (leading/trailing ASCII whitespace stripped, tabs and newlines removed), else ``None``."""
    fragment = value.strip(_ASCII_WHITESPACE).translate(_TAB_NEWLINE)
    if fragment.startswith("#") and _FRAGMENT_ID.fullmatch(fragment, 1):
        return fragment
    return None


def _has_bad_url(value: str) -> bool:
    """True if ``value`` names a script/data scheme or a ``url(`` not pointing to ``#``."""
    return _bad_url_in_normalised(_normalise(value))


def _bad_url_in_normalised(norm: str) -> bool:
    if any(bad in norm for bad in _BAD_SUBSTRINGS):
        return True
    start = norm.find("url(")
    while start != -1:
        rest = norm[start + 4 : start + 6].lstrip("'\"")
        if not rest.startswith("#"):
            return True
        start = norm.find("url(", start + 4)
    return False


# --------------------------------------------------------------------------
# CSS
# --------------------------------------------------------------------------

# Rebuilt CSS holding one of these (after _normalise) is dropped, even inside
# a quoted font name or attribute selector where it could not act: the
# output must not look dangerous to any reviewer or scanner either.
_BAD_CSS_SUBSTRINGS: Final = ("@import", "expression(", "-moz-binding", "behavior:", "</style")


def _has_bad_css(text: str) -> bool:
    norm = _normalise(text)
    return _bad_url_in_normalised(norm) or any(bad in norm for bad in _BAD_CSS_SUBSTRINGS)


_VALUE_LITERALS: Final = frozenset({",", "/", "+", "-", "*", "%"})
_SELECTOR_LITERALS: Final = frozenset({".", ",", ">", "+", "~", "*", ":"})
_ATTRIBUTE_SELECTOR_LITERALS: Final = frozenset({"=", "~=", "|=", "^=", "$=", "*="})
_SIMPLE_TOKENS: Final = frozenset({"ident", "number", "percentage", "dimension", "hash", "string"})
# Properties whose values may hold quoted strings; elsewhere a string is
# meaningless in SVG and only carries payloads.
_STRING_PROPERTIES: Final = frozenset(
    {"font", "font-family", "font-feature-settings", "font-variation-settings"}
)
_CSS_REMOVED: Final = "svg_css_removed"
# Deepest function nesting in a CSS value or selector: calc(min(rgb(...)))
# needs 3; the bound keeps the recursive walk far from Python's stack limit.
_MAX_CSS_NESTING: Final = 16
_URL_REMOVED: Final = "svg_url_removed"


class _CssRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fragment_url(target: str) -> str:
    fragment = _fragment(target)
    if fragment is None:
        raise _CssRejected(_URL_REMOVED)
    return f"url({fragment})"


def _css_value(tokens: Iterable[tinycss2.ast.Node], strings: bool = False, depth: int = 0) -> str:
    """Serialise an allowed component value list; raise :class:`_CssRejected` otherwise.

    ``strings``: whether quoted strings may appear (font names, feature tags).
    """
    if depth > _MAX_CSS_NESTING:
        raise _CssRejected(_CSS_REMOVED)
    parts: list[str] = []
    for token in tokens:
        kind = token.type
        if kind in ("whitespace", "comment"):
            if parts and parts[-1] != " ":
                parts.append(" ")
        elif kind in _SIMPLE_TOKENS and (strings or kind != "string"):
            parts.append(token.serialize())
        elif kind == "literal" and token.value in _VALUE_LITERALS:
            parts.append(token.value)
        elif kind == "url":
            parts.append(_fragment_url(token.value))
        elif kind == "function":
            name = token.lower_name
            if name == "url":
                args = [a for a in token.arguments if a.type not in ("whitespace", "comment")]
                if len(args) != 1 or args[0].type != "string":
                    raise _CssRejected(_URL_REMOVED)
                parts.append(_fragment_url(args[0].value))
            elif name in svg_policy.CSS_FUNCTIONS:
                parts.append(f"{name}({_css_value(token.arguments, strings, depth + 1).strip()})")
            else:  # expression(), image(), image-set(), attr(), var(), ...
                raise _CssRejected(_CSS_REMOVED)
        else:  # blocks, at-keywords, unicode-range, CDO/CDC, bad tokens
            raise _CssRejected(_CSS_REMOVED)
    return "".join(parts).strip()


def _declarations(items: Sequence[Any], reasons: set[str]) -> str:
    kept: list[str] = []
    for item in items:
        if item.type != "declaration":
            if item.type not in ("whitespace", "comment"):
                reasons.add(_CSS_REMOVED)
            continue
        name = item.lower_name
        if name not in svg_policy.CSS_PROPERTIES:  # behavior, -moz-binding, content, --custom, ...
            reasons.add(_CSS_REMOVED)
            continue
        try:
            value = _css_value(item.value, name in _STRING_PROPERTIES)
        except _CssRejected as exc:
            reasons.add(exc.reason)
            continue
        if not value:
            reasons.add(_CSS_REMOVED)
            continue
        declaration = f"{name}:{value}{'!important' if item.important else ''}"
        # Rebuilt values hold only allowlisted names and url(#id): anything
        # suspicious can only hide in a quoted string or behind an escape.
        if ('"' in declaration or "\\" in declaration) and _has_bad_css(declaration):
            reasons.add(_URL_REMOVED)
            continue
        kept.append(declaration)
    return ";".join(kept)


def _selector_parts(tokens: Iterable[tinycss2.ast.Node], parts: list[str], depth: int) -> bool:
    if depth > _MAX_CSS_NESTING:
        return False
    nested = depth > 0
    for token in tokens:
        kind = token.type
        if kind in ("whitespace", "comment"):
            if parts and parts[-1] != " ":
                parts.append(" ")
        elif kind in ("ident", "hash"):
            parts.append(token.serialize())
        elif kind == "literal" and token.value in _SELECTOR_LITERALS:
            parts.append(token.value)
        elif kind in ("number", "dimension") and nested:  # :nth-child(2n+1)
            parts.append(token.serialize())
        elif kind == "literal" and nested and token.value == "-":
            parts.append("-")
        elif kind == "[] block":
            inner: list[str] = []
            for sub in token.content:
                if sub.type in ("ident", "string"):
                    inner.append(sub.serialize())
                elif sub.type == "literal" and sub.value in _ATTRIBUTE_SELECTOR_LITERALS:
                    inner.append(sub.value)
                elif sub.type not in ("whitespace", "comment"):
                    return False
            parts.append("[" + " ".join(inner) + "]")
        elif kind == "function" and token.lower_name in svg_policy.SELECTOR_FUNCTIONS:
            inner = []
            if not _selector_parts(token.arguments, inner, depth + 1):
                return False
            parts.append(f"{token.lower_name}({''.join(inner).strip()})")
        else:
            return False
    return True


def _selector(prelude: Iterable[tinycss2.ast.Node]) -> str | None:
    parts: list[str] = []
    if not _selector_parts(prelude, parts, 0):
        return None
    selector = "".join(parts).strip()
    # Escapes are legal CSS but nothing an editor writes; refusing them keeps
    # selectors readable for reviewers and for the independent checker.
    if not selector or "\\" in selector or ('"' in selector and _has_bad_css(selector)):
        return None
    return selector


def _sanitize_stylesheet(css: str) -> tuple[str, frozenset[str]]:
    """Rebuild a ``<style>`` sheet: qualified rules with simple selectors and allowed declarations."""
    reasons: set[str] = set()
    rules: list[str] = []
    for rule in tinycss2.parse_stylesheet(css, skip_comments=False, skip_whitespace=True):
        if rule.type == "comment":
            continue
        if rule.type != "qualified-rule":  # every at-rule (@import, @font-face, @media, ...) and errors
            reasons.add(_CSS_REMOVED)
            continue
        selector = _selector(rule.prelude)
        if selector is None:
            reasons.add(_CSS_REMOVED)
            continue
        body = _declarations(
            tinycss2.parse_blocks_contents(rule.content, skip_comments=False, skip_whitespace=True), reasons
        )
        if body:
            rules.append(f"{selector}{{{body}}}")
    return "\n".join(rules), frozenset(reasons)


# Style attributes as editors write them on every element ("fill:#fff;
# stroke:url(#g);font-family:'DejaVu Sans'") are rebuilt without tinycss2,
# which is much slower: each declaration must be a plain name and a value of
# keywords, numbers, lengths, #colours, simple quoted font names (font
# properties only) or one url(#id). Anything else (functions, escapes,
# comments, "!", other characters) goes to the full CSS path. Such values
# cannot hold a URL to another document, a scheme, an at-rule or a function.
_PLAIN_STYLE: Final = re.compile(r"""[\w#.,%\-:;'"() \t\n\r\f]*""", re.ASCII)
_PLAIN_NAME: Final = re.compile(r"-?[a-z][a-z\-]*")
_PLAIN_VALUE: Final = re.compile(r"""(?:[A-Za-z0-9#.,%\- \t\n\r\f]+|'[\w .,\-]*'|"[\w .,\-]*")+""", re.ASCII)
_PLAIN_STRING: Final = re.compile(r"'([\w .,\-]*)'|\"([\w .,\-]*)\"", re.ASCII)
_WHITESPACE_RUN: Final = re.compile(r"[ \t\n\r\f]+")
_NO_REASONS: Final[frozenset[str]] = frozenset()
_CSS_REMOVED_ONLY: Final = frozenset({"svg_css_removed"})


def _double_quoted(match: re.Match[str]) -> str:
    return '"' + (match.group(1) if match.group(1) is not None else match.group(2)) + '"'


def _plain_value(value: str) -> str:
    value = _WHITESPACE_RUN.sub(" ", value).strip(" ")
    if "'" in value:  # tinycss2 writes strings with double quotes; so do we
        value = _PLAIN_STRING.sub(_double_quoted, value)
    return value


def _plain_style_attribute(css: str) -> tuple[str, frozenset[str]] | None:
    """Rebuild a plain ``style`` attribute, or ``None`` if it needs the CSS parser."""
    kept: list[str] = []
    dropped = False
    for declaration in css.split(";"):
        name, colon, value = declaration.partition(":")
        name = name.strip(_ASCII_WHITESPACE).lower()
        if not colon:
            if name:
                return None  # a stray word: let the CSS parser decide what it means
            continue
        if not _PLAIN_NAME.fullmatch(name):
            return None
        fragment = _URL_FRAGMENT.fullmatch(value)
        if fragment is not None:
            value = f"url(#{fragment.group('id')})"
        elif _PLAIN_VALUE.fullmatch(value) and value.strip(_ASCII_WHITESPACE):
            if ('"' in value or "'" in value) and name not in _STRING_PROPERTIES:
                dropped = True  # as the CSS path does: a string is meaningless there
                continue
            value = _plain_value(value)
        else:
            return None
        if name in svg_policy.CSS_PROPERTIES:
            kept.append(f"{name}:{value}")
        else:
            dropped = True
    return ";".join(kept), _CSS_REMOVED_ONLY if dropped else _NO_REASONS


def _sanitize_style_attribute(css: str) -> tuple[str, frozenset[str]]:
    """Rebuild a ``style=""`` declaration list from allowed declarations (with tinycss2)."""
    reasons: set[str] = set()
    body = _declarations(
        tinycss2.parse_blocks_contents(css, skip_comments=False, skip_whitespace=True), reasons
    )
    return body, frozenset(reasons)


def _paint_value_reason(value: str) -> str | None:
    """``None`` if a URL-capable presentation attribute value is safe to keep verbatim."""
    try:
        _css_value(tinycss2.parse_component_value_list(value, skip_comments=False))
    except _CssRejected as exc:
        return exc.reason
    if _has_bad_url(value):
        return _URL_REMOVED
    return None


# Editors repeat the same style strings on thousands of elements, and the same
# sheet across files. Results of short inputs are cached (the cache holds at
# most _CACHE_ENTRIES x _CACHE_MAX_CHARS characters, whatever documents come).
_CACHE_ENTRIES: Final = 4096
_CACHE_MAX_CHARS: Final = 512
_stylesheet_cached = lru_cache(maxsize=_CACHE_ENTRIES // 8)(_sanitize_stylesheet)
_style_attribute_cached = lru_cache(maxsize=_CACHE_ENTRIES)(_sanitize_style_attribute)
_paint_value_cached = lru_cache(maxsize=_CACHE_ENTRIES)(_paint_value_reason)


def _stylesheet(css: str) -> tuple[str, frozenset[str]]:
    return _stylesheet_cached(css) if len(css) <= 8 * _CACHE_MAX_CHARS else _sanitize_stylesheet(css)


def _style_attribute(css: str) -> tuple[str, frozenset[str]]:
    return _style_attribute_cached(css) if len(css) <= _CACHE_MAX_CHARS else _sanitize_style_attribute(css)


def _paint_value(value: str) -> str | None:
    return _paint_value_cached(value) if len(value) <= _CACHE_MAX_CHARS else _paint_value_reason(value)


def clear_caches() -> None:
    """Forget cached CSS results (benchmarks measure cold runs with it).

    .. versionadded:: 0.1
    """
    _stylesheet_cached.cache_clear()
    _style_attribute_cached.cache_clear()
    _paint_value_cached.cache_clear()


# --------------------------------------------------------------------------
# The streaming rebuild
# --------------------------------------------------------------------------


class _Open:
    """One kept (or unwrapped) element whose end tag has not been seen yet."""

    __slots__ = ("count", "index", "kind", "local", "ref_id")

    def __init__(self, local: str, kind: int, index: int, ref_id: str | None) -> None:
        self.local = local
        self.kind = kind
        self.index = index  # position of the start tag in the output list
        self.count = 0 if kind == _UNWRAP else 1  # output elements in this subtree
        self.ref_id = ref_id  # id usable as a #fragment target, if any


class _Builder:
    """Receives expat events, writes the allowlisted document to :attr:`out`."""

    def __init__(self, limits: SvgLimits) -> None:
        self.limits = limits
        self.out: list[str] = []
        self.removed: set[str] = set()
        self.elements = _SVG_ELEMENTS
        self.stack: list[_Open] = []
        self.skip = 0  # > 0 while inside a dropped subtree
        self.text: list[str] | None = None  # collects the text of an open title/desc/style
        self.nodes = 0
        self.depth = 0
        self.internal_subset = False
        self.uses_xlink = False
        # <use> bookkeeping: target id of each <use>, the <use>s inside each id's
        # subtree, and the element count of each id's subtree.
        self.use_targets: list[str | None] = []
        self.open_ids: list[str] = []
        self.contains: dict[str, list[int]] = {}
        self.sizes: dict[str, int] = {}
        self.data_images: dict[str, str | None] = {}
        self.css_budget = limits.max_css_bytes
        self.max_nodes = limits.max_nodes
        self.max_depth = limits.max_depth

    # -- expat callbacks -------------------------------------------------

    def start(self, name: str, attrs: list[str]) -> None:
        self.nodes += 1
        self.depth += 1
        if self.nodes > self.max_nodes:
            raise _Refused("svg_too_many_nodes")
        if self.depth > self.max_depth:
            raise _Refused("svg_too_deep")
        if self.skip:
            self.skip += 1
            if name.rpartition("}")[2].lower() == "script":
                self.removed.add("svg_script_removed")
            return
        if not self.out:
            self._root(name)
        info = self.elements.get(name)
        if info is None or self.text is not None:
            self._drop(name)
            return
        local, kind = info
        if kind == _ANIMATION and not self._animation_allowed(local, attrs):
            self.removed.add("svg_animation_removed")
            self.skip = 1
            return
        attributes, ref_id, href = self._attributes(local, attrs) if attrs else ("", None, None)
        if kind == _UNWRAP:
            self.removed.add("svg_element_removed")
            self.stack.append(_Open(local, kind, -1, None))
            return
        index = len(self.out)
        self.out.append(f"<{local}{attributes}")
        frame = _Open(local, kind, index, ref_id)
        self.stack.append(frame)
        if ref_id is not None:
            self.open_ids.append(ref_id)
        if local == "use":
            self._use(href)
        if kind in (_TEXT, _STYLE):
            self.text = []

    def end(self, name: str) -> None:
        self.depth -= 1
        if self.skip:
            self.skip -= 1
            return
        frame = self.stack.pop()
        if self.stack:
            self.stack[-1].count += frame.count
        if frame.kind == _UNWRAP:
            return
        out = self.out
        if frame.kind == _TEXT or frame.kind == _STYLE:
            text = "".join(self.text or ())
            self.text = None
            if frame.kind == _STYLE:
                self._charge_css(text)
                text, reasons = _stylesheet(text)
                self.removed.update(reasons)
            if text:
                out[frame.index] += ">"
                out.append(_escape_text(text))
                out.append(f"</{frame.local}>")
            else:
                out[frame.index] += "/>"
        elif len(out) == frame.index + 1:
            out[frame.index] += "/>"
        else:
            out[frame.index] += ">"
            out.append(f"</{frame.local}>")
        if frame.ref_id is not None:
            self.open_ids.pop()
            self.sizes[frame.ref_id] = self.sizes.get(frame.ref_id, 0) + frame.count

    def data(self, text: str) -> None:
        if self.skip:
            return
        if self.text is not None:
            self.text.append(text)
        elif self.stack:
            self.out.append(text if _TEXT_SPECIALS.search(text) is None else _escape_text(text))

    def comment(self, text: str) -> None:
        self.removed.add("svg_comment_removed")

    def pi(self, target: str, data: str) -> None:
        self.removed.add("svg_pi_removed")

    def start_doctype(
        self, name: str, sysid: str | None, pubid: str | None, has_internal_subset: int
    ) -> None:
        self.removed.add("svg_doctype_removed")
        self.internal_subset = bool(has_internal_subset)

    def end_doctype(self) -> None:
        # Entity declarations in the subset were refused by defusedxml already
        # (svg_entities_forbidden); anything else there (ATTLIST defaults,
        # ELEMENT declarations, comments) still changes how the document parses.
        if self.internal_subset:
            raise _Refused("svg_dtd_forbidden")

    def close(self) -> None:
        return None

    # -- helpers ---------------------------------------------------------

    def _root(self, name: str) -> None:
        if name == _SVG_PREFIX + "svg":
            return
        if name == "svg" and self.limits.accept_unnamespaced:
            self.elements = _SVG_AND_BARE_ELEMENTS  # read it as the HTML parser reads inline SVG
            return
        raise _Refused("svg_not_svg")

    def _charge_css(self, css: str) -> None:
        self.css_budget -= len(css)
        if self.css_budget < 0:
            raise _Refused("svg_css_limit")

    def _drop(self, name: str) -> None:
        local = name.rpartition("}")[2]
        self.removed.add("svg_script_removed" if local.lower() == "script" else "svg_element_removed")
        self.skip = 1

    def _animation_allowed(self, local: str, attrs: list[str]) -> bool:
        values = dict(zip(attrs[::2], attrs[1::2], strict=True))
        target = values.get("attributeName")
        # animateMotion moves its parent and needs no attributeName; if it has
        # one anyway, it is held to the same rule as the other animations.
        if (target is not None or local != "animateMotion") and (target or "").strip() not in _ANIMATABLE:
            return False
        for key in ("values", "from", "to", "by"):
            value = values.get(key)
            if value is not None:
                norm = _normalise(value)
                if "url(" in norm or ":" in norm or "\\" in norm:
                    return False
        return True

    def _attributes(self, local: str, attrs: list[str]) -> tuple[str, str | None, str | None]:
        """Return the kept attributes as markup, the element's usable id, and its kept href."""
        parts: list[str] = []
        ref_id: str | None = None
        href: str | None = None
        removed = self.removed
        pairs = iter(attrs)  # expat's ordered_attributes: name, value, name, value, ...
        for name, value in zip(pairs, pairs, strict=True):
            info = _ATTRIBUTES.get(name)
            if info is None:
                if svg_policy.is_aria_or_data(name):
                    info = (name, _PLAIN)
                else:
                    attr_local = name.rpartition("}")[2]
                    if attr_local[:2].lower() == "on":
                        removed.add("svg_event_handler_removed")
                    elif attr_local == "href":
                        removed.add(_URL_REMOVED)
                    else:
                        removed.add("svg_attribute_removed")
                    continue
            out_name, kind = info
            if kind == _PLAIN:
                # Most values are numbers, lengths and path data: one scan finds
                # the rare ones that need a URL check or escaping.
                if _SPECIALS.search(value) is None:
                    parts.append(f' {out_name}="{value}"')
                    continue
                if _URL_SUSPECT.search(value) is not None and _has_bad_url(value):
                    removed.add(_URL_REMOVED)
                    continue
            elif kind == _PAINT:
                if _PLAIN_PAINT.fullmatch(value) is not None:  # keywords, numbers, #colours
                    parts.append(f' {out_name}="{value}"')
                    continue
                if _URL_FRAGMENT.fullmatch(value) is None:
                    self._charge_css(value)
                    reason = _paint_value(value)
                    if reason is not None:
                        removed.add(reason)
                        continue
            elif kind == _STYLE_ATTR:
                plain = _plain_style_attribute(value) if _PLAIN_STYLE.fullmatch(value) else None
                if plain is None:
                    self._charge_css(value)
                    plain = _style_attribute(value)
                value, reasons = plain
                removed.update(reasons)
                if not value:
                    continue
            elif kind == _HREF:
                if local in _HREF_ELEMENTS and value[:1] == "#" and _FRAGMENT_ID.fullmatch(value, 1):
                    kept: str | None = value  # the common case: a plain #id where a reference belongs
                else:
                    kept = self._href(local, value)
                if kept is None:
                    continue
                value = kept
                if href is None or out_name == "href":  # SVG 2: href wins over xlink:href
                    href = value
                if out_name != "href":
                    self.uses_xlink = True
            else:  # id
                if _SPECIALS.search(value) is None:
                    if _FRAGMENT_ID.fullmatch(value):
                        ref_id = value
                    parts.append(f' id="{value}"')
                    continue
                if _URL_SUSPECT.search(value) is not None and _has_bad_url(value):
                    removed.add(_URL_REMOVED)
                    continue
                if _FRAGMENT_ID.fullmatch(value):
                    ref_id = value
            parts.append(f' {out_name}="{_escape_attr(value)}"')
        return "".join(parts), ref_id, href

    def _href(self, local: str, value: str) -> str | None:
        if local not in _HREF_ELEMENTS:
            self.removed.add(_URL_REMOVED)
            return None
        url = value.translate(_STRIP_CONTROLS)
        if url.startswith("#"):
            fragment = _fragment(value)
            if fragment is None:
                self.removed.add(_URL_REMOVED)
            return fragment
        if local in _DATA_IMAGE_ELEMENTS and url[:5].lower() == "data:":
            if url not in self.data_images:
                self.data_images[url] = self._data_image(url)
            kept = self.data_images[url]
            if kept is None:
                self.removed.add("svg_data_image_removed")
            return kept
        self.removed.add(_URL_REMOVED)
        return None

    def _data_image(self, url: str) -> str | None:
        match = _DATA_IMAGE.match(url)
        if match is None or not self.limits.data_images:
            return None
        declared = svg_policy.DATA_IMAGE_TYPES[match.group(1).lower()]
        try:
            payload = base64.b64decode(url[match.end() :], validate=True)
        except (binascii.Error, ValueError):
            return None
        if sniff(payload) != declared:
            return None
        try:
            image = sanitize_raster(payload, self.limits.raster, Transform(fmt=_DATA_IMAGE_OUTPUT[declared]))
        except InvalidImage:
            return None
        return f"data:{image.content_type};base64,{base64.b64encode(image.body).decode('ascii')}"

    def _use(self, href: str | None) -> None:
        index = len(self.use_targets)
        if index >= self.limits.max_use:
            raise _Refused("svg_use_limit")
        self.use_targets.append(href[1:] if href is not None and href.startswith("#") else None)
        for open_id in self.open_ids:  # this <use> is inside each open id's subtree
            self.contains.setdefault(open_id, []).append(index)

    def check_uses(self) -> None:
        """Refuse cycles, chains longer than ``max_use_depth`` and a too large expansion."""
        limits = self.limits
        targets = self.use_targets
        state = [0] * len(targets)  # 0 unseen, 1 on the current path, 2 done
        chain = [0] * len(targets)
        cost = [0] * len(targets)

        def visit(use: int, depth: int) -> None:
            if depth > limits.max_use_depth:
                raise _Refused("svg_use_limit")
            state[use] = 1
            target = targets[use]
            length = 1
            elements = 0
            if target is not None:
                elements = self.sizes.get(target, 0)
                for inner in self.contains.get(target, ()):
                    if state[inner] == 1:  # the target contains this very <use>: a cycle
                        raise _Refused("svg_use_limit")
                    if state[inner] == 0:
                        visit(inner, depth + 1)
                    length = max(length, chain[inner] + 1)
                    elements += cost[inner]
                    if length > limits.max_use_depth or elements > limits.max_use_expansion:
                        raise _Refused("svg_use_limit")
            chain[use] = length
            cost[use] = elements
            state[use] = 2

        total = 0
        for use in range(len(targets)):
            if state[use] == 0:
                visit(use, 1)
            total += cost[use]
            if total > limits.max_use_expansion:
                raise _Refused("svg_use_limit")

    def document(self) -> str:
        if not self.out:
            raise _Refused("svg_malformed")
        namespaces = f' xmlns="{SVG_NS}"'
        if self.uses_xlink:
            namespaces += f' xmlns:xlink="{XLINK_NS}"'
        # The root start tag is out[0] = "<svg" + attributes + (">" or "/>").
        self.out[0] = "<svg" + namespaces + self.out[0][4:]
        return "".join(self.out)


def _parse(data: bytes, limits: SvgLimits) -> _Builder:
    builder = _Builder(limits)
    parser = DefusedXMLParser(target=builder, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    expat = parser.parser
    # Feed expat's raw events to the builder directly: names stay in expat's
    # "namespace}local" form and no ElementTree is built.
    expat.StartElementHandler = builder.start
    expat.EndElementHandler = builder.end
    expat.CharacterDataHandler = builder.data
    expat.CommentHandler = builder.comment
    expat.ProcessingInstructionHandler = builder.pi
    expat.StartDoctypeDeclHandler = builder.start_doctype
    expat.EndDoctypeDeclHandler = builder.end_doctype
    parser.feed(data)
    parser.close()
    return builder


def sanitize_svg(data: bytes, limits: SvgLimits = SvgLimits()) -> SanitizedSvg:
    """Parse ``data`` safely and rebuild it from the SVG allowlist.

    :param data: the upstream body (any encoding the XML parser recognises).
    :param limits: size, node, depth, ``<use>``, CSS and data-image limits.
    :returns: the rebuilt document and the reason codes of what was removed.
    :raises InvalidImage: with :attr:`~imageguard.errors.Rejected.reason`
        ``too_large`` (input or output above ``max_bytes``), ``svg_malformed``,
        ``svg_entities_forbidden``, ``svg_dtd_forbidden``, ``svg_not_svg``,
        ``svg_too_many_nodes``, ``svg_too_deep``, ``svg_use_limit`` or
        ``svg_css_limit``; the parser's exception, if any, is the
        ``original_error``. Nothing else is raised.

    .. versionadded:: 0.1
    """
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            "too_large", _MESSAGES["too_large"], facts={"size": len(data), "limit": limits.max_bytes}
        )
    try:
        builder = _parse(data, limits)
        builder.check_uses()
        text = builder.document()
        body = text.encode("utf-8")
    except _Refused as exc:
        raise InvalidImage(exc.reason, _MESSAGES[exc.reason]) from None
    except DefusedXmlException as exc:  # EntitiesForbidden, ExternalReferenceForbidden
        raise InvalidImage(
            "svg_entities_forbidden", _MESSAGES["svg_entities_forbidden"], original_error=exc
        ) from exc
    except (ParseError, ValueError, LookupError, UnicodeError) as exc:
        raise InvalidImage("svg_malformed", _MESSAGES["svg_malformed"], original_error=exc) from exc
    if len(body) > limits.max_bytes:
        raise InvalidImage(
            "too_large", _MESSAGES["too_large"], facts={"size": len(body), "limit": limits.max_bytes}
        )
    return SanitizedSvg(body=body, content_type=CONTENT_TYPE, removed=tuple(sorted(builder.removed)))
