"""Signed image URLs (itsdangerous).

Use :class:`URLSigner` to mint and check the ``s`` parameter of a guarded URL.
The signed value is the *canonical form* of the request (DESIGN §6): the
normalised path, ``?``, then the signed parameters sorted by name as ``k=v``
joined by ``&`` (``e`` included when present, ``s`` never)::

    /static/cat.jpg?fmt=webp&w=320

The signature is an itsdangerous HMAC-SHA256 signature with the salt
``imageguard.url``. ``IMAGEGUARD_SECRET_KEY`` lists keys newest first: the first
signs, every key verifies, so keys can be rotated without breaking URLs that
are already in pages and CDNs.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence

from itsdangerous import Signer
from itsdangerous.encoding import want_bytes
from itsdangerous.signer import HMACAlgorithm

#: itsdangerous salt: separates URL signatures from any other use of the key.
SALT = b"imageguard.url"
#: Length of ``s``: URL-safe base64 of a SHA-256 digest, without padding.
SIGNATURE_LENGTH = 43
#: Salt of the cache-key HMAC, so a cache key can never double as a URL signature.
KEY_SALT = b"imageguard.key"


#: The RFC 2104 pad tables, as CPython's ``hmac`` module builds them.
_TRANS_36: bytes = bytes(x ^ 0x36 for x in range(256))
_TRANS_5C: bytes = bytes(x ^ 0x5C for x in range(256))
#: Standard to URL-safe base64 alphabet (what ``base64.urlsafe_b64encode`` does).
_URLSAFE: bytes = bytes.maketrans(b"+/", b"-_")


class PreparedHMAC:
    """HMAC-SHA256 of one key, with the key's inner and outer states hashed once.

    This is RFC 2104 exactly as CPython's pure-Python ``hmac.HMAC`` does it
    (``_init_old``): pad the key to the block size, hash ``key ^ ipad`` and
    ``key ^ opad`` once, and per message copy both states. Copying two SHA-256
    states costs about a third of ``hmac.new`` or of copying an OpenSSL
    ``HMAC_CTX``, and signing is on every uncached request. Tests check it
    against ``hmac.new`` for keys and messages of every length class.
    """

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        #: SHA-256 states after ``key ^ ipad`` and ``key ^ opad``; copy, never update.
        self.inner = hashlib.sha256(key.translate(_TRANS_36))
        self.outer = hashlib.sha256(key.translate(_TRANS_5C))

    def digest(self, message: bytes) -> bytes:
        """``hmac.new(key, message, sha256).digest()``."""
        inner = self.inner.copy()
        inner.update(message)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def hexdigest(self, message: bytes) -> str:
        """``hmac.new(key, message, sha256).hexdigest()``."""
        inner = self.inner.copy()
        inner.update(message)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class _KeyedHMACAlgorithm(HMACAlgorithm):
    """itsdangerous's HMAC-SHA256 with each key's HMAC state prepared once.

    Same bytes as :class:`HMACAlgorithm` (a test checks both agree).
    """

    def __init__(self) -> None:
        super().__init__(hashlib.sha256)
        self._states: dict[bytes, PreparedHMAC] = {}

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = PreparedHMAC(key)
        return state.digest(value)


class _DerivedKeySigner(Signer):
    """An itsdangerous :class:`Signer` that derives each key once.

    The stock signer re-derives the HMAC key from the secret on every call;
    a cache hit must stay cheap, so the derived keys are memoised.
    """

    def __init__(self, secret_keys: Sequence[bytes]) -> None:
        super().__init__(
            list(secret_keys),
            salt=SALT,
            sep=".",
            key_derivation="hmac",
            digest_method=hashlib.sha256,
            algorithm=_KeyedHMACAlgorithm(),
        )
        self._derived: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        raw = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        derived = self._derived.get(raw)
        if derived is None:
            derived = super().derive_key(raw)
            self._derived[raw] = derived
        return derived


def canonical_form(path: str, params: Mapping[str, str]) -> str:
    """The string that is signed and keyed for *path* with *params*.

    :param path: the normalised, decoded request path.
    :param params: signed parameters (never ``s``), already in canonical spelling.
    """
    if not params:
        return path
    return path + "?" + "&".join(f"{name}={params[name]}" for name in sorted(params))


class URLSigner:
    """Signs and verifies canonical URL forms with one or more secret keys.

    :param keys: secret keys, newest first (the first signs, all verify).
    """

    def __init__(self, keys: Iterable[str | bytes]) -> None:
        ordered = [want_bytes(k) for k in keys]
        if not ordered:
            raise ValueError("URLSigner needs at least one key")
        # itsdangerous wants the newest key *last*; our settings list it first.
        self._signer = _DerivedKeySigner(list(reversed(ordered)))
        # Derived keys, newest first, for verification (derived once, here).
        self._verify_keys = [PreparedHMAC(self._signer.derive_key(k)) for k in ordered]
        self._key_hmac = PreparedHMAC(hmac.new(ordered[0], KEY_SALT, hashlib.sha256).digest())

    def signature(self, canonical: str) -> str:
        """The ``s`` value for *canonical* (URL-safe base64, no padding)."""
        return self._signer.get_signature(canonical).decode("ascii")

    def verify(self, canonical: str, signature: str) -> bool:
        """Whether *signature* is valid for *canonical* under any of the keys.

        The same check as itsdangerous's ``Signer.verify_signature`` (same derived
        keys, algorithm and encoding; a test compares both), done on the encoded
        form so that a request does not pay for decoding and re-wrapping.
        """
        value = canonical.encode("utf-8", "surrogatepass")
        # itsdangerous's encoding is URL-safe base64 without padding; the padding
        # is put back on the given side so each key costs one b2a_base64 call.
        given = signature.encode("ascii", "replace") + b"="
        compare, encode = hmac.compare_digest, binascii.b2a_base64
        for key in self._verify_keys:  # PreparedHMAC.digest, inlined: this runs per request
            inner = key.inner.copy()
            inner.update(value)
            outer = key.outer.copy()
            outer.update(inner.digest())
            if compare(encode(outer.digest(), newline=False).translate(_URLSAFE), given):
                return True
        return False

    def cache_key(self, material: str) -> str:
        """An HMAC of *material* under the signing key: the cache key.

        Derived from the first key only, so every instance sharing the key
        agrees on keys; clients cannot compute or choose one.
        """
        inner = self._key_hmac.inner.copy()  # PreparedHMAC.hexdigest, inlined: per request
        inner.update(material.encode("utf-8", "surrogatepass"))
        outer = self._key_hmac.outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()
