"""An independent judge of sanitized SVG: the corpus README's "SVG rule" as code.

The tests use it to decide whether an output of :func:`imageguard.svg.sanitize_svg`
is safe. It shares no code or tables with the sanitizer on purpose: it is
written from the rule's wording, not from the allowlists, so a bug in one is
unlikely to hide in the other.

- :func:`is_svg_safe` parses the body as XML (defusedxml, DTDs forbidden) and
  checks the tree and the raw text.
- :func:`is_html_safe` parses the body as an HTML5 parser would (html5lib), the
  way a browser reads inline SVG, and checks the result again: markup that only
  turns dangerous under HTML parsing rules (mXSS, namespace confusion) shows up
  there.

Both return a list of violations (empty means safe).
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import html5lib
from defusedxml import ElementTree as DefusedET

SVG = "http://www.w3.org/2000/svg"
XLINK = "http://www.w3.org/1999/xlink"
XHTML = "http://www.w3.org/1999/xhtml"
XMLNS = "http://www.w3.org/2000/xmlns/"
XINCLUDE = "http://www.w3.org/2001/XInclude"

#: Schemes that must not appear in any attribute value, once whitespace and
#: control characters are gone and entities decoded.
BAD_SCHEMES = ("javascript:", "vbscript:", "data:text/html", "data:image/svg+xml")
#: data: URLs an href may hold (when the policy allows raster data: images).
ALLOWED_DATA_URL = re.compile(r"data:image/(?:png|jpeg|gif|webp)[;,]")
#: SMIL elements that can rewrite another attribute (lower-cased local names).
ANIMATIONS = frozenset({"animate", "set", "animatemotion", "animatetransform"})
#: Elements a ``<use>`` expansion may instantiate, and how deep it may nest.
USE_EXPANSION_LIMIT = 200_000
USE_NESTING_LIMIT = 32

_WS_CONTROLS = re.compile(r"[\x00-\x20\x7f]+")
_CSS_HEX_ESCAPE = re.compile(r"\\([0-9a-fA-F]{1,6})[ \t\r\n\f]?")
_CSS_CHAR_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|$)", re.DOTALL)


def _squash(value: str) -> str:
    """Decode entities (once more than the parser did), drop whitespace/controls, lower-case."""
    return _WS_CONTROLS.sub("", html.unescape(value)).lower()


def _decode_css(text: str) -> str:
    def hex_char(match: re.Match[str]) -> str:
        code = int(match.group(1), 16)
        return chr(code) if 0 < code < 0x110000 and not 0xD800 <= code <= 0xDFFF else "\ufffd"

    text = _CSS_COMMENT.sub("", text)
    text = _CSS_HEX_ESCAPE.sub(hex_char, text)
    return _CSS_CHAR_ESCAPE.sub(lambda m: m.group(1), text)


def _external_urls(squashed: str) -> bool:
    for match in re.finditer(r"url\(", squashed):
        rest = squashed[match.end() :].lstrip("'\"")
        if not rest.startswith("#"):
            return True
    return False


def _css_violations(css: str, where: str) -> list[str]:
    text = _squash(_decode_css(css))
    found = []
    for needle in ("@import", "expression(", "-moz-binding", "behavior:"):
        if needle in text:
            found.append(f"{where}: CSS contains {needle!r}")
    if _external_urls(text):
        found.append(f"{where}: CSS url() points outside the document")
    found.extend(f"{where}: CSS contains {bad!r}" for bad in BAD_SCHEMES if bad in text)
    return found


def _split(name: str) -> tuple[str, str]:
    if name.startswith("{"):
        namespace, _, local = name[1:].partition("}")
        return namespace, local
    return "", name


def _attribute_violations(element: ET.Element, path: str) -> Iterator[str]:
    _, element_local = _split(str(element.tag))
    for name, value in element.attrib.items():
        namespace, local = _split(name)
        if namespace == XMLNS:
            continue
        where = f"{path}@{local if not namespace else name}"
        if local.lower().startswith("on"):
            yield f"{where}: event handler attribute"
        if namespace == XINCLUDE:
            yield f"{where}: XInclude attribute"
        squashed = _squash(value)
        if (
            local == "href"
            and namespace in ("", XLINK)
            and not (squashed.startswith("#") or ALLOWED_DATA_URL.match(squashed))
        ):
            yield f"{where}: href to another document: {value[:80]!r}"
        for bad in BAD_SCHEMES:
            if bad in squashed:
                yield f"{where}: value contains {bad!r}"
        if local == "style" and not namespace:
            yield from _css_violations(value, where)
        elif _external_urls(_squash(_decode_css(value))):
            yield f"{where}: url() points outside the document"
    if element_local.lower() in ANIMATIONS:
        target = _squash(element.get("attributeName", ""))
        if target in ("href", "xlink:href") or target.endswith(":href") or target.startswith("on"):
            yield f"{path}: <{element_local}> animates {target!r}"


def _tree_violations(root: ET.Element, *, html_parsed: bool) -> list[str]:
    found: list[str] = []
    for element in root.iter():
        if not isinstance(element.tag, str):  # comments/PIs if a tree builder kept them
            found.append("comment or processing instruction in the tree")
            continue
        namespace, local = _split(element.tag)
        path = f"<{local}>"
        if html_parsed and namespace == XHTML and local in ("html", "head", "body"):
            continue
        if local.lower() == "script":
            found.append(f"{path}: script element ({namespace or 'no namespace'})")
        if local.lower() == "foreignobject":
            found.append(f"{path}: foreignObject")
        if namespace == XINCLUDE:
            found.append(f"{path}: XInclude element")
        if namespace != SVG:
            found.append(f"{path}: element outside the SVG namespace ({namespace or 'none'})")
        if local == "style" and namespace == SVG:
            found.extend(_css_violations("".join(element.itertext()), path))
        found.extend(_attribute_violations(element, path))
    found.extend(_use_violations(root))
    return found


def _use_violations(root: ET.Element) -> list[str]:
    ids: dict[str, ET.Element] = {}
    for element in root.iter():
        element_id = element.get("id")
        if element_id is not None:
            ids.setdefault(element_id, element)

    def target(use: ET.Element) -> ET.Element | None:
        href = use.get("href") or use.get(f"{{{XLINK}}}href") or ""
        return ids.get(href[1:]) if href.startswith("#") else None

    budget = [USE_EXPANSION_LIMIT]

    def expand(node: ET.Element, path: tuple[int, ...]) -> None:
        if len(path) > USE_NESTING_LIMIT:
            raise _UseProblem(f"<use> nesting deeper than {USE_NESTING_LIMIT}")
        for element in node.iter():
            budget[0] -= 1
            if budget[0] < 0:
                raise _UseProblem(f"<use> expansion beyond {USE_EXPANSION_LIMIT} elements")
            if _split(str(element.tag))[1] == "use":
                referenced = target(element)
                if referenced is None:
                    continue
                if id(referenced) in path or referenced is element:
                    raise _UseProblem("<use> reference cycle")
                expand(referenced, (*path, id(referenced)))

    try:
        expand(root, (id(root),))
    except _UseProblem as exc:
        return [str(exc)]
    return []


class _UseProblem(Exception):
    pass


def _raw_violations(text: str) -> list[str]:
    found = []
    upper = text.upper()
    if "<!DOCTYPE" in upper:
        found.append("DOCTYPE in output")
    if "<!ENTITY" in upper:
        found.append("entity declaration in output")
    body = text.lstrip("\ufeff")
    if body.startswith("<?xml ") or body.startswith("<?xml\t"):
        body = body[body.find("?>") + 2 :]
    if "<?" in body:
        found.append("processing instruction in output")
    if XINCLUDE in text:
        found.append("XInclude namespace in output")
    return found


def is_svg_safe(body: bytes) -> list[str]:
    """Judge a sanitized SVG by the corpus SVG rule; return the violations (empty: safe)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return ["output is not UTF-8"]
    found = _raw_violations(text)
    try:
        root = DefusedET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except Exception as exc:  # any parse failure is a violation, whatever its type
        return [*found, f"output is not well-formed XML: {exc}"]
    if root.tag != f"{{{SVG}}}svg":
        found.append(f"root is {root.tag!r}, not the SVG svg element")
    found.extend(_tree_violations(root, html_parsed=False))
    return found


def is_html_safe(body: bytes) -> list[str]:
    """Parse ``body`` as HTML (inline SVG in a page) and judge the result by the same rule.

    HTML elements other than the ``html``/``head``/``body`` wrappers mean that
    the markup escaped the SVG namespace under HTML parsing.
    """
    document = html5lib.parse(body.decode("utf-8"), treebuilder="etree", namespaceHTMLElements=True)
    return _tree_violations(document, html_parsed=True)


#: The corpus's benign controls (shared/corpus/README.md): they must be accepted
#: and keep their drawing. By corpus set, file stems.
BENIGN_CONTROLS: dict[str, tuple[str, ...]] = {
    "borewit": (
        "circle",
        "circleBlink",
        "friendly",
        "Flag_of_the_United_States",
        "S",
        "style",
        "style-empty",
    ),
    "darylldoyle": ("ariaDataTest",),
}
