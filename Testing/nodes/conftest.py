"""Fixtures of the node pipeline tests: one small phantom cohort with node masks, its cases on a coarse working grid,
and a tiny S-Net trained on them for a few steps (shared by the inference and command-line tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from LymphNodeStagingLib.cohort.table import read_cohort
from LymphNodeStagingLib.nodes.data import NodeDataConfig, load_node_cases, split_by_patient
from LymphNodeStagingLib.nodes.model import NodeModelConfig
from LymphNodeStagingLib.nodes.networks import SNetConfig
from LymphNodeStagingLib.nodes.train import NodeTrainConfig, train_node_network
from LymphNodeStagingLib.phantom import generate_cohort

#: A coarse working grid (4 x 4 x 8 mm, at least 32 voxels in-plane) keeps the tests fast.
TEST_DATA = NodeDataConfig(spacing=(4.0, 4.0, 8.0), min_inplane=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy shared 2-core machine, threads waiting at each op's barrier slow tiny
    networks down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def node_cohort(tmp_path_factory) -> Path:
    """A 4-patient small phantom cohort (with nodes_path)."""
    return generate_cohort(tmp_path_factory.mktemp("node-cohort"), patients=4, seed=5, size="small")


@pytest.fixture(scope="session")
def node_data_config() -> NodeDataConfig:
    return TEST_DATA


@pytest.fixture(scope="session")
def node_cases(node_cohort):
    return load_node_cases(read_cohort(node_cohort).usable_rows(), TEST_DATA)


@pytest.fixture(scope="session")
def trained_snet(node_cases, tmp_path_factory):
    """A tiny S-Net trained for 2 epochs of 3 steps (its checkpoint folder and result)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, val = split_by_patient(node_cases.cases, 0.25, seed=0)
        out = tmp_path_factory.mktemp("snet-model")
        result = train_node_network(train, val, out, NodeModelConfig("snet", SNetConfig.tiny()), TEST_DATA,
                                    NodeTrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=8, seed=1))
    finally:
        torch.set_num_threads(threads)
    return out, result
