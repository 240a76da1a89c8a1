"""Checkpoint round trip, manifest and verification (weights-only loading)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LymphNodeStagingLib.classifier.checkpoint import (
    load_checkpoint,
    load_model,
    save_checkpoint,
    sidecar_path,
    weights_sha256,
)
from LymphNodeStagingLib.classifier.model import ModelConfig, StagingModel, StationClassifier, predict_stations
from LymphNodeStagingLib.errors import LNSError, ModelError


def _saved(tmp_path, kind="station"):
    torch.manual_seed(0)
    cfg = ModelConfig.small(patch_size=16)
    model = StationClassifier(cfg) if kind == "station" else StagingModel(cfg)
    manifest = {"kind": kind, "model_config": cfg.to_dict(), "seed": 7, "metrics": {"balanced_accuracy": 0.8},
                "threshold": 0.42, "data": {"train_fingerprint": "abc"}}
    path = save_checkpoint(tmp_path / "model.pt", model, manifest)
    return path, model


@pytest.mark.parametrize("kind", ["station", "staging"])
def test_round_trip(tmp_path, kind):
    path, model = _saved(tmp_path, kind)
    loaded, manifest = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert manifest["seed"] == 7 and manifest["threshold"] == 0.42 and manifest["kind"] == kind
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["weights_sha256"] == weights_sha256(model.state_dict())
    side = json.loads(sidecar_path(path).read_text())
    assert side["manifest"] == manifest and side["checkpoint"] == "model.pt"
    x = np.random.default_rng(0).random((2, 2, 16, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(predict_stations(model, x, [1, 2]), predict_stations(loaded, x, [1, 2]))
    assert not list(tmp_path.glob("*.part*"))  # atomic writes leave nothing behind


def test_tampered_weights_are_detected(tmp_path):
    path, _ = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] += 0.01
    torch.save(payload, path)
    with pytest.raises(ModelError, match="weights_sha256"):
        load_model(path)


def test_corrupt_file_is_detected(tmp_path):
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        load_model(path)


def test_manifest_not_matching_the_weights(tmp_path):
    path, _ = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["manifest"]["model_config"]["channels"] = [8, 16, 32, 64]
    torch.save(payload, path)
    sidecar_path(path).unlink()
    with pytest.raises(ModelError, match="do not fit the manifest"):
        load_model(path)


def test_edited_sidecar_manifest(tmp_path):
    path, _ = _saved(tmp_path)
    side = json.loads(sidecar_path(path).read_text())
    side["manifest"]["threshold"] = 0.1
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ModelError, match="differs from the manifest"):
        load_checkpoint(path)


def test_not_a_checkpoint_and_pickled_code_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not an lnstaging checkpoint"):
        load_model(tmp_path / "other.pt")
    torch.save({"format": "lnstaging-checkpoint", "obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="weights-only"):
        load_model(tmp_path / "evil.pt")
    with pytest.raises(LNSError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", StationClassifier(ModelConfig.small(16)), {"model_config": {}})


class _Evil:
    pass


def test_manifest_with_nan_metrics_verifies(tmp_path):
    """Validation metrics can be NaN (e.g. sensitivity without positives); NaN != NaN must not fail verification."""
    import math

    from LymphNodeStagingLib.classifier.checkpoint import load_checkpoint, save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model

    cfg = ModelConfig.small(32)
    model = build_model("station", cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, {"kind": "station", "model_config": cfg.to_dict(),
                                                       "metrics": {"station_sensitivity": float("nan")}})
    ckpt = load_checkpoint(path)
    assert math.isnan(ckpt.manifest["metrics"]["station_sensitivity"])
