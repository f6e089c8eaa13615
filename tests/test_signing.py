"""Signing: itsdangerous-compatible signatures, rotation, cache keys."""

from __future__ import annotations

import hashlib

import pytest
from itsdangerous import Signer

from imageguard.signing import SALT, URLSigner, canonical_form

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
