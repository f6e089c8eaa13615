"""JSON log lines and the logging set-up of guards and of `imageguard serve`."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

import pytest

from imageguard import Settings
from imageguard.events import logger, security_event, security_logger
from imageguard.logs import HANDLER_MARK, TEXT_FORMAT, JSONFormatter, configure, configure_root
from tests.support import SECRET

JSON = Settings(secret_key=SECRET, log_format="json")
TEXT = Settings(secret_key=SECRET, log_format="text")
ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the imageguard and root loggers back as they were (other test files rely on them)."""
    root = logging.getLogger()
    saved = [(log, list(log.handlers), log.propagate, log.level) for log in (logger, security_logger, root)]
    yield
    for log, handlers, propagate, level in saved:
        for handler in log.handlers:
            if handler not in handlers:
                handler.close()
        log.handlers[:] = handlers
        log.propagate = propagate
        log.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text[:-1].split("\n")]


def ours(log: logging.Logger) -> list[logging.Handler]:
    return [h for h in log.handlers if getattr(h, HANDLER_MARK, False)]


def test_security_event_and_plain_warning_as_json(stream: io.StringIO) -> None:
    configure(JSON, stream=stream)
    security_event(
        "bad_signature", "signature does not match", path="/static/cat.jpg", client="10.0.0.1", status=403
    )
    logger.warning("upstream answered %d", 500)
    event, warning = lines(stream)
    assert event == {
        "time": event["time"],
        "level": "WARNING",
        "logger": "imageguard.security",
        "message": event["message"],
        "reason": "bad_signature",
        "path": "/static/cat.jpg",
        "client": "10.0.0.1",
        "status": 403,
    }
    assert event["message"].startswith("bad_signature: signature does not match")
    assert warning == {
        "time": warning["time"],
        "level": "WARNING",
        "logger": "imageguard",
        "message": "upstream answered 500",
    }
    for record in (event, warning):
        assert ISO_UTC_MS.fullmatch(record["time"])
        when = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=1)


def test_info_is_emitted_and_debug_is_not(stream: io.StringIO) -> None:
    configure(JSON, stream=stream)
    logger.debug("hidden")
    logger.info("shown")
    assert [line["message"] for line in lines(stream)] == ["shown"]


@pytest.mark.parametrize(
    "text",
    [
        'say "hi" \\ there',
        "two\nlines\r\nand\ttab",
        "héllo wörld ✓ 猫 🐈",
        "nul\x00 bell\x07 esc\x1b[31m del\x7f",
        "line\u2028sep\u2029para\x85nel",
        "lone \ud800 surrogate",
        '{"level": "CRITICAL", "forged": true}\n{"x": 1}',
    ],
    ids=["quotes", "newlines", "non-ascii", "control", "unicode-separators", "surrogate", "forgery"],
)
def test_messages_round_trip_exactly(stream: io.StringIO, text: str) -> None:
    configure(JSON, stream=stream)
    logger.warning(text)
    security_event("type_mismatch", text, path=text)
    plain, event = lines(stream)  # one line each: nothing can split a record
    assert plain["message"] == text
    assert event["path"] == text
    assert text in event["message"]
    assert stream.getvalue().isascii()


