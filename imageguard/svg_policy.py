"""The SVG allowlists: which elements, attributes, CSS properties and CSS functions survive.

This module is data. :mod:`imageguard.svg` rebuilds every SVG from these sets and
nothing else: whatever is not listed here is dropped, so adding a name is the
only way to let something new through. Read it when an SVG loses something it
should keep, or when reviewing what imageguard lets a browser see.

References used to compile the lists (names only; nothing is copied from them):

- SVG 1.1 Second Edition, W3C Recommendation 2011: element index (appendix
  "Element Index"), attribute index and property index ("Property Index");
- SVG 2, W3C Candidate Recommendation 2018: chapters "Document Structure",
  "Paths", "Basic Shapes", "Text", "Painting", "Paint Servers", "Geometry
  Properties", "Styling" ("presentation attributes" table);
- Filter Effects Module Level 1 (the ``fe*`` primitives and their attributes);
- SMIL Animation / SVG Animations Level 2 (``animate``, ``set``,
  ``animateMotion``, ``animateTransform``, ``mpath``);
- CSS Masking Level 1 (``clipPath``, ``mask``, ``mask-type``);
- WAI-ARIA 1.2 (``role``, ``aria-*``);
- DOMPurify's ``svg``, ``svgFilters`` and ``svgAttr`` allowlists, read as a
  second opinion on what real-world SVG needs (they target inline SVG in
  HTML; ours is stricter where a standalone document allows more, e.g. no
  ``a``, no SVG fonts).

.. versionadded:: 0.1
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ANIMATABLE_ATTRIBUTES",
    "ANIMATION_ELEMENTS",
    "ATTRIBUTES",
    "CSS_FUNCTIONS",
    "CSS_PROPERTIES",
    "DATA_IMAGE_ELEMENTS",
    "DATA_IMAGE_TYPES",
    "DROPPED_WITH_CONTENT",
    "ELEMENTS",
    "HREF_ELEMENTS",
    "PRESENTATION_ATTRIBUTES",
    "SELECTOR_FUNCTIONS",
    "SVG_NS",
    "TEXT_ONLY_ELEMENTS",
    "UNWRAPPED_ELEMENTS",
    "XLINK_NS",
    "XML_NS",
    "is_aria_or_data",
]

#: The SVG namespace (SVG 1.1 §5.1): the only namespace whose elements are kept.
SVG_NS: Final = "http://www.w3.org/2000/svg"
#: The XLink namespace: only its ``href`` attribute is kept (as ``xlink:href``).
XLINK_NS: Final = "http://www.w3.org/1999/xlink"
#: The XML namespace (bound to ``xml:`` by definition): only ``xml:lang`` and ``xml:space``.
XML_NS: Final = "http://www.w3.org/XML/1998/namespace"

# ---------------------------------------------------------------------------
# Elements (local names in the SVG namespace; XML is case-sensitive, so
# ``<SCRIPT>`` or ``<stylE>`` are simply not in these sets)
# ---------------------------------------------------------------------------

#: Every SVG element that may appear in the output.
ELEMENTS: Final[frozenset[str]] = frozenset(
    {
        # Structure (SVG 1.1 ch. 5, SVG 2 "Document Structure"). ``switch`` is
        # kept: Illustrator wraps drawings in <switch><foreignObject .../><g>
        # and the <g> must still render once the foreignObject is gone.
        "svg",
        "g",
        "defs",
        "symbol",
        "use",
        "switch",
        "title",
        "desc",
        "view",
        # Styling (SVG 1.1 ch. 6): content rebuilt by the CSS sanitizer.
        "style",
        # Basic shapes and paths (SVG 1.1 ch. 8-9).
        "path",
        "rect",
        "circle",
        "ellipse",
        "line",
        "polyline",
        "polygon",
        # Text (SVG 1.1 ch. 10; ``tref`` and ``altGlyph*`` are gone from
        # SVG 2 and browsers, so they are not listed).
        "text",
        "tspan",
        "textPath",
        # Paint servers (SVG 1.1 ch. 13).
        "linearGradient",
        "radialGradient",
        "stop",
        "pattern",
        # Clipping, masking, markers (SVG 1.1 ch. 11, 14; CSS Masking).
        "clipPath",
        "mask",
        "marker",
        # Raster images: only same-document or re-encoded data: images.
        "image",
        # Filter effects (SVG 1.1 ch. 15, Filter Effects 1).
        "filter",
        "feBlend",
        "feColorMatrix",
        "feComponentTransfer",
        "feComposite",
        "feConvolveMatrix",
        "feDiffuseLighting",
        "feDisplacementMap",
        "feDistantLight",
        "feDropShadow",
        "feFlood",
        "feFuncA",
        "feFuncB",
        "feFuncG",
        "feFuncR",
        "feGaussianBlur",
        "feImage",
        "feMerge",
        "feMergeNode",
        "feMorphology",
        "feOffset",
        "fePointLight",
        "feSpecularLighting",
        "feSpotLight",
        "feTile",
        "feTurbulence",
        # Declarative animation (SMIL), checked further by the sanitizer.
        "animate",
        "animateMotion",
        "animateTransform",
        "set",
        "mpath",
        # ``a`` is listed so that it is recognised; it is unwrapped (below).
        "a",
    }
)

#: Elements replaced by their children: a link is navigation, never drawing,
#: and an SVG image has no business navigating its viewer. Text and shapes
#: inside stay.
UNWRAPPED_ELEMENTS: Final[frozenset[str]] = frozenset({"a"})

#: Elements whose content is text only: child elements are dropped, their
#: tails kept. ``title`` and ``desc`` are HTML integration points when the
#: SVG is parsed as inline SVG (markup inside them would be parsed as HTML),
#: ``style`` is rebuilt by the CSS sanitizer.
TEXT_ONLY_ELEMENTS: Final[frozenset[str]] = frozenset({"title", "desc", "style"})

#: SMIL animation elements: ``attributeName`` must be in
#: :data:`ANIMATABLE_ATTRIBUTES` and ``values``/``from``/``to``/``by`` must not
#: hold a URL, or the whole element is dropped.
ANIMATION_ELEMENTS: Final[frozenset[str]] = frozenset({"animate", "animateMotion", "animateTransform", "set"})

#: Elements where ``href``/``xlink:href`` means something (a same-document
#: ``#id`` reference). Anywhere else the attribute is dropped.
HREF_ELEMENTS: Final[frozenset[str]] = frozenset(
    {
        "use",
        "image",
        "feImage",
        "mpath",
        "textPath",
        "linearGradient",
        "radialGradient",
        "pattern",
        "filter",
        "animate",
        "animateMotion",
        "animateTransform",
        "set",
    }
)

#: Elements whose ``href`` may also be a ``data:image/...;base64`` URL (the
#: payload is re-encoded by the raster pipeline).
DATA_IMAGE_ELEMENTS: Final[frozenset[str]] = frozenset({"image", "feImage"})

#: Declared ``data:`` media types accepted in :data:`DATA_IMAGE_ELEMENTS`,
#: mapped to the raster format the bytes must sniff as.
DATA_IMAGE_TYPES: Final[dict[str, str]] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}

#: Well-known SVG-namespace elements that are dropped with their content.
#: Informational only (anything not in :data:`ELEMENTS` is dropped anyway):
#: ``script`` runs code; ``foreignObject`` embeds HTML; ``handler``/
#: ``listener`` are SVG Tiny 1.2 / XML Events scripting; SVG fonts
#: (``font``, ``font-face*``, ``glyph``...) fetch ``font-face-uri`` and
#: ``font`` is an HTML breakout tag; ``color-profile`` and ``cursor`` fetch
#: URLs; ``discard`` removes elements (a way to alter the document), and
#: ``animateColor``/``animation``/``tref`` are obsolete and unsupported;
#: ``metadata`` holds RDF or anything else and never renders; ``iframe``,
#: ``video``, ``audio``, ``canvas`` are SVG 2 borrowed HTML elements.
DROPPED_WITH_CONTENT: Final[frozenset[str]] = frozenset(
    {
        "script",
        "foreignObject",
        "handler",
        "listener",
        "font",
        "font-face",
        "font-face-src",
        "font-face-uri",
        "font-face-format",
        "font-face-name",
        "glyph",
        "glyphRef",
        "missing-glyph",
        "hkern",
        "vkern",
        "altGlyph",
        "altGlyphDef",
        "altGlyphItem",
        "color-profile",
        "cursor",
        "discard",
        "animateColor",
        "animation",
        "tref",
        "metadata",
        "iframe",
        "video",
        "audio",
        "canvas",
        "prefetch",
        "tbreak",
        "hatch",
        "hatchpath",
        "solidcolor",
        "mesh",
        "meshgradient",
        "meshpatch",
        "meshrow",
    }
)

# ---------------------------------------------------------------------------
# Attributes (no namespace unless written ``{namespace}name``, which is how
# ElementTree names namespaced attributes)
# ---------------------------------------------------------------------------

#: Presentation attributes (SVG 1.1 "Property Index", SVG 2 "presentation
#: attributes" table): their values are CSS values, so any ``url(...)`` in them
#: is checked like CSS (only ``url(#id)``). ``color-profile`` is left out (it
#: names an ICC profile URL).
PRESENTATION_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "alignment-baseline",
        "baseline-shift",
        "clip",
        "clip-path",
        "clip-rule",
        "color",
        "color-interpolation",
        "color-interpolation-filters",
        "color-rendering",
        "cursor",
        "direction",
        "display",
        "dominant-baseline",
        "enable-background",
        "fill",
        "fill-opacity",
        "fill-rule",
        "filter",
        "flood-color",
        "flood-opacity",
        "font-family",
        "font-size",
        "font-size-adjust",
        "font-stretch",
        "font-style",
        "font-variant",
        "font-weight",
        "glyph-orientation-horizontal",
        "glyph-orientation-vertical",
        "image-rendering",
        "kerning",
        "letter-spacing",
        "lighting-color",
        "marker-end",
        "marker-mid",
        "marker-start",
        "mask",
        "mask-type",
        "opacity",
        "overflow",
        "paint-order",
        "pointer-events",
        "shape-rendering",
        "stop-color",
        "stop-opacity",
        "stroke",
        "stroke-dasharray",
        "stroke-dashoffset",
        "stroke-linecap",
        "stroke-linejoin",
        "stroke-miterlimit",
        "stroke-opacity",
        "stroke-width",
        "text-anchor",
        "text-decoration",
        "text-orientation",
        "text-rendering",
        "transform",
        "transform-origin",
        "unicode-bidi",
        "vector-effect",
        "visibility",
        "word-spacing",
        "writing-mode",
    }
)

#: Geometry and structure attributes (SVG 1.1 attribute index, SVG 2
#: "Geometry Properties"): numbers, lengths, path data, keywords.
_GEOMETRY_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "x",
        "y",
        "x1",
        "y1",
        "x2",
        "y2",
        "cx",
        "cy",
        "r",
        "rx",
        "ry",
        "fx",
        "fy",
        "fr",
        "width",
        "height",
        "d",
        "points",
        "pathLength",
        "viewBox",
        "preserveAspectRatio",
        "refX",
        "refY",
        "markerWidth",
        "markerHeight",
        "markerUnits",
        "orient",
        "patternUnits",
        "patternContentUnits",
        "patternTransform",
        "gradientUnits",
        "gradientTransform",
        "spreadMethod",
        "offset",
        "clipPathUnits",
        "maskUnits",
        "maskContentUnits",
        "filterUnits",
        "primitiveUnits",
        "filterRes",
        "zoomAndPan",
    }
)

#: Text layout attributes (SVG 1.1 ch. 10, SVG 2 "Text").
_TEXT_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "dx",
        "dy",
        "rotate",
        "textLength",
        "lengthAdjust",
        "startOffset",
        "method",
        "spacing",
        "side",
        "path",
    }
)

#: Filter primitive attributes (Filter Effects 1).
_FILTER_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "in",
        "in2",
        "result",
        "stdDeviation",
        "edgeMode",
        "mode",
        "operator",
        "k1",
        "k2",
        "k3",
        "k4",
        "values",
        "type",
        "tableValues",
        "slope",
        "intercept",
        "amplitude",
        "exponent",
        "order",
        "kernelMatrix",
        "divisor",
        "bias",
        "targetX",
        "targetY",
        "kernelUnitLength",
        "preserveAlpha",
        "surfaceScale",
        "diffuseConstant",
        "specularConstant",
        "specularExponent",
        "limitingConeAngle",
        "pointsAtX",
        "pointsAtY",
        "pointsAtZ",
        "azimuth",
        "elevation",
        "z",
        "scale",
        "xChannelSelector",
        "yChannelSelector",
        "radius",
        "baseFrequency",
        "numOctaves",
        "seed",
        "stitchTiles",
    }
)

#: SMIL timing and value attributes. ``attributeName`` and the value
#: attributes get the extra animation checks; ``begin``/``end`` may name
#: events (``click``, ``accessKey(a)``), which start an animation but run no
#: code.
_ANIMATION_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "attributeName",
        "attributeType",
        "begin",
        "dur",
        "end",
        "min",
        "max",
        "restart",
        "repeatCount",
        "repeatDur",
        "calcMode",
        "values",
        "keyTimes",
        "keySplines",
        "keyPoints",
        "from",
        "to",
        "by",
        "additive",
        "accumulate",
        "origin",
    }
)

#: Core and conditional-processing attributes. ``requiredExtensions`` and
#: ``requiredFeatures`` hold identifiers that are compared, never fetched;
#: they are kept because ``switch`` picks its child by them. ``lang`` and
#: ``class`` are inert; ``style`` goes through the CSS sanitizer; ``role``
#: and ``aria-*`` keep the drawing accessible.
_CORE_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        "id",
        "class",
        "style",
        "lang",
        "role",
        "version",
        "baseProfile",
        "systemLanguage",
        "requiredExtensions",
        "requiredFeatures",
    }
)

#: Every attribute kept on any allowed element, as ElementTree names it.
#: ``href`` in both spellings is listed but only honoured on
#: :data:`HREF_ELEMENTS`, and only for same-document (or data: image) URLs.
ATTRIBUTES: Final[frozenset[str]] = (
    PRESENTATION_ATTRIBUTES
    | _GEOMETRY_ATTRIBUTES
    | _TEXT_ATTRIBUTES
    | _FILTER_ATTRIBUTES
    | _ANIMATION_ATTRIBUTES
    | _CORE_ATTRIBUTES
    | {
        "href",
        "{" + XLINK_NS + "}href",
        "{" + XML_NS + "}lang",
        "{" + XML_NS + "}space",
    }
)

#: What an animation element may target with ``attributeName``: drawing
#: attributes only. Never ``href``/``xlink:href`` (an animated link or image
#: source), ``on*`` (not in any set here), ``style`` (CSS text that would skip
#: the CSS sanitizer), ``id``/``class`` or anything namespaced. Paint
#: attributes such as ``fill`` stay animatable because their animated values
#: are checked for URLs separately.
ANIMATABLE_ATTRIBUTES: Final[frozenset[str]] = (
    PRESENTATION_ATTRIBUTES | _GEOMETRY_ATTRIBUTES | _TEXT_ATTRIBUTES | _FILTER_ATTRIBUTES
) - {"type", "values", "zoomAndPan"}

# ---------------------------------------------------------------------------
# CSS (``<style>`` and ``style=""``)
# ---------------------------------------------------------------------------

#: CSS properties kept in style sheets and ``style`` attributes: the
#: presentation properties above plus layout and text properties that
#: Inkscape and Illustrator write. Not listed, so dropped: ``behavior``,
#: ``-moz-binding`` and every vendor-prefixed property, ``content``,
#: ``background``/``background-image``, ``list-style*``, ``border-image``,
#: ``mask-image`` and the other image-taking mask longhands, ``src``,
#: ``shape-inside`` (takes a URL), custom properties (``--*``). ``mask``,
#: ``marker``, ``fill`` and the like stay: their ``url()`` may only be ``#id``.
CSS_PROPERTIES: Final[frozenset[str]] = PRESENTATION_ATTRIBUTES | frozenset(
    {
        "background-color",
        "clip-path",
        "font",
        "font-feature-settings",
        "font-kerning",
        "font-variant-caps",
        "font-variant-east-asian",
        "font-variant-ligatures",
        "font-variant-numeric",
        "font-variant-position",
        "font-variation-settings",
        "inline-size",
        "isolation",
        "line-height",
        "marker",
        "mix-blend-mode",
        "text-align",
        "text-decoration-color",
        "text-decoration-line",
        "text-decoration-style",
        "text-indent",
        "text-transform",
        "transform-box",
        "white-space",
        "x",
        "y",
        "cx",
        "cy",
        "r",
        "rx",
        "ry",
        "width",
        "height",
    }
)

#: CSS functions allowed in values: colours, maths, transforms and filter
#: functions. They compute a value and load nothing. ``url()`` is handled
#: apart (``#id`` only); ``expression()``, ``image()``, ``image-set()``,
#: ``cross-fade()``, ``element()``, ``attr()``, ``var()``, ``env()`` and
#: every other name are refused.
CSS_FUNCTIONS: Final[frozenset[str]] = frozenset(
    {
        # CSS Color 4/5
        "rgb",
        "rgba",
        "hsl",
        "hsla",
        "hwb",
        "lab",
        "lch",
        "oklab",
        "oklch",
        "color",
        "color-mix",
        # CSS Values 4
        "calc",
        "min",
        "max",
        "clamp",
        # CSS Transforms 1/2
        "matrix",
        "matrix3d",
        "translate",
        "translatex",
        "translatey",
        "translatez",
        "translate3d",
        "scale",
        "scalex",
        "scaley",
        "scalez",
        "scale3d",
        "rotate",
        "rotatex",
        "rotatey",
        "rotatez",
        "rotate3d",
        "skew",
        "skewx",
        "skewy",
        "perspective",
        # Filter Effects 1 (CSS filter functions)
        "blur",
        "brightness",
        "contrast",
        "drop-shadow",
        "grayscale",
        "hue-rotate",
        "invert",
        "opacity",
        "saturate",
        "sepia",
    }
)

#: Functional pseudo-classes allowed in selectors of ``<style>`` rules.
SELECTOR_FUNCTIONS: Final[frozenset[str]] = frozenset(
    {
        "not",
        "is",
        "where",
        "nth-child",
        "nth-last-child",
        "nth-of-type",
        "nth-last-of-type",
    }
)


def is_aria_or_data(name: str) -> bool:
    """``aria-*`` (WAI-ARIA) and ``data-*`` attributes are kept (values still checked).

    :param name: the attribute's ElementTree name (namespaced names start with
        ``{`` and never match).
    """
    return name.startswith(("aria-", "data-")) and len(name) > 5
