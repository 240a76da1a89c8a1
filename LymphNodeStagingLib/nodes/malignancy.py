"""Node malignancy: a small ResNet-like CNN on one patch per detected node, trained from station labels (multiple-
instance learning, ``training/node_mil.py``), and the station probabilities it gives.

Input per node: a cube of ``patch_mm`` (default 32 mm) around the node's centre, resampled at ``patch_spacing``
(default 2 mm: 16^3 voxels), with the channels CT (windowed as the station classifier's), the node's own mask and,
in PET/CT mode, the PET (SUV / 4). CT-only mode (``modality="ct"``) drops the PET channel. Network: a stem
convolution and 5 levels of residual blocks (batch norm, ReLU; every level after the first halves the size), global
max pooling, one linear layer -> malignancy logit.

Station probability from nodes: the pooled (max or noisy-OR) probability of the station's nodes, mapped by the
calibration fitted on the validation patients' stations; a present station without a detected node gets the learned
prior (the share of positive stations among the node-less training stations, per station, shrunk to the overall
share). A node's reported probability is its own network probability through the same calibration: the probability
its station would have if it were the station's only node.

A node classifier checkpoint is an ordinary lnstaging checkpoint of kind "node-classifier" whose manifest holds the
calibration, the prior, the pooling and the threshold (on the calibrated scale) besides the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .. import paths
from ..classifier.calibration import Calibration, calibration_of
from ..classifier.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, register_model_kind
from ..classifier.patches import normalise_ct, normalise_pet, resample_patch
from ..errors import InputError, ModelError, UsageError
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .instances import CT_OUTSIDE_HU, NodeInstance

NODE_CLASSIFIER_KIND = "node-classifier"
#: Bundled node classifiers (trained on phantoms; ``make node-classifier``) per modality.
BUNDLED_NODE_CLASSIFIERS = {"petct": "node_classifier_demo.pt", "ct": "node_classifier_ct_demo.pt"}
MODALITIES = ("petct", "ct")
STATION_POOLINGS = ("max", "noisy_or")
#: Channels of a node patch, in order; CT-only models read the first two.
PATCH_CHANNELS = ("ct", "mask", "pet")


@dataclass
class NodeClassifierConfig:
    """Architecture and input of the node classifier."""

    modality: str = "petct"  # "petct": CT, mask, PET; "ct": CT and mask
    patch_mm: float = 32.0
    patch_spacing: float = 2.0
    channels: tuple[int, ...] = (8, 16, 32, 48, 64)  # one residual block per level (5 levels)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise UsageError(f"node classifier modality must be one of {', '.join(MODALITIES)}, got "
                             f"{self.modality!r}")
        self.patch_mm, self.patch_spacing = float(self.patch_mm), float(self.patch_spacing)
        self.channels = tuple(int(c) for c in self.channels)
        if not (math.isfinite(self.patch_mm) and math.isfinite(self.patch_spacing)) or min(
                self.patch_mm, self.patch_spacing) <= 0:
            raise UsageError(f"node patch size and spacing must be > 0 mm, got {self.patch_mm} and "
                             f"{self.patch_spacing}")
        if not self.channels or min(self.channels) < 1:
            raise UsageError(f"node classifier channels must be positive, got {list(self.channels)}")
        if self.patch_size < 2 ** (len(self.channels) - 1):
            raise UsageError(f"node patch of {self.patch_size} voxels is too small for {len(self.channels)} levels")

    @property
    def patch_size(self) -> int:
        return int(round(self.patch_mm / self.patch_spacing))

    @property
    def in_channels(self) -> int:
        return 3 if self.modality == "petct" else 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> NodeClassifierConfig:
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise UsageError(f"node classifier configuration must hold only {sorted(known)}, got {data!r}")
        return cls(**data)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU; ``stride`` 2 halves the size."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                                  nn.ReLU(inplace=True), nn.Conv3d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm3d(cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class NodeClassifier(nn.Module):
    """Node patches (N, C, S, S, S) -> malignancy logits (N,)."""

    def __init__(self, config: NodeClassifierConfig):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        self.stem = nn.Sequential(nn.Conv3d(config.in_channels, c0, 3, padding=1, bias=False), nn.BatchNorm3d(c0),
                                  nn.ReLU(inplace=True))
        levels, cin = [], c0
        for i, cout in enumerate(config.channels):
            levels.append(ResidualBlock(cin, cout, stride=1 if i == 0 else 2))
            cin = cout
        self.levels = nn.Sequential(*levels)
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config.in_channels
        if x.ndim != 5 or x.shape[1] != c:
            raise UsageError(f"node classifier ({self.config.modality}) expects patches (N, {c}, S, S, S), got "
                             f"{tuple(x.shape)}")
        return self.fc(self.pool(self.levels(self.stem(x))).flatten(1)).squeeze(1)


def _describe(config: NodeClassifierConfig) -> str:
    return (f"node classifier ({config.modality}), {config.patch_size}^3 patches at {config.patch_spacing:g} mm, "
            f"channels {list(config.channels)}")


register_model_kind(NODE_CLASSIFIER_KIND, NodeClassifierConfig.from_dict, NodeClassifier, _describe)


# ------------------------------------------------------------------------------------------------ patches


def node_patches(ct: sitk.Image, instances: sitk.Image, nodes: Sequence[NodeInstance], pet: sitk.Image | None = None,
                 patch_mm: float = 32.0, patch_spacing: float = 2.0) -> np.ndarray:
    """Patches (N, 3, S, S, S) float32 of the nodes: CT (windowed), the node's mask (its id in ``instances``) and the
    PET (SUV / 4; zeros without a PET). A CT-only classifier reads channels 0 and 1."""
    size = int(round(patch_mm / patch_spacing))
    if size < 1:
        raise UsageError(f"node patch of {patch_mm} mm at {patch_spacing} mm is empty")
    for img, name in ((ct, "ct"), (instances, "node instance map")):
        if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
            raise InputError(f"{name} must be a 3D SimpleITK image")
    ct_f = sitk.Cast(ct, sitk.sitkFloat32)
    pet_f = None if pet is None else sitk.Cast(pet, sitk.sitkFloat32)
    ids = sitk.Cast(instances, sitk.sitkFloat32)
    out = np.zeros((len(nodes), len(PATCH_CHANNELS), size, size, size), dtype=np.float32)
    for i, n in enumerate(nodes):
        c = np.asarray(n.centre_mm, dtype=float)
        out[i, 0] = normalise_ct(resample_patch(ct_f, c, size, patch_spacing, None, CT_OUTSIDE_HU))
        lab = resample_patch(ids, c, size, patch_spacing, None, 0.0, sitk.sitkNearestNeighbor)
        out[i, 1] = (np.rint(lab) == n.id).astype(np.float32)
        if pet_f is not None:
            out[i, 2] = normalise_pet(resample_patch(pet_f, c, size, patch_spacing, None, 0.0))
    return out


def station_index_of(nodes: Sequence[NodeInstance]) -> np.ndarray:
    """(N,) station index 0..16 of every node, -1 for a node outside every station."""
    lookup = {name: i for i, name in enumerate(STATION_NAMES)}
    return np.array([lookup.get(n.station, -1) if n.station else -1 for n in nodes], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ station scores


def pool_nodes(probs: np.ndarray, pooling: str = "max") -> float:
    """One station probability from its nodes' probabilities: the maximum, or noisy-OR 1 - prod(1 - p)."""
    p = np.clip(np.asarray(probs, dtype=float), 0.0, 1.0)
    if pooling not in STATION_POOLINGS:
        raise UsageError(f"station pooling must be one of {', '.join(STATION_POOLINGS)}, got {pooling!r}")
    if p.size == 0:
        return float("nan")
    return float(p.max()) if pooling == "max" else float(1.0 - np.prod(1.0 - p))


