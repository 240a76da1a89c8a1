"""Fixtures of the node pipeline tests: one intra-op thread, the coarse working grid. The cohort, its cases and the
tiny trained S-Net are session fixtures of ``Testing/conftest.py`` (over ``node_fixtures``), shared with the assessment
and Slicer bridge tests."""

from __future__ import annotations

import pytest
from node_fixtures import TEST_DATA, torch_threads

from LymphNodeStagingLib.nodes.data import NodeDataConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy shared 2-core machine, threads waiting at each op's barrier slow tiny
    networks down many times."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def node_data_config() -> NodeDataConfig:
    return TEST_DATA