def test_exception_traceback(stream: io.StringIO) -> None:
    configure(JSON, stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("fill failed")
    (record,) = lines(stream)
    assert record["level"] == "ERROR" and record["message"] == "fill failed"
    assert record["exc_info"].startswith("Traceback")
    assert record["exc_info"].rstrip().endswith("ValueError: boom")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        return "<Unprintable>"


def test_values_json_cannot_hold_become_text(stream: io.StringIO) -> None:
    configure(JSON, stream=stream)
    security_event(
        "too_large",
        "body too large",
        size=Decimal("1.5"),
        path=PurePosixPath("/a/b.png"),
        sizes=(1, 2),
        time="a fact called time",
    )
    (record,) = lines(stream)
    assert record["size"] == "1.5"
    assert record["path"] == "/a/b.png"
    assert record["sizes"] == [1, 2]
    assert record["message"].startswith("too_large: body too large")  # not overwritten
    assert ISO_UTC_MS.fullmatch(record["time"])  # not overwritten either
    assert record["time_"] == "a fact called time"


def test_formatter_never_raises() -> None:
    formatter = JSONFormatter()
    circular: list[Any] = []
    circular.append(circular)
    record = logging.LogRecord("imageguard", logging.WARNING, __file__, 1, "%d items", ("x",), None)
    record.imageguard = {"loop": circular, "tuple_keys": {(1, 2): 3}, "fine": 1, "odd": Unprintable()}
    parsed = json.loads(formatter.format(record))
    assert parsed["logger"] == "imageguard" and parsed["fine"] == 1
    assert "%d items" in parsed["message"]  # bad arguments: the template is kept
    assert isinstance(parsed["loop"], str) and isinstance(parsed["tuple_keys"], str)
    assert parsed["odd"] == "<Unprintable>"


def test_configure_is_idempotent(stream: io.StringIO) -> None:
    for _ in range(3):
        configure(JSON, stream=stream)
    threads = [threading.Thread(target=configure, args=(JSON,), kwargs={"stream": stream}) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ours(logger)) == 1
    assert ours(security_logger) == []
    assert logger.propagate is False
    logger.warning("once")
    assert len(lines(stream)) == 1


def test_json_records_do_not_also_reach_the_root_logger(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    configure(JSON, stream=stream)
    with caplog.at_level(logging.INFO):
        security_event("bad_signature", "no")
    assert caplog.records == []
    assert len(lines(stream)) == 1


def test_configure_keeps_a_level_the_application_set(stream: io.StringIO) -> None:
    logger.setLevel(logging.ERROR)
    configure(JSON, stream=stream)
    assert logger.level == logging.ERROR
    logger.setLevel(logging.NOTSET)
    configure(JSON, stream=stream)
    assert logger.level == logging.INFO


def test_text_mode_leaves_the_logger_alone(caplog: pytest.LogCaptureFixture) -> None:
    before = list(logger.handlers)
    configure(TEXT)
    assert logger.handlers == before and ours(logger) == []  # the package's NullHandler at most
    assert logger.propagate is True and logger.level == logging.NOTSET
    with caplog.at_level(logging.WARNING):
        security_event("bad_signature", "no", path="/a.jpg")
    (record,) = caplog.records
    assert record.name == "imageguard.security"
    assert record.imageguard == {"reason": "bad_signature", "path": "/a.jpg"}  # type: ignore[attr-defined]


def bare_root() -> logging.Logger:
    """The root logger without handlers (pytest's are put back by restore_logging)."""
    root = logging.getLogger()
    root.handlers[:] = []  # in the test body: pytest adds its handlers again for each phase
    return root


def test_configure_root_text(stream: io.StringIO) -> None:
    root = bare_root()
    configure_root(TEXT, stream=stream)
    assert root.level == logging.INFO
    (handler,) = root.handlers
    assert handler.formatter is not None and handler.formatter._fmt == TEXT_FORMAT
    security_event("bad_signature", "no")
    logging.getLogger("other").debug("hidden")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING imageguard.security: bad_signature: no \(\)\n",
        stream.getvalue(),
    )


def test_configure_root_json(stream: io.StringIO) -> None:
    root = bare_root()
    configure_root(JSON, logging.WARNING, stream=stream)
    assert root.level == logging.WARNING
    logging.getLogger("uvicorn.error").warning("from elsewhere")
    logging.getLogger("uvicorn.error").info("below the level")
    security_event("bad_signature", "no")
    first, second = lines(stream)
    assert first["logger"] == "uvicorn.error" and first["message"] == "from elsewhere"
    assert second["reason"] == "bad_signature"


def test_configure_root_and_configure_together_print_once(stream: io.StringIO) -> None:
    bare_root()
    root_stream = io.StringIO()
    configure_root(JSON, stream=root_stream)
    configure(JSON, stream=stream)
    security_event("bad_signature", "no")
    assert len(lines(stream)) == 1 and root_stream.getvalue() == ""
