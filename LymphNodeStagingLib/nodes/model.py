"""The node segmentation model as a checkpoint: architecture (S-Net or 3D U-Net), the checkpoint kind "nodes" and
loading for inference.

A node checkpoint is an ordinary lnstaging checkpoint (``classifier/checkpoint.py``: weights-only file, manifest,
sidecar, hashes) of kind "nodes" whose manifest holds:

- ``model_config``: ``{"arch": "snet" | "unet3d", "network": {...}}`` (``SNetConfig`` / ``UNet3DConfig``);
- ``data_config``: the working grid and CT window the network was trained on (``NodeDataConfig``);
- ``threshold``: the probability threshold of the node instances, tuned on the validation patients;
- ``inference``: how the volume is run (U-Net: sliding-window size and overlap; S-Net: slices per batch).

Loading refuses a checkpoint of another kind (a station classifier) with a ModelError naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import paths
from ..classifier.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, register_model_kind
from ..errors import ModelError, UsageError
from .data import NodeDataConfig
from .networks import SNet, SNetConfig, UNet3D, UNet3DConfig

NODE_KIND = "nodes"
ARCHS = ("snet", "unet3d")
#: File name of the bundled node model in the bundled models folder.
BUNDLED_NODE_MODEL = "nodes_demo.pt"
#: Default U-Net training patch and sliding window (z, y, x) in voxels of the working grid.
DEFAULT_PATCH = (32, 96, 96)


@dataclass
class NodeModelConfig:
    """Architecture of a node network: ``arch`` and the network's configuration (default: the published size)."""

    arch: str = "snet"
    network: SNetConfig | UNet3DConfig | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"node network arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        want = SNetConfig if self.arch == "snet" else UNet3DConfig
        if self.network is None:
            self.network = want()
        elif isinstance(self.network, dict):
            self.network = want.from_dict(self.network)
        if not isinstance(self.network, want):
            raise UsageError(f"node network arch {self.arch!r} needs a {want.__name__}, got "
                             f"{type(self.network).__name__}")

    @classmethod
    def sized(cls, arch: str, width: float = 1.0) -> NodeModelConfig:
        """The network of ``arch`` with every channel count scaled by ``width`` (1: the published size)."""
        if not math.isfinite(width) or width <= 0:
            raise UsageError(f"network width must be > 0, got {width}")
        if arch == "snet":
            return cls(arch, SNetConfig(width=width))
        if arch == "unet3d":
            base = UNet3DConfig()
            return cls(arch, UNet3DConfig(channels=tuple(max(2, int(round(c * width))) for c in base.channels)))
        return cls(arch)  # raises for an unknown arch

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (S-Net: in-plane only)."""
        return 4 if self.arch == "snet" else self.network.divisor  # type: ignore[union-attr]

    def to_dict(self) -> dict:
        return {"arch": self.arch, "network": self.network.to_dict()}  # type: ignore[union-attr]

    @classmethod
    def from_dict(cls, data: dict) -> NodeModelConfig:
        if not isinstance(data, dict) or set(data) != {"arch", "network"}:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UsageError(f"node model_config must hold 'arch' and 'network', got {keys}")
        if not isinstance(data["network"], dict):
            raise UsageError("node model_config 'network' must be a mapping")
        return cls(data["arch"], dict(data["network"]))


def build_node_network(config: NodeModelConfig) -> nn.Module:
    """The network of ``config`` (untrained; seed torch first for reproducible weights)."""
    if config.arch == "snet":
        return SNet(config.network)  # type: ignore[arg-type]
    return UNet3D(config.network)  # type: ignore[arg-type]


def _describe(config: NodeModelConfig) -> str:
    net = config.network
    return f"{config.arch} node network, channels {list(net.channels)}" + (  # type: ignore[union-attr]
        f", width {net.width}" if config.arch == "snet" else "")  # type: ignore[union-attr]


register_model_kind(NODE_KIND, NodeModelConfig.from_dict, build_node_network, _describe)


@dataclass
class InferenceConfig:
    """How a volume is run: S-Net slices per batch; U-Net window (z, y, x) and overlap (0..0.9) of the windows."""

    batch_slices: int = 16
    window: tuple[int, int, int] = DEFAULT_PATCH
    overlap: float = 0.5

    def __post_init__(self) -> None:
        self.window = tuple(int(w) for w in self.window)  # type: ignore[assignment]
        if self.batch_slices < 1 or len(self.window) != 3 or min(self.window) < 1:
            raise UsageError(f"invalid node inference settings: batch_slices {self.batch_slices}, window "
                             f"{list(self.window)}")
        if not 0.0 <= float(self.overlap) <= 0.9:
            raise UsageError(f"window overlap must be in 0..0.9, got {self.overlap}")
        self.overlap = float(self.overlap)

    def to_dict(self) -> dict:
        return {"batch_slices": self.batch_slices, "window": list(self.window), "overlap": self.overlap}

    @classmethod
    def from_dict(cls, data: dict | None) -> InferenceConfig:
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - {"batch_slices", "window", "overlap"}:
            raise UsageError(f"node inference settings must hold batch_slices, window, overlap; got {data!r}")
        return cls(**data)


@dataclass
class NodeModel:
    """A node network ready to run, with what it needs from its manifest."""

    network: nn.Module
    config: NodeModelConfig
    data: NodeDataConfig = field(default_factory=NodeDataConfig)
    threshold: float = 0.5
    min_volume_ml: float = 0.0
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def arch(self) -> str:
        return self.config.arch

    def info(self) -> dict:
        """What a result records about the model."""
        out = {"arch": self.arch, "threshold": self.threshold, "min_volume_ml": self.min_volume_ml,
               "working_spacing_mm": list(self.data.spacing), "epoch": self.manifest.get("epoch"),
               "weights_sha256": self.manifest.get("weights_sha256")}
        if self.path is not None:
            out["path"] = str(self.path)
            out["file_sha256"] = file_sha256(self.path)
        return out


def bundled_node_model() -> Path | None:
    """The bundled node model, when one is installed and pinned; None otherwise."""
    path = paths.bundled_models_dir() / BUNDLED_NODE_MODEL
    return path if path.is_file() and BUNDLED_NODE_MODEL in paths.BUNDLED_MODELS else None


def resolve_node_model(model: str | Path | None, required: bool = True) -> Path | None:
    """The checkpoint to use: ``model``, else the bundled node model. Without either: a UsageError saying how to get
    one (``required``), or None (the node step is optional, e.g. in ``assess``)."""
    if model is not None and str(model) != "":
        return Path(model)
    bundled = bundled_node_model()
    if bundled is None:
        if not required:
            return None
        raise UsageError("no node model: none given and the bundled one is missing. Train one with `lnstaging train-nodes "
                         "COHORT.csv --arch snet --out DIR` (the cohort needs a nodes_path column) and pass "
                         "--model DIR/best.pt")
    return bundled


def _parse_manifest(path: Path, manifest: dict) -> tuple[NodeDataConfig, InferenceConfig, float]:
    try:
        data = NodeDataConfig.from_dict(manifest.get("data_config", {}))
        inference = InferenceConfig.from_dict(manifest.get("inference"))
        min_volume = float(manifest.get("min_volume_ml", 0.0))
    except (UsageError, TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint {path}: the manifest's node settings are not valid ({exc})") from None
    if not math.isfinite(min_volume) or min_volume < 0:
        raise ModelError(f"checkpoint {path}: manifest 'min_volume_ml' must be >= 0, got {min_volume}")
    return data, inference, min_volume


def verify_node_model(path: str | Path) -> dict:
    """Check a node checkpoint (fast, nothing is run) and return its manifest; ModelError naming the file."""
    path = Path(path)
    manifest = load_checkpoint(path, kinds=(NODE_KIND,)).manifest
    _parse_manifest(path, manifest)
    return manifest


def load_node_model(path: str | Path, device: str = "cpu") -> NodeModel:
    """A verified node checkpoint as a NodeModel in eval mode on ``device``."""
    path = Path(path)
    ckpt = load_checkpoint(path, kinds=(NODE_KIND,))
    data, inference, min_volume = _parse_manifest(path, ckpt.manifest)
    network = model_from_checkpoint(ckpt).to(device).eval()
    config = NodeModelConfig.from_dict(ckpt.manifest["model_config"])
    threshold = float(ckpt.manifest.get("threshold", 0.5))
    if not 0.0 < threshold <= 1.0:
        raise ModelError(f"checkpoint {path}: a node model's threshold must be in (0, 1], got {threshold}")
    return NodeModel(network, config, data, threshold, min_volume, inference, ckpt.manifest, path)
