"""Shared fixtures: the corpus folder, key material, image builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageguard import Settings
from tests.drivers import ADAPTERS, MakeClient
from tests.redis_server import RedisServer, redis_server
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
        # The suites make hundreds of fills from one client: the default miss
        # budget (120/minute) is tested on its own (tests/test_abuse.py).
        overrides.setdefault("miss_rate", "off")
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


@pytest.fixture(scope="session")
def redis_service() -> Iterator[RedisServer]:
    """One real ``redis-server`` for the session (skips where it is not installed)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_service: RedisServer) -> str:
    """The session's Redis, emptied (FLUSHALL) for this test."""
    redis_service.start()  # a test may have stopped it
    redis_service.flushall()
    return redis_service.url
