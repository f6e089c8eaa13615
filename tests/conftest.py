"""Shared fixtures: the corpus folder, key material, image builders."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared/corpus relative to the repository root (absent in a user's fresh clone).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared attack/malformed-input corpus; skips the test where it is absent."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus not found: corpus tests need the shared corpus beside the repo")
    return CORPUS
