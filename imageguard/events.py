"""Security events: one log record per rejection, removal or integrity failure.

Records go to the ``imageguard.security`` logger at WARNING with the request
facts under ``record.imageguard`` (a dict), so a JSON formatter can emit them as
fields. The library never configures logging; ``imageguard serve`` does.
"""

from __future__ import annotations

import logging
from typing import Any

#: Logger for security events (rejections, removals, integrity failures).
security_logger = logging.getLogger("imageguard.security")
#: Logger for operational messages (start-up warnings, upstream errors).
logger = logging.getLogger("imageguard")


def security_event(reason: str, message: str, **facts: Any) -> None:
    """Log one security event.

    :param reason: the reason code (also sent as ``X-ImageGuard-Reason``).
    :param message: a short human-readable explanation.
    :param facts: request facts (path, client, status, key prefix, declared and
        sniffed type, sizes); ``None`` values are left out.
    """
    fields = {"reason": reason, **{k: v for k, v in facts.items() if v is not None}}
    if reason == "integrity_failure":
        from .metrics import METRICS  # imports nothing heavy; no-op without prometheus_client

        METRICS.integrity_failure(str(facts.get("tier", "other")))
    security_logger.warning(
        "%s: %s (%s)",
        reason,
        message,
        " ".join(f"{k}={v}" for k, v in fields.items() if k != "reason"),
        extra={"imageguard": fields},
    )
