"""The tamper-evident envelope that the disk (L2) and Redis (L3) tiers store.

A stored entry is one byte string::

    b"IGE" | version (1 byte) | header length (4 bytes, big-endian) | header (JSON)
          | tag (32 bytes) | body

The header holds what a hit needs besides the body: content type, ETag,
source path and its hash, ``Last-Modified``, creation time and body length.
The tag is an HMAC-SHA256, under a key derived from the first
``IMAGEGUARD_SECRET_KEY``, over the cache key the entry is stored *under*,
the header and the body (each length-prefixed). So a flipped byte, a
truncation, two swapped entries or an entry sealed with another key all fail
:meth:`Sealer.open`, and a disk or a Redis that someone else can write to
still cannot make imageguard serve bytes it did not produce (DESIGN §7).

Response headers are not stored: they are rebuilt from the record with the
reading instance's settings, so instances with different ``Cache-Control``
settings can share a tier.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..signing import PreparedHMAC

MAGIC = b"IGE"
VERSION = 1
#: Salt of the integrity key (the signing and cache-key salts differ).
INTEGRITY_SALT = b"imageguard.integrity"
#: Salt of the key that authenticates purge messages between instances.
MESSAGE_SALT = b"imageguard.purge-message"
TAG_SIZE = 32
_PREFIX = struct.Struct(">3sBI")
#: A header larger than this is not ours.
MAX_HEADER = 16 * 1024


class IntegrityError(Exception):
    """A stored entry failed its check.

    :param detail: what failed: ``truncated``, ``bad_magic``, ``unknown_version``,
        ``bad_header``, ``bad_tag``, ``length_mismatch``.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def source_hash(path: str) -> str:
    """The hash of a source path: names its variants in the tiers and in ``Surrogate-Key``."""
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Record:
    """What the lower tiers store for one cache key."""

    key: str
    content_type: str
    etag: str
    source_path: str
    last_modified: str | None
    created: float
    body: bytes

    @property
    def source_hash(self) -> str:
        return source_hash(self.source_path)


class Sealer:
    """Seals and opens envelopes, and authenticates purge messages.

    :param secret: the first ``IMAGEGUARD_SECRET_KEY`` (the one that signs).
    """

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        self._tagger = PreparedHMAC(hmac.new(raw, INTEGRITY_SALT, hashlib.sha256).digest())
        self._messages = PreparedHMAC(hmac.new(raw, MESSAGE_SALT, hashlib.sha256).digest())
        #: A short, non-secret name of the key: namespaces what instances share.
        self.fingerprint = hmac.new(raw, b"imageguard.namespace", hashlib.sha256).hexdigest()[:16]

    def _tag(self, key: str, header: bytes, body: bytes) -> bytes:
        key_bytes = key.encode("utf-8", "surrogatepass")
        inner = self._tagger.inner.copy()
        inner.update(struct.pack(">I", len(key_bytes)) + key_bytes)
        inner.update(struct.pack(">I", len(header)) + header)
        inner.update(struct.pack(">Q", len(body)))
        inner.update(body)
        outer = self._tagger.outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def seal(self, record: Record) -> bytes:
        """The envelope of *record*, tagged for the key it is stored under."""
        header = json.dumps(
            {
                "ct": record.content_type,
                "etag": record.etag,
                "src": record.source_path,
                "src_hash": record.source_hash,
                "lm": record.last_modified,
                "created": record.created,
                "len": len(record.body),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        tag = self._tag(record.key, header, record.body)
        return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + tag + record.body

    def open(self, key: str, data: bytes) -> Record:
        """The record in *data*, if it was sealed by this key for *key*.

        :raises IntegrityError: anything else: a changed byte anywhere, a
            truncation, another key, another entry, an unknown version.
        """
        view = memoryview(data)
        if len(view) < _PREFIX.size:
            raise IntegrityError("truncated")
        magic, version, header_len = _PREFIX.unpack_from(view)
        if magic != MAGIC:
            raise IntegrityError("bad_magic")
        if version != VERSION:
            raise IntegrityError("unknown_version")
        if header_len > MAX_HEADER or len(view) < _PREFIX.size + header_len + TAG_SIZE:
            raise IntegrityError("truncated")
        start = _PREFIX.size
        header = bytes(view[start : start + header_len])
        tag = bytes(view[start + header_len : start + header_len + TAG_SIZE])
        body = bytes(view[start + header_len + TAG_SIZE :])
        if not hmac.compare_digest(tag, self._tag(key, header, body)):
            raise IntegrityError("bad_tag")
        try:
            fields: dict[str, Any] = json.loads(header)
            record = Record(
                key=key,
                content_type=str(fields["ct"]),
                etag=str(fields["etag"]),
                source_path=str(fields["src"]),
                last_modified=None if fields["lm"] is None else str(fields["lm"]),
                created=float(fields["created"]),
                body=body,
            )
            declared = int(fields["len"])
        except (ValueError, KeyError, TypeError) as exc:  # tagged by us, so only a bug gets here
            raise IntegrityError("bad_header") from exc
        if declared != len(body):
            raise IntegrityError("length_mismatch")
        return record

    def sign_message(self, payload: bytes) -> bytes:
        """*payload* with a tag in front (purge messages between instances)."""
        return self._messages.digest(payload) + payload

    def open_message(self, message: bytes) -> bytes | None:
        """The payload of a message from :meth:`sign_message`, or ``None`` if forged."""
        if len(message) < TAG_SIZE:
            return None
        tag, payload = message[:TAG_SIZE], message[TAG_SIZE:]
        if not hmac.compare_digest(tag, self._messages.digest(payload)):
            return None
        return payload
