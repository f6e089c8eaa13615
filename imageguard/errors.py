"""The exception tree of imageguard.

Use it to tell configuration mistakes (raised at start-up) from rejections
(raised per request and turned into a response by the adapters)::

    ImageGuardError
    ├── ConfigError        variable, value, what is accepted
    └── Rejected           .status, .reason (X-ImageGuard-Reason), .original_error
        ├── BadRequest        400
        ├── InvalidSignature  403
        ├── RateLimited       429
        ├── InvalidImage      502
        └── Overloaded        503

Only the adapters turn a :class:`Rejected` into a response; everything below
them raises.
"""

from __future__ import annotations


class ImageGuardError(Exception):
    """Base class of every error imageguard raises on purpose."""


class ConfigError(ImageGuardError, ValueError):
    """A setting has a value imageguard cannot run with.

    Raised at start-up, never per request: the middleware does not start
    half-configured.
    """

    #: The environment variable the value belongs to, e.g. ``IMAGEGUARD_MAX_BYTES``.
    variable: str
    #: The offending value, as given (secrets are redacted by the caller).
    value: object
    #: A human-readable description of what is accepted.
    accepted: str

    def __init__(self, variable: str, value: object, accepted: str) -> None:
        self.variable = variable
        self.value = value
        self.accepted = accepted
        super().__init__(f"{variable}={value!r} is invalid: expected {accepted}")


class Rejected(ImageGuardError):
    """A request or an upstream response that imageguard refuses to serve.

    The adapters answer it with :attr:`status`, ``Cache-Control: no-store``,
    ``X-ImageGuard-Reason: <reason>`` and a short ``text/plain`` body.
    """

    #: HTTP status the client receives (DESIGN §9).
    status: int = 400
    #: Machine-readable reason code, sent as ``X-ImageGuard-Reason`` and logged.
    reason: str
    #: The lower-level exception that caused the rejection, if any.
    original_error: BaseException | None
    #: Seconds for a ``Retry-After`` header, or ``None`` for none.
    retry_after: int | None = None

    #: Facts for the security event (declared and sniffed type, sizes, ...).
    facts: dict[str, object]

    def __init__(
        self,
        reason: str,
        message: str | None = None,
        *,
        original_error: BaseException | None = None,
        retry_after: int | None = None,
        facts: dict[str, object] | None = None,
    ) -> None:
        self.reason = reason
        self.original_error = original_error
        self.facts = dict(facts or {})
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(message or reason)

    @property
    def message(self) -> str:
        """The human-readable explanation (also the response body)."""
        return str(self)


class BadRequest(Rejected):
    """Malformed path or query string (400)."""

    status = 400


class InvalidSignature(Rejected):
    """Missing, invalid or expired signature (403)."""

    status = 403


class Forbidden(Rejected):
    """A request that policy refuses: a remote host, scheme or address not allowed (403)."""

    status = 403


class RateLimited(Rejected):
    """Too many cache misses from one client (429).

    ``facts["client"]`` is the client that was charged: a request of another
    client that waited on the same fill is not limited by it (the adapters retry).
    """

    status = 429


class InvalidImage(Rejected):
    """The upstream's content failed validation (502)."""

    status = 502


class Overloaded(Rejected):
    """The sanitizer queue is full (503)."""

    status = 503
