"""Shared pytest fixtures (the lymph node ones over ``node_fixtures``: one tiny node model per session)."""

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


@pytest.fixture(scope="session")
def node_cohort(tmp_path_factory) -> Path:
    """A 4-patient small phantom cohort (with nodes_path)."""
    from node_fixtures import make_node_cohort

    return make_node_cohort(tmp_path_factory.mktemp("node-cohort"))


@pytest.fixture(scope="session")
def node_cases(node_cohort):
    from node_fixtures import load_cases

    return load_cases(node_cohort)


@pytest.fixture(scope="session")
def trained_snet(node_cases, tmp_path_factory):
    """A tiny S-Net trained for 2 epochs of 3 steps on the node cohort (its checkpoint folder and result)."""
    from node_fixtures import train_tiny_snet

    out = tmp_path_factory.mktemp("snet-model")
    return out, train_tiny_snet(node_cases, out)
