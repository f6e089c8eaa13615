"""Signing: itsdangerous-compatible signatures, rotation, cache keys."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import Signer

from imageguard.signing import SALT, PreparedHMAC, URLSigner, canonical_form

NEW, OLD = "new-key-0123456789abcdef", "old-key-0123456789abcdef"


@pytest.mark.parametrize("value", ["/a.png", "/a.png?fmt=webp&w=320", "/caf\u00e9.png?e=1700000000"])
def test_signatures_are_stock_itsdangerous(value: str) -> None:
    # The prepared-HMAC algorithm must give exactly what itsdangerous gives.
    stock = Signer(NEW, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256)
    ours = URLSigner([NEW, OLD])
    assert ours.signature(value) == stock.get_signature(value).decode()
    assert stock.verify_signature(value, ours.signature(value))
    assert ours.verify(value, stock.get_signature(value).decode())


def test_rotation_first_signs_all_verify() -> None:
    rotated, old = URLSigner([NEW, OLD]), URLSigner([OLD])
    assert rotated.verify("/a", old.signature("/a"))
    assert not URLSigner([NEW]).verify("/a", old.signature("/a"))
    assert rotated.signature("/a") == URLSigner([NEW]).signature("/a")


def test_cache_key_is_keyed_and_distinct_from_signatures() -> None:
    a, b = URLSigner([NEW]), URLSigner([OLD])
    assert a.cache_key("x") != b.cache_key("x")
    assert a.cache_key("x") == URLSigner([NEW, OLD]).cache_key("x")  # the first key keys
    assert a.cache_key("x") != a.cache_key("y")


def test_canonical_form_sorts() -> None:
    assert canonical_form("/a", {"w": "1", "fmt": "png"}) == "/a?fmt=png&w=1"
    assert canonical_form("/a", {}) == "/a"


# Keys shorter than, equal to and longer than SHA-256's 64-byte block (longer keys are hashed first).
@given(key=st.binary(min_size=0, max_size=200), message=st.binary(max_size=300))
def test_prepared_hmac_is_stdlib_hmac(key: bytes, message: bytes) -> None:
    prepared = PreparedHMAC(key)
    assert prepared.digest(message) == hmac.new(key, message, hashlib.sha256).digest()
    assert prepared.hexdigest(message) == hmac.new(key, message, hashlib.sha256).hexdigest()
    assert prepared.digest(message) == prepared.digest(message)  # the prepared states are never consumed


@pytest.mark.parametrize("length", [63, 64, 65])
def test_prepared_hmac_block_boundary(length: int) -> None:
    key = bytes(range(length))
    assert PreparedHMAC(key).digest(b"m") == hmac.new(key, b"m", hashlib.sha256).digest()


def test_verify_accepts_only_the_exact_encoding() -> None:
    # Other spellings of the same digest must not verify: the standard base64
    # alphabet, padding, other trailing bits, case, surrounding whitespace.
    signer = URLSigner([NEW])
    canonical = next(c for c in (f"/a{i}.png" for i in range(200)) if set(signer.signature(c)) & set("-_"))
    good = signer.signature(canonical)
    assert signer.verify(canonical, good)
    # The last of 43 characters carries 4 bits of the digest and 2 zero bits: flipping
    # its lowest bit gives a spelling that a lenient decoder maps to the same digest.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = good[:-1] + alphabet[alphabet.index(good[-1]) ^ 1]
    assert base64.urlsafe_b64decode(sibling + "=") == base64.urlsafe_b64decode(good + "=")
    for forged in (
        good.replace("-", "+").replace("_", "/"),
        good + "=",
        good + " ",
        " " + good,
        sibling,
        good.swapcase(),
        good[:-1],
        good + "A",
        good.encode().decode() + "\u00e9",
    ):
        assert forged != good
        assert not signer.verify(canonical, forged), forged
