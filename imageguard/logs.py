"""Log output: JSON lines for ``IMAGEGUARD_LOG_FORMAT=json`` (DESIGN §8).

Use :func:`configure` when a guard starts: with ``log_format="json"`` it gives
the ``imageguard`` logger (and so ``imageguard.security``) its own handler
writing one JSON object per line to stderr, and stops those records from also
reaching the root logger's handlers. With ``log_format="text"`` it does nothing:
records propagate to whatever logging the application set up, because a library
never configures the root logger.

:func:`configure_root` is for applications, such as ``imageguard serve``: it
sets up the root logger in the chosen format.

A JSON line carries ``time`` (ISO 8601, UTC, milliseconds), ``level``,
``logger``, ``message``, the security event's fields (``reason``, ``path``,
``client``...) and, for an exception, ``exc_info`` (the formatted traceback)::

    {"time": "2025-01-01T12:00:00.123Z", "level": "WARNING", "logger": "imageguard.security",
     "message": "bad_signature: ...", "reason": "bad_signature", "path": "/a.jpg"}
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["TEXT_FORMAT", "JSONFormatter", "configure", "configure_root"]

#: The text format ``imageguard serve`` uses.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Attribute marking the handler :func:`configure` installed (so it is installed once).
HANDLER_MARK = "_imageguard_json_handler"
# Keys of every JSON line; an event field with one of these names is written
# with a trailing underscore instead of overwriting it.
_BASE_KEYS = frozenset({"time", "level", "logger", "message", "exc_info", "stack_info"})
_CONFIGURE_LOCK = threading.Lock()


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def _jsonable(value: object) -> Any:
    try:
        json.dumps(value, default=_text)
    except Exception:
        return _text(value)
    return value


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line; never raises.

    Values JSON cannot represent are written as ``str(value)``. Output is ASCII
    (``\\uXXXX`` escapes), so control characters, newlines and line separators in
    a message cannot split or forge a log line.
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            fields = self._fields(record)
        except Exception:
            fields = {
                "time": self._time(record),
                "level": _text(getattr(record, "levelname", "")),
                "logger": _text(getattr(record, "name", "")),
                "message": self._message(record),
                "format_error": "fields could not be read",
            }
        try:
            return json.dumps(fields, default=_text, ensure_ascii=True)
        except Exception:  # a value JSON rejects outright (circular, tuple keys): as text
            return json.dumps({k: _jsonable(v) for k, v in fields.items()}, default=_text, ensure_ascii=True)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": self._message(record),
        }
        extra = getattr(record, "imageguard", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                name = _text(key)
                fields[name + "_" if name in _BASE_KEYS else name] = value
        if record.exc_info:
            fields["exc_info"] = self._safely(self.formatException, record.exc_info)
        elif record.exc_text:
            fields["exc_info"] = record.exc_text
        if record.stack_info:
            fields["stack_info"] = self._safely(self.formatStack, record.stack_info)
        return fields

    @staticmethod
    def _time(record: logging.LogRecord) -> str:
        try:
            moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
            return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        except Exception:
            return _text(getattr(record, "created", ""))

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:  # bad %-arguments: the template and arguments as they are
            return f"{_text(record.msg)} {_text(record.args)}"

    @staticmethod
    def _safely(render: Any, value: Any) -> str:
        try:
            return _text(render(value))
        except Exception:
            return _text(value)


def _our_handler(logger: logging.Logger) -> logging.Handler | None:
    return next((h for h in logger.handlers if getattr(h, HANDLER_MARK, False)), None)


def configure(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Set up the ``imageguard`` logger for ``settings.log_format``; safe to call many times.

    ``json``: one stream handler with :class:`JSONFormatter` on the
    ``imageguard`` logger (installed once per process, however many guards call
    this), ``propagate`` off so records are not printed twice, level INFO unless
    the application set one. ``text``: nothing; the application's logging
    applies.

    :param settings: the guard's settings (``log_format``).
    :param stream: where JSON lines go; by default ``sys.stderr``.
    """
    if settings.log_format != "json":
        return
    logger = logging.getLogger("imageguard")
    with _CONFIGURE_LOCK:
        if _our_handler(logger) is None:
            handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
            handler.setFormatter(JSONFormatter())
            setattr(handler, HANDLER_MARK, True)
            logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def configure_root(settings: Settings, level: int = logging.INFO, *, stream: IO[str] | None = None) -> None:
    """Set up the root logger for an application (``imageguard serve``).

    Like :func:`logging.basicConfig`, it does nothing if the root logger already
    has handlers.

    :param settings: ``log_format`` picks :data:`TEXT_FORMAT` or :class:`JSONFormatter`.
    :param level: the root logger's level.
    :param stream: where records go; by default ``sys.stderr``.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = JSONFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
