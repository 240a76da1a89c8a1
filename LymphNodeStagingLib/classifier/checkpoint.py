"""Model checkpoints: weights plus a manifest (config, data fingerprint, seeds, versions, metrics), verified on load.

A checkpoint is one ``.pt`` file holding only tensors and plain Python values, read with
``torch.load(weights_only=True)`` (no pickled code):
    {"format": "lnstaging-checkpoint", "format_version": 1, "manifest": {...}, "state_dict": {...},
     "training_state": {...} | None}
The manifest records ``weights_sha256``, a hash of the weights, which is checked on every load. Next to the file a
human-readable ``<name>.json`` holds the same manifest and the sha256 of the ``.pt`` file; when present it must
agree. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import LNSError, ModelError
from ..io.files import atomic_path, write_json

FORMAT = "lnstaging-checkpoint"
FORMAT_VERSION = 1
MODEL_KINDS = ("station", "staging")


@dataclass
class Checkpoint:
    path: Path
    manifest: dict
    state_dict: dict[str, torch.Tensor]
    training_state: dict | None


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the weights: names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)] + ".json" if path.suffix else path.name + ".json")


def environment_versions() -> dict[str, str]:
    import SimpleITK as sitk

    return {"lnstaging": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "SimpleITK": sitk.Version.VersionString(), "python": platform.python_version()}


def _json_safe(obj: Any) -> Any:
    """Round-trip through JSON so that the manifest holds only plain values (as weights_only requires)."""
    return json.loads(json.dumps(obj, default=str))


def save_checkpoint(path: str | Path, model: nn.Module, manifest: dict, training_state: dict | None = None,
                    sidecar: bool = True) -> Path:
    """Write model weights + manifest (+ optional optimiser/scheduler state for resuming) atomically."""
    path = Path(path)
    kind = manifest.get("kind")
    if kind not in MODEL_KINDS:
        raise ModelError(f"checkpoint manifest 'kind' must be one of {MODEL_KINDS}, got {kind!r}")
    if "model_config" not in manifest:
        raise ModelError("checkpoint manifest needs 'model_config' (the architecture of the weights)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    man = _json_safe({**manifest, "format": FORMAT, "format_version": FORMAT_VERSION,
                      "versions": manifest["versions"] if "versions" in manifest else environment_versions(),
                      "weights_sha256": weights_sha256(state)})
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "manifest": man, "state_dict": state,
               "training_state": training_state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if sidecar:
        write_json(sidecar_path(path), {"checkpoint": path.name, "file_sha256": file_sha256(path), "manifest": man})
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read and verify a checkpoint (torch.load with weights_only=True). Raises ModelError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist (expected a .pt file written by lnstaging)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unreadable, truncated, or holds pickled objects
        raise ModelError(f"checkpoint {path} cannot be read as a weights-only torch file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"checkpoint {path}: not an lnstaging checkpoint (expected format {FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"checkpoint {path}: format_version {payload.get('format_version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    manifest, state = payload.get("manifest"), payload.get("state_dict")
    if not isinstance(manifest, dict) or not isinstance(state, dict):
        raise ModelError(f"checkpoint {path}: missing 'manifest' or 'state_dict'")
    if verify:
        expected = manifest.get("weights_sha256")
        actual = weights_sha256(state)
        if expected != actual:
            raise ModelError(f"checkpoint {path}: weights do not match the manifest's weights_sha256 "
                                  f"(expected {expected}, got {actual}); the file was modified or is corrupt")
        side = sidecar_path(path)
        if side.is_file():
            try:
                info = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelError(f"checkpoint manifest {side} is not valid JSON: {exc}") from None
            if _canonical(info.get("manifest")) != _canonical(manifest):  # NaN-safe comparison
                raise ModelError(f"checkpoint manifest {side} differs from the manifest inside {path}; "
                                      "one of them was edited or they belong to different checkpoints")
            if info.get("file_sha256") not in (None, file_sha256(path)):
                raise ModelError(f"checkpoint {path}: file sha256 differs from {side}; the file was modified")
    return Checkpoint(path, manifest, state, payload.get("training_state"))


def _canonical(obj: Any) -> str:
    """JSON text with sorted keys: compares manifests (NaN metrics included, which never equal themselves)."""
    return json.dumps(obj, sort_keys=True, default=str)


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Build the model the manifest describes and load the weights (strict)."""
    from .model import ModelConfig, build_model

    man = ckpt.manifest
    if man.get("kind") not in MODEL_KINDS:
        raise ModelError(f"checkpoint {ckpt.path}: manifest 'kind' must be one of {MODEL_KINDS}, "
                              f"got {man.get('kind')!r}")
    try:
        config = ModelConfig.from_dict(dict(man["model_config"]))
        model = build_model(man["kind"], config)
        model.load_state_dict(ckpt.state_dict, strict=True)
    except KeyError as exc:
        raise ModelError(f"checkpoint {ckpt.path}: manifest lacks {exc}") from None
    except (RuntimeError, LNSError, TypeError) as exc:
        raise ModelError(f"checkpoint {ckpt.path}: weights do not fit the manifest's model_config "
                              f"({str(exc).splitlines()[0]})") from None
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Verified model in eval mode on ``device`` and its manifest."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model = model_from_checkpoint(ckpt).to(device)
    model.eval()
    return model, ckpt.manifest