def pooled_station_scores(node_probs: np.ndarray, node_station: np.ndarray, pooling: str = "max") -> np.ndarray:
    """(17,) pooled probability of each station's nodes; NaN for a station without a node."""
    out = np.full(NUM_STATIONS, np.nan)
    node_probs, node_station = np.asarray(node_probs, float), np.asarray(node_station, int)
    for s in np.unique(node_station[node_station >= 0]):
        out[s] = pool_nodes(node_probs[node_station == s], pooling)
    return out


def learn_prior(has_node: np.ndarray, labels: np.ndarray, strength: float = 5.0) -> np.ndarray:
    """(17,) share of positive stations among the present stations without a detected node (training patients),
    per station shrunk towards the overall share with ``strength`` pseudo-stations. ``has_node`` and ``labels`` are
    (P, 17) for P patients; labels 1 / 0 / -1 (unknown or absent: left out)."""
    has_node, labels = np.asarray(has_node, bool), np.asarray(labels, int)
    use = ~has_node & (labels >= 0)
    overall = (labels[use] == 1).sum() / max(int(use.sum()), 1)
    pos = ((labels == 1) & use).sum(axis=0)
    n = use.sum(axis=0)
    return (pos + strength * overall) / (n + strength)


def station_scores(node_probs: np.ndarray, node_station: np.ndarray, present: np.ndarray, prior: np.ndarray,
                   calibration: Calibration | None = None, pooling: str = "max") -> np.ndarray:
    """(17,) station probabilities: calibrated pooled node probabilities, the prior where a present station has no
    node, 0 where the station is absent from the station map."""
    pooled = pooled_station_scores(node_probs, node_station, pooling)
    if calibration is not None:
        pooled = calibration.apply(pooled)
    out = np.where(np.isnan(pooled), np.asarray(prior, float), pooled)
    return np.where(np.asarray(present, bool), out, 0.0)


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class NodeClassifierModel:
    """A trained node classifier with what its manifest says about using it."""

    network: NodeClassifier
    config: NodeClassifierConfig
    calibration: Calibration = field(default_factory=Calibration)
    prior: np.ndarray = field(default_factory=lambda: np.zeros(NUM_STATIONS))
    pooling: str = "max"
    threshold: float = 0.5
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @torch.no_grad()
    def node_probabilities(self, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Uncalibrated network probabilities (N,) of node patches (N, 3 or C, S, S, S)."""
        return predict_nodes(self.network, patches, batch_size)

    def station_probabilities(self, raw_node_probs: np.ndarray, node_station: np.ndarray,
                              present: np.ndarray) -> np.ndarray:
        """(17,) calibrated station probabilities (see :func:`station_scores`)."""
        return station_scores(raw_node_probs, node_station, present, self.prior, self.calibration, self.pooling)

    def info(self) -> dict:
        out = {"modality": self.config.modality, "pooling": self.pooling, "threshold": self.threshold,
               "calibration": self.calibration.method, "weights_sha256": self.manifest.get("weights_sha256")}
        if self.path is not None:
            out["path"] = str(self.path)
            out["file_sha256"] = file_sha256(self.path)
        return out


@torch.no_grad()
def predict_nodes(network: NodeClassifier, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Network probabilities (N,) of node patches (N, C', S, S, S); the first ``in_channels`` channels are read."""
    x = np.asarray(patches)
    if x.ndim != 5:
        raise UsageError(f"node patches must be (N, C, S, S, S), got {x.shape}")
    if len(x) == 0:
        return np.zeros(0)
    c = network.config.in_channels
    device = next(network.parameters()).device
    was = network.training
    network.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size, :c], dtype=np.float32)).to(device)
            out.append(torch.sigmoid(network(xb)).float().cpu().numpy())
    finally:
        network.train(was)
    return np.concatenate(out).astype(float)


