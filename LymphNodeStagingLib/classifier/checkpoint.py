"""Model checkpoints: weights plus a manifest (config, data fingerprint, seeds, versions, metrics), verified on load.

A checkpoint is one ``.pt`` file holding only tensors and plain Python values, read with
``torch.load(weights_only=True)`` (no pickled code is ever run):
    {"format": "lnstaging-checkpoint", "format_version": 1, "manifest": {...}, "state_dict": {...},
     "training_state": {...} | None}
Next to the file a human-readable ``<name>.json`` (the sidecar) holds the same manifest and the sha256 of the ``.pt``
file. Files are written atomically.

Loading is strict and fast (well under a second; no model is run), so a caller can refuse a bad ``--model`` before
any heavy work (``verify_model``). A file is refused with a ``ModelError`` naming it when it is missing, truncated
or not a checkpoint made by ``lnstaging train``, holds pickled objects, has another format or version, a ``kind``
that is not known (``MODEL_KINDS`` or registered) or not one the caller accepts, a ``model_config`` that does not
build, weights whose hash differs from the manifest's
``weights_sha256``, non-finite weights, tensors whose names, shapes or dtypes do not fit the architecture of
``model_config``, a ``threshold`` outside 0..1, or a sidecar that disagrees with it.

Kinds: the classifier's own kinds are ``MODEL_KINDS`` ("station", "staging"); a higher layer adds its kind with
``register_model_kind`` (how its ``model_config`` is parsed, how the model is built and described). Loading accepts
the classifier's kinds unless the caller names others (``kinds=``), so a node segmentation checkpoint is never taken
for a station classifier, nor the other way round.

What this guarantees:

- **User models: integrity.** The embedded ``weights_sha256`` detects silent corruption (a damaged copy, a changed
  weight), and the sidecar, when present, also pins the file's bytes. Both travel with the weights, so a file whose
  weights were changed and whose embedded hash was recomputed (with the sidecar removed or rewritten) cannot be
  told from a genuine one without an outside reference: compare the file's sha256 (recorded in every assessment
  result) with the one published by the model's author.
- **Bundled models: authenticity.** Their file hashes are pinned in the library (``paths.BUNDLED_MODELS``). A
  checkpoint is taken for a bundled model when its file name is a bundled model's name (wherever it lies), when it
  lies in the bundled models folder, or when its manifest says ``"bundled": "<name>"``; it then loads only when its
  file sha256 is the pinned one. Any ``.pt`` file in the bundled models folder must be pinned.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, paths
from ..errors import LNSError, ModelError
from ..io.files import atomic_path, write_json

FORMAT = "lnstaging-checkpoint"
FORMAT_VERSION = 1
#: The classifier's own kinds (built by ``classifier.model.build_model``); the default of every loader.
MODEL_KINDS = ("station", "staging")


@dataclass(frozen=True)
class ModelKind:
    """A checkpoint kind added by a higher layer: how its ``model_config`` becomes a configuration
    (``parse_config``, raising an LNSError, TypeError or ValueError when invalid), the model built from it
    (``build``) and the few words that name the architecture in messages (``describe``)."""

    name: str
    parse_config: Callable[[dict], Any]
    build: Callable[[Any], nn.Module]
    describe: Callable[[Any], str]


_REGISTERED: dict[str, ModelKind] = {}


def register_model_kind(name: str, parse_config: Callable[[dict], Any], build: Callable[[Any], nn.Module],
                        describe: Callable[[Any], str] | None = None) -> ModelKind:
    """Make checkpoints of kind ``name`` savable and loadable (registering the same name again replaces it)."""
    if not isinstance(name, str) or not name or name in MODEL_KINDS:
        raise ModelError(f"model kind {name!r} cannot be registered (the built-in kinds are {MODEL_KINDS})")
    entry = ModelKind(name, parse_config, build, describe or (lambda config: f"{name} model"))
    _REGISTERED[name] = entry
    return entry


def model_kinds() -> tuple[str, ...]:
    """Every known kind: the built-in ``MODEL_KINDS`` and the registered ones."""
    return MODEL_KINDS + tuple(_REGISTERED)


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
    """Write model weights + manifest (+ optional optimiser/scheduler state for resuming) atomically.

    The manifest needs ``kind`` and the ``model_config`` the weights were built from; both are checked against the
    weights here, so that every written checkpoint loads.
    """
    path = Path(path)
    kind = manifest.get("kind")
    if kind not in model_kinds():
        raise ModelError(f"checkpoint {path}: manifest 'kind' must be one of {model_kinds()}, got {kind!r}")
    if "model_config" not in manifest:
        raise ModelError(f"checkpoint {path}: manifest needs 'model_config' (the architecture of the weights)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    man = _json_safe({**manifest, "format": FORMAT, "format_version": FORMAT_VERSION,
                      "versions": manifest["versions"] if "versions" in manifest else environment_versions(),
                      "weights_sha256": weights_sha256(state)})
    _check_architecture(path, kind, man["model_config"], state)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "manifest": man, "state_dict": state,
               "training_state": training_state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if sidecar:
        write_json(sidecar_path(path), {"checkpoint": path.name, "file_sha256": file_sha256(path), "manifest": man})
    return path


# -- bundled models: pinned file hashes ----------------------------------------------------------------------------


def _pinned_name(name: str) -> str | None:
    """The bundled model called ``name`` (case-insensitive, ``.pt`` optional), or None."""
    lower = name.lower() if name.lower().endswith(".pt") else name.lower() + ".pt"
    return next((pinned for pinned in paths.BUNDLED_MODELS if pinned.lower() == lower), None)


def _in_bundled_folder(path: Path) -> bool:
    return path.resolve().parent == paths.bundled_models_dir().resolve()


def bundled_model_name(path: str | Path, manifest: dict | None = None) -> str | None:
    """The bundled model a checkpoint is taken for, or None for a user model.

    A checkpoint is a bundled model when its file name (or the name of the file a link points to) is a bundled
    model's name, when it lies in the bundled models folder (then its own name, pinned or not), or when its manifest
    says ``"bundled": "<name>"``. Such a file loads only when its sha256 is the one pinned in
    ``paths.BUNDLED_MODELS``.
    """
    path = Path(path)
    for name in (path.name, path.resolve().name):
        pinned = _pinned_name(name)
        if pinned is not None:
            return pinned
    if _in_bundled_folder(path):
        return path.resolve().name
    claim = manifest.get("bundled") if isinstance(manifest, dict) else None
    if claim is not None:
        return _pinned_name(str(claim)) or str(claim)
    return None


def check_bundled(path: str | Path, name: str) -> None:
    """Refuse ``path`` (a ModelError) unless its file sha256 is the one pinned for the bundled model ``name``."""
    path = Path(path)
    expected = paths.BUNDLED_MODELS.get(name)
    if expected is None:
        raise ModelError(f"checkpoint {path} is taken for the bundled model {name!r}, which is not pinned in "
                         f"LymphNodeStagingLib/paths.py BUNDLED_MODELS (pinned: {sorted(paths.BUNDLED_MODELS)}); "
                         "a new bundled model needs its sha256 there, and a model of your own must lie outside the "
                         "bundled models folder, under another name and without a 'bundled' manifest field")
    actual = file_sha256(path)
    if actual != expected:
        where = (Path("LymphNodeStagingLib") / "resources" / paths.DEMO_MODEL.parent / name).as_posix()
        raise ModelError(f"checkpoint {path} is the bundled model {name}, but the file was changed: its sha256 is "
                         f"{actual}, the pinned one {expected}. Restore it by reinstalling LymphNodeStaging "
                         f"(pip install --force-reinstall lymphnodestaging) or, in a source checkout, with "
                         f"`git checkout -- {where}`; a model of your own needs another file name and no 'bundled' "
                         "manifest field, and a retrained bundled model must update its pin in "
                         "LymphNodeStagingLib/paths.py BUNDLED_MODELS")


# -- loading -----------------------------------------------------------------------------------------------------

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unreadable(path: Path, exc: Exception) -> ModelError:
    """The ModelError for a file torch.load refused. torch's own text is not passed on: it advises loading with
    pickled code enabled, which a checkpoint made by lnstaging never needs."""
    if isinstance(exc, PermissionError):
        return ModelError(f"checkpoint {path} cannot be opened: permission denied")
    text = str(exc)
    found = _UNSUPPORTED_GLOBAL.search(text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return ModelError(f"checkpoint {path} holds a pickled Python object ({found.group(1)}) and is refused: a "
                          "checkpoint made by `lnstaging train` holds only tensors and plain values and is read by a "
                          "weights-only load, which never runs code from the file")
    if isinstance(exc, EOFError):
        reason = "the file ends early"
    elif isinstance(exc, RuntimeError) and ("zip" in text or "central directory" in text):
        reason = "its zip archive is incomplete or damaged"
    elif isinstance(exc, RuntimeError):
        reason = "its archive does not have the layout of a torch file"
    elif isinstance(exc, pickle.UnpicklingError):
        reason = "its data is not a weights-only torch pickle"
    else:
        reason = f"torch.load failed with {type(exc).__name__}"
    try:
        size = f", {path.stat().st_size} bytes"
    except OSError:
        size = ""
    return ModelError(f"checkpoint {path} cannot be read: it is truncated or not a checkpoint made by "
                      f"`lnstaging train` ({reason}{size})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True,
                    kinds: Sequence[str] = MODEL_KINDS) -> Checkpoint:
    """Read and verify a checkpoint (torch.load with weights_only=True). Raises ModelError on any problem.

    A bundled model is always checked against its pinned sha256 (before anything is read from a file at the
    bundled location or under a bundled name). ``verify`` (default) checks the manifest (its kind must be one of
    ``kinds``), the weights hash, the architecture and the sidecar; without it only the file's structure is checked.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelError(f"checkpoint {path} {what} (expected a .pt file made by `lnstaging train`)")
    bundled = bundled_model_name(path)
    if bundled is not None:
        check_bundled(path, bundled)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unreadable, truncated, or holds pickled objects
        raise _unreadable(path, exc) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"checkpoint {path}: not an lnstaging checkpoint (expected format {FORMAT!r}, a file made "
                         "by `lnstaging train`)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"checkpoint {path}: format_version {payload.get('format_version')!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
    manifest, state = payload.get("manifest"), payload.get("state_dict")
    if not isinstance(manifest, dict) or not isinstance(state, dict):
        raise ModelError(f"checkpoint {path}: missing 'manifest' or 'state_dict'")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelError(f"checkpoint {path}: state_dict entry {bad!r} is not a named tensor")
    training_state = payload.get("training_state")
    if training_state is not None and not isinstance(training_state, dict):
        raise ModelError(f"checkpoint {path}: 'training_state' must be a dict or None")
    if bundled is None and manifest.get("bundled") is not None:
        check_bundled(path, bundled_model_name(path, manifest) or "")
    if verify:
        _verify_manifest(path, manifest, state, kinds)
        _verify_sidecar(path, manifest)
    return Checkpoint(path, manifest, state, training_state)


def _verify_manifest(path: Path, manifest: dict, state: dict[str, torch.Tensor],
                     kinds: Sequence[str] = MODEL_KINDS) -> None:
    """Kind, weights hash, finite weights, architecture and threshold of a loaded checkpoint."""
    kind = _kind(path, manifest, kinds)
    expected = manifest.get("weights_sha256")
    if not isinstance(expected, str):
        raise ModelError(f"checkpoint {path}: the manifest lacks 'weights_sha256' (the hash of the weights)")
    actual = weights_sha256(state)
    if expected != actual:
        raise ModelError(f"checkpoint {path}: weights do not match the manifest's weights_sha256 "
                         f"(expected {expected}, got {actual}); the file was modified or is corrupt")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ModelError(f"checkpoint {path}: tensor {bad!r} holds NaN or infinite values")
    _check_architecture(path, kind, manifest.get("model_config"), state)
    thr = manifest.get("threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0):
        raise ModelError(f"checkpoint {path}: manifest 'threshold' must be a number in 0..1, got {thr!r}")
    if kind in MODEL_KINDS:
        from .calibration import calibration_of

        calibration_of(manifest, f"checkpoint {path}")


def _verify_sidecar(path: Path, manifest: dict) -> None:
    """The sidecar ``<name>.json``, when present, must hold the same manifest and the file's sha256."""
    side = sidecar_path(path)
    if not side.is_file():
        return
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"checkpoint manifest {side} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ModelError(f"checkpoint manifest {side} must be a JSON object with 'manifest' and 'file_sha256'")
    if _canonical(info.get("manifest")) != _canonical(manifest):  # NaN-safe comparison
        raise ModelError(f"checkpoint manifest {side} differs from the manifest inside {path}; "
                         "one of them was edited or they belong to different checkpoints")
    if info.get("file_sha256") not in (None, file_sha256(path)):
        raise ModelError(f"checkpoint {path}: file sha256 differs from {side}; the file was modified")


def _canonical(obj: Any) -> str:
    """JSON text with sorted keys: compares manifests (NaN metrics included, which never equal themselves)."""
    return json.dumps(obj, sort_keys=True, default=str)


# -- architecture --------------------------------------------------------------------------------------------------


def _kind(path: Path, manifest: dict, kinds: Sequence[str] | None = None) -> str:
    """The manifest's kind: a known one, and one of ``kinds`` when given."""
    kind = manifest.get("kind")
    if kind not in model_kinds():
        raise ModelError(f"checkpoint {path}: manifest 'kind' must be one of {model_kinds()}, got {kind!r}")
    if kinds is not None and kind not in kinds:
        raise ModelError(f"checkpoint {path} holds a {kind!r} model; expected a {' or '.join(map(repr, kinds))} "
                         "model here")
    return kind


def _config(path: Path, model_config: Any, kind: str = "station") -> Any:
    """The configuration a manifest describes for ``kind`` (a ModelError when it is missing or invalid)."""
    if not isinstance(model_config, dict):
        raise ModelError(f"checkpoint {path}: the manifest lacks 'model_config' (the architecture of the weights)")
    try:
        if kind in _REGISTERED:
            return _REGISTERED[kind].parse_config(dict(model_config))
        from .model import ModelConfig

        return ModelConfig.from_dict(dict(model_config))
    except (LNSError, TypeError, ValueError, OverflowError) as exc:
        raise ModelError(f"checkpoint {path}: the manifest's model_config is not valid "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _build(path: Path, kind: str, config: Any) -> nn.Module:
    """The model of ``kind`` and ``config`` on the CPU (a few ms, even for the reference network)."""
    try:
        if kind in _REGISTERED:
            return _REGISTERED[kind].build(config)
        from .model import build_model

        return build_model(kind, config)
    except (LNSError, TypeError, ValueError, OSError) as exc:
        raise ModelError(f"checkpoint {path}: the manifest's model_config does not build a {kind} model "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _describe(kind: str, config: Any) -> str:
    if kind in _REGISTERED:
        return _REGISTERED[kind].describe(config)
    return f"{kind} model, channels {list(config.channels)}, patch_size {config.patch_size}"


def _check_architecture(path: Path, kind: str, model_config: Any, state: dict[str, torch.Tensor],
                        model: nn.Module | None = None) -> None:
    """The tensors' names, shapes and dtypes must be those of the architecture ``model_config`` describes (``model``,
    when given, is that architecture already built)."""
    config = _config(path, model_config, kind)
    if model is None:
        model = _build(path, kind, config)
    expected = model.state_dict()
    problems = []  # in the architecture's order, so that the first names the first layer that differs
    for k, t in expected.items():
        if k not in state:
            problems.append(f"tensor {k!r} of that architecture is missing from the file")
        elif tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"tensor {k!r} has shape {tuple(state[k].shape)} in the file but {tuple(t.shape)} in "
                            "that architecture")
        elif state[k].is_floating_point() != t.is_floating_point():
            problems.append(f"tensor {k!r} has dtype {state[k].dtype} in the file but {t.dtype} in that architecture")
    problems += [f"the file holds tensor {k!r}, which that architecture does not have" for k in state
                 if k not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise ModelError(f"checkpoint {path}: weights do not fit the manifest's model_config "
                         f"({_describe(kind, config)}): {problems[0]}{more}")


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Build the model the manifest describes and load the weights (strict)."""
    kind = _kind(ckpt.path, ckpt.manifest)
    config = _config(ckpt.path, ckpt.manifest.get("model_config"), kind)
    model = _build(ckpt.path, kind, config)
    _check_architecture(ckpt.path, kind, config.to_dict(), ckpt.state_dict, model=model)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {ckpt.path}: weights do not fit the manifest's model_config "
                         f"({str(exc).splitlines()[0]})") from None
    return model


def verify_model(path: str | Path, kinds: Sequence[str] = MODEL_KINDS) -> dict:
    """Check a model checkpoint without building or running it and return its manifest; a ModelError names the file
    and the problem. Everything ``load_model`` checks, in well under a second: call it before any heavy work."""
    return load_checkpoint(path, map_location="cpu", kinds=kinds).manifest


def load_model(path: str | Path, device: str | torch.device = "cpu",
               kinds: Sequence[str] = MODEL_KINDS) -> tuple[nn.Module, dict]:
    """Verified model in eval mode on ``device`` and its manifest."""
    ckpt = load_checkpoint(path, map_location="cpu", kinds=kinds)
    model = model_from_checkpoint(ckpt).to(device)
    model.eval()
    return model, ckpt.manifest


def resume_training(path: str | Path, key: str, model: nn.Module, optimizer: Any, scheduler: Any,
                    run: str, kinds: Sequence[str] = MODEL_KINDS) -> dict:
    """Load an interrupted run's ``last.pt`` into ``model``, ``optimizer`` and ``scheduler`` and return its loop
    state. A file of another run (its ``resume_key`` differs from ``key``) is refused with a UsageError that names
    the file and ``run`` (what differs, in words)."""
    from ..errors import UsageError

    ckpt = load_checkpoint(path, map_location="cpu", kinds=kinds)
    if ckpt.manifest.get("resume_key") != key or not ckpt.training_state:
        raise UsageError(f"{path} belongs to another {run}; use another --out folder or remove it")
    model.load_state_dict(ckpt.state_dict)
    optimizer.load_state_dict(ckpt.training_state["optimizer"])
    scheduler.load_state_dict(ckpt.training_state["scheduler"])
    return ckpt.training_state["loop"]
