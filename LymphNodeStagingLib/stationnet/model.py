"""The station network as a checkpoint: the kind "station_net", the bundled network and loading for inference.

A station network checkpoint is an ordinary lnstaging checkpoint (``classifier/checkpoint.py``: weights-only file,
manifest, sidecar, hashes) of kind "station_net" whose manifest holds ``model_config`` (``StationNetConfig``),
``data_config`` (``StationDataConfig``: working spacing, lung margin, CT window), ``labels`` (what it learnt
from: "truth" or "atlas") and ``region_threshold`` (the probability of the station region above which a voxel is
mapped, tuned on the validation patients: the adaptive re-weighting of the region loss makes the raw probabilities
too high, so 0.5 would map too large a region). Loading refuses a checkpoint of another kind with a ModelError
naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import paths
from ..classifier.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, register_model_kind
from ..errors import ModelError, UsageError
from .data import StationDataConfig
from .network import StationNet, StationNetConfig

STATION_NET_KIND = "station_net"
#: File name of the bundled station network in the bundled models folder.
BUNDLED_STATION_MODEL = "stations_net.pt"


def _describe(config: StationNetConfig) -> str:
    return f"two-head station U-Net, channels {list(config.channels)}"


register_model_kind(STATION_NET_KIND, StationNetConfig.from_dict, StationNet, _describe)


@dataclass
class StationModel:
    """A station network ready to run, with what it needs from its manifest."""

    network: nn.Module
    config: StationNetConfig
    data: StationDataConfig = field(default_factory=StationDataConfig)
    region_threshold: float = 0.5
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    def info(self) -> dict:
        """What a result records about the network."""
        out = {"labels": self.manifest.get("labels"), "working_spacing_mm": list(self.data.spacing),
               "region_threshold": self.region_threshold,
               "epoch": self.manifest.get("epoch"), "weights_sha256": self.manifest.get("weights_sha256")}
        if self.path is not None:
            out["path"] = str(self.path)
            out["file_sha256"] = file_sha256(self.path)
            # the bundled network is trained on synthetic phantoms (like the bundled atlases)
            out["bundled"] = paths.BUNDLED_MODELS.get(BUNDLED_STATION_MODEL) == out["file_sha256"]
        return out


def bundled_station_model() -> Path | None:
    """The bundled station network, when installed and pinned; None otherwise."""
    path = paths.bundled_models_dir() / BUNDLED_STATION_MODEL
    return path if path.is_file() and BUNDLED_STATION_MODEL in paths.BUNDLED_MODELS else None


def resolve_station_model(model: str | Path | None) -> Path:
    """The checkpoint to use: ``model``, else the bundled station network; a UsageError saying how to get one."""
    if model is not None and str(model) != "":
        return Path(model)
    bundled = bundled_station_model()
    if bundled is None:
        raise UsageError("no station network: none given (--station-model) and the bundled one is missing. Train "
                         "one with `lnstaging train-stations COHORT.csv --labels truth|atlas --out DIR` and pass "
                         "--station-model DIR/best.pt")
    return bundled


def _data_config(path: Path, manifest: dict) -> tuple[StationDataConfig, float]:
    try:
        data = StationDataConfig.from_dict(manifest.get("data_config", {}))
        threshold = float(manifest.get("region_threshold", 0.5))
    except (UsageError, TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint {path}: the manifest's data_config is not valid ({exc})") from None
    if not 0.0 < threshold < 1.0:
        raise ModelError(f"checkpoint {path}: manifest 'region_threshold' must be in (0, 1), got {threshold}")
    return data, threshold


def verify_station_model(path: str | Path) -> dict:
    """Check a station network checkpoint (fast, nothing is run) and return its manifest; ModelError naming it."""
    path = Path(path)
    manifest = load_checkpoint(path, kinds=(STATION_NET_KIND,)).manifest
    _data_config(path, manifest)
    return manifest


def load_station_model(path: str | Path | None = None, device: str = "cpu") -> StationModel:
    """A verified station network checkpoint (None: the bundled one) in eval mode on ``device``."""
    path = resolve_station_model(path)
    ckpt = load_checkpoint(path, kinds=(STATION_NET_KIND,))
    data, threshold = _data_config(path, ckpt.manifest)
    network = model_from_checkpoint(ckpt).to(device).eval()
    return StationModel(network, StationNetConfig.from_dict(ckpt.manifest["model_config"]), data, threshold,
                        ckpt.manifest, path)


def check_station_model(model: str | Path | None, device: str = "cpu", parameter: str = "--station-model"
                        ) -> StationModel:
    """Load and verify the station network (``model``, else the bundled one) before any heavy step; a ModelError or
    UsageError naming ``parameter`` and the file."""
    path = resolve_station_model(model)
    if not path.is_file():
        raise ModelError(f"{parameter} {path}: the station network does not exist; pass a checkpoint made by "
                         "`lnstaging train-stations` (its best.pt)")
    try:
        return load_station_model(path, device)
    except ModelError as exc:
        raise ModelError(f"{parameter}: {exc}") from None