def _parse(path: Path, manifest: dict) -> tuple[Calibration, np.ndarray, str, float]:
    calibration = calibration_of(manifest, f"checkpoint {path}")
    prior = np.asarray(manifest.get("prior", [0.0] * NUM_STATIONS), dtype=float)
    pooling = manifest.get("pooling", "max")
    threshold = float(manifest.get("threshold", 0.5))
    if prior.shape != (NUM_STATIONS,) or np.any(~np.isfinite(prior)) or np.any((prior < 0) | (prior > 1)):
        raise ModelError(f"checkpoint {path}: manifest 'prior' must be {NUM_STATIONS} probabilities")
    if pooling not in STATION_POOLINGS:
        raise ModelError(f"checkpoint {path}: manifest 'pooling' must be one of {', '.join(STATION_POOLINGS)}")
    if not 0.0 <= threshold <= 1.0:
        raise ModelError(f"checkpoint {path}: manifest 'threshold' must be in 0..1, got {threshold}")
    return calibration, prior, pooling, threshold


def verify_node_classifier(path: str | Path) -> dict:
    """Check a node classifier checkpoint (fast) and return its manifest; a ModelError names the file."""
    path = Path(path)
    manifest = load_checkpoint(path, kinds=(NODE_CLASSIFIER_KIND,)).manifest
    _parse(path, manifest)
    return manifest


def load_node_classifier(path: str | Path, device: str = "cpu") -> NodeClassifierModel:
    """A verified node classifier checkpoint in eval mode on ``device``."""
    path = Path(path)
    ckpt = load_checkpoint(path, kinds=(NODE_CLASSIFIER_KIND,))
    calibration, prior, pooling, threshold = _parse(path, ckpt.manifest)
    network = model_from_checkpoint(ckpt).to(device).eval()
    return NodeClassifierModel(network, network.config, calibration, prior, pooling, threshold, ckpt.manifest, path)


def bundled_node_classifier(modality: str = "petct") -> Path | None:
    """The bundled node classifier of ``modality``, when one is installed and pinned; None otherwise."""
    name = BUNDLED_NODE_CLASSIFIERS.get(modality)
    if name is None:
        raise UsageError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    path = paths.bundled_models_dir() / name
    return path if path.is_file() and name in paths.BUNDLED_MODELS else None


def resolve_node_classifier(model: str | Path | None, modality: str = "petct") -> Path | None:
    """The node classifier to use: ``model``, else the bundled one of ``modality`` (None when there is none)."""
    if model is not None and str(model) != "":
        return Path(model)
    return bundled_node_classifier(modality)
