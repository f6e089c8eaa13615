"""Shared fixtures: the corpus folder, key material, image builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageguard import Settings
from tests.drivers import ADAPTERS, MakeClient
from tests.support import SECRET, Upstream

#: ../shared/corpus relative to the repository root (absent in a user's fresh clone).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared attack/malformed-input corpus; skips the test where it is absent."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus not found: corpus tests need the shared corpus beside the repo")
    return CORPUS


@pytest.fixture(params=sorted(ADAPTERS))
def make_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    driver = ADAPTERS[request.param]
    made: list[Any] = []

    def make(upstream: Upstream, **overrides: Any) -> Any:
        overrides.setdefault("secret_key", SECRET)
        client = driver(upstream, Settings(**overrides))
        made.append(client)
        return client

    yield make
    for client in made:
        if hasattr(client, "close"):
            client.close()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()
