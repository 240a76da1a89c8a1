"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every test session gets its own cache folder (demo atlas set, station-map store), so that tests never read
    or fill the user's cache."""
    folder = tmp_path_factory.mktemp("lnstaging-cache")
    previous = os.environ.get("LNSTAGING_CACHE")
    os.environ["LNSTAGING_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("LNSTAGING_CACHE", None)
    else:
        os.environ["LNSTAGING_CACHE"] = previous


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
