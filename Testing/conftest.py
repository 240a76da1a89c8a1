"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The project's shared folder (reference data) beside the repository; LNS_SHARED_DIR overrides it."""
    return Path(os.environ.get("LNS_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
