"""Bundled models: their file hashes are pinned in the library, and a changed bundled model is refused."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from LymphNodeStagingLib import paths
from LymphNodeStagingLib.classifier.checkpoint import (
    bundled_model_name,
    file_sha256,
    load_model,
    save_checkpoint,
    sidecar_path,
    verify_model,
    weights_sha256,
)
from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier
from LymphNodeStagingLib.errors import ModelError


def test_every_bundled_model_is_pinned():
    """Fails when a bundled model file changes (or one is added or removed) without its pin in paths.py."""
    folder = paths.bundled_models_dir()
    files = sorted(p.name for p in folder.glob("*.pt"))
    assert files == sorted(paths.BUNDLED_MODELS), (
        f"the .pt files in {folder} must be exactly the pinned ones; update BUNDLED_MODELS in "
        "LymphNodeStagingLib/paths.py")
    for name, pinned in paths.BUNDLED_MODELS.items():
        actual = file_sha256(folder / name)
        assert actual == pinned, (f"{name} changed: its sha256 is {actual}; if the new model is intended, pin it in "
                                  "BUNDLED_MODELS in LymphNodeStagingLib/paths.py (and describe it in "
                                  "resources/models/README.md)")
    assert paths.demo_model_path().name in paths.BUNDLED_MODELS


def test_bundled_model_is_recognised_and_loads_fast():
    path = paths.demo_model_path()
    assert bundled_model_name(path) == "demo_ts1.pt"
    verify_model(path)  # warm-up: the first call pays for lazy imports
    t0 = time.perf_counter()
    manifest = verify_model(path)
    model, manifest2 = load_model(path)
    elapsed = time.perf_counter() - t0
    assert manifest == manifest2 and manifest["kind"] == "station" and not model.training
    assert elapsed < 1.0, f"verifying and loading the bundled model took {elapsed:.2f} s"


@pytest.fixture
def resources_copy(tmp_path, monkeypatch):
    """A copy of the package resources that the library takes for its own."""
    root = tmp_path / "resources"
    shutil.copytree(paths.resources_dir() / paths.DEMO_MODEL.parent, root / paths.DEMO_MODEL.parent)
    monkeypatch.setattr(paths, "resources_dir", lambda: root)
    assert paths.demo_model_path() == root / paths.DEMO_MODEL
    return root


def _tampered_payload() -> dict:
    """The bundled model with one weight changed and its embedded weights hash recomputed to match."""
    payload = torch.load(paths.demo_model_path(), weights_only=True)
    name = sorted(payload["state_dict"])[0]
    payload["state_dict"][name] = payload["state_dict"][name] + 0.01
    payload["manifest"]["weights_sha256"] = weights_sha256(payload["state_dict"])
    return payload


def _refused(path, *phrases) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert time.perf_counter() - t0 < 3.0
    msg = str(info.value)
    assert path.name in msg and "weights_only=False" not in msg
    for phrase in phrases:
        assert phrase in msg, msg
    return msg


def test_changed_bundled_model_is_refused_by_its_pin(resources_copy):
    path = paths.demo_model_path()
    load_model(path)  # the untouched copy is the bundled model
    payload = _tampered_payload()
    torch.save(payload, path)
    sidecar_path(path).unlink()  # the sidecar is optional; the pin is not
    msg = _refused(path, "pinned", "changed", "git checkout", "pip install --force-reinstall")
    assert "demo_ts1.pt" in msg
    # also before torch reads anything: a truncated file at the bundled path names the pin, not torch
    path.write_bytes(path.read_bytes()[:1000])
    _refused(path, "pinned")


def test_copies_claiming_to_be_the_bundled_model(tmp_path):
    payload = _tampered_payload()
    # under the bundled model's file name, anywhere
    (tmp_path / "copy").mkdir()
    torch.save(payload, tmp_path / "copy" / "demo_ts1.pt")
    _refused(tmp_path / "copy" / "demo_ts1.pt", "pinned")
    # under another name, with a manifest that says it is the bundled model
    claimed = {**payload, "manifest": {**payload["manifest"], "bundled": "demo_ts1"}}
    torch.save(claimed, tmp_path / "claimed.pt")
    _refused(tmp_path / "claimed.pt", "pinned")
    torch.save({**payload, "manifest": {**payload["manifest"], "bundled": "demo_ts9"}}, tmp_path / "unknown.pt")
    _refused(tmp_path / "unknown.pt", "not pinned")
    # the untouched bundled model copied elsewhere under its own name is still the bundled model
    shutil.copy(paths.demo_model_path(), tmp_path / "copy" / "demo_ts1.pt")
    load_model(tmp_path / "copy" / "demo_ts1.pt")
    # the limit of a user model: changed weights with a recomputed embedded hash and no sidecar are not detectable
    torch.save(payload, tmp_path / "mine.pt")
    assert bundled_model_name(tmp_path / "mine.pt") is None
    load_model(tmp_path / "mine.pt")


def test_unpinned_model_in_the_bundled_folder_is_refused(resources_copy, tmp_path):
    cfg = ModelConfig.small(16)
    path = save_checkpoint(paths.bundled_models_dir() / "extra.pt", StationClassifier(cfg),
                           {"kind": "station", "model_config": cfg.to_dict()})
    _refused(path, "not pinned", "BUNDLED_MODELS")
    # the same checkpoint outside the folder is a user model
    shutil.copy(path, tmp_path / "extra.pt")
    load_model(tmp_path / "extra.pt")
