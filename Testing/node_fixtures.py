"""Lymph node test material shared by the node, assessment and Slicer bridge tests: a small phantom cohort with node
masks, a tiny S-Net trained on it for a few steps (real training, seconds on one CPU thread; its detections are
rough, which is all the integration tests need), and spherical nodes measured by the library on any CT grid.

The pytest fixtures over these (``node_cohort``, ``node_cases``, ``trained_snet``) live in ``Testing/conftest.py``,
so that one training serves the whole session."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeStagingLib.nodes.data import NodeDataConfig

#: A coarse working grid (4 x 4 x 8 mm, at least 32 voxels in-plane) keeps the tests fast.
TEST_DATA = NodeDataConfig(spacing=(4.0, 4.0, 8.0), min_inplane=32)


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` intra-op threads: on a busy shared machine, threads waiting at each op's barrier slow tiny
    networks down many times."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_node_cohort(folder: Path) -> Path:
    """A 4-patient small phantom cohort (with nodes_path); returns its cohort CSV."""
    from LymphNodeStagingLib.phantom import generate_cohort

    return generate_cohort(folder, patients=4, seed=5, size="small")


def load_cases(cohort_csv: Path):
    """The cohort's node cases on the TEST_DATA working grid."""
    from LymphNodeStagingLib.cohort.table import read_cohort
    from LymphNodeStagingLib.nodes.data import load_node_cases

    return load_node_cases(read_cohort(cohort_csv).usable_rows(), TEST_DATA)


def train_tiny_snet(cases, out: Path):
    """A tiny S-Net trained for 2 epochs of 3 steps on ``cases`` (3 patients train, 1 validates; the threshold is
    tuned on it); returns the NodeTrainingResult (``.checkpoint``: best.pt)."""
    from LymphNodeStagingLib.nodes.data import split_by_patient
    from LymphNodeStagingLib.nodes.model import NodeModelConfig
    from LymphNodeStagingLib.nodes.networks import SNetConfig
    from LymphNodeStagingLib.nodes.train import NodeTrainConfig, train_node_network

    with torch_threads(1):
        train, val = split_by_patient(cases.cases, 0.25, seed=0)
        return train_node_network(train, val, out, NodeModelConfig("snet", SNetConfig.tiny()), TEST_DATA,
                                  NodeTrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=8, seed=1))


def sphere_nodes(ct: sitk.Image, pet: sitk.Image | None, stations: sitk.Image | None,
                 spheres: Sequence[tuple[Sequence[float], float]]) -> tuple[sitk.Image, list[dict]]:
    """Spherical lymph nodes (centre as an LPS point in mm, radius in mm) on the grid of ``ct``, found and measured by
    the library (``find_nodes``: station, SUV, axes); returns the instance map and the node records
    (``NodeInstance.to_dict``, as ``CaseResult.nodes`` holds them)."""
    from LymphNodeStagingLib.nodes.instances import find_nodes

    size = ct.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    origin = np.asarray(ct.GetOrigin())
    matrix = np.asarray(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    points = (idx @ matrix.T + origin).reshape(*size, 3).transpose(2, 1, 0, 3)  # (z, y, x, xyz)
    probability = np.zeros(points.shape[:3], np.float32)
    for centre, radius in spheres:
        d2 = ((points - np.asarray(centre, float)) ** 2).sum(axis=-1)
        probability[d2 <= radius ** 2] = 0.9
    image = sitk.GetImageFromArray(probability)
    image.CopyInformation(ct)
    instances, nodes = find_nodes(image, ct, pet=pet, stations=stations)
    return instances, [n.to_dict() for n in nodes]


def tiny_node_classifier(path: Path, modality: str = "petct", seed: int = 0) -> Path:
    """An untrained tiny node classifier checkpoint (seeded weights, identity calibration, prior 0.05, threshold
    0.5): real network code and checkpoint format, probabilities without meaning."""
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.nodes.malignancy import NODE_CLASSIFIER_KIND, NodeClassifier, NodeClassifierConfig

    torch.manual_seed(seed)
    cfg = NodeClassifierConfig(modality, patch_mm=16.0, patch_spacing=2.0, channels=(2, 4, 4, 4))
    manifest = {"kind": NODE_CLASSIFIER_KIND, "model_config": cfg.to_dict(), "prior": [0.05] * 17,
                "pooling": "max", "threshold": 0.5, "calibration": {"method": "identity"}}
    return save_checkpoint(path, NodeClassifier(cfg).eval(), manifest)
