"""Node network training: batches, the loss falls on a fixed batch, checkpoints (round trip, refusals), resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LymphNodeStagingLib.classifier.checkpoint import load_checkpoint, load_model, save_checkpoint
from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier
from LymphNodeStagingLib.errors import ModelError, UsageError
from LymphNodeStagingLib.nodes.data import split_by_patient
from LymphNodeStagingLib.nodes.model import NodeModelConfig, build_node_network, load_node_model, verify_node_model
from LymphNodeStagingLib.nodes.networks import SNetConfig, UNet3DConfig
from LymphNodeStagingLib.nodes.train import (
    NodeTrainConfig,
    batch_loss,
    detection_f1,
    snet_batch,
    snet_samples,
    train_node_network,
    tune_threshold,
    unet_batch,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_snet_samples_are_positives_plus_as_many_negatives(node_cases):
    cases = node_cases.cases
    samples = snet_samples(cases, _rng(), 1.0)
    positives = sum(c.positive_slices.size for c in cases)
    assert len(samples) == 2 * positives
    with_node = sum(1 for i, z in samples if cases[i].mask[z].any())
    assert with_node == positives
    assert samples != snet_samples(cases, _rng(1), 1.0)  # redrawn with another seed


def test_batches_have_the_network_shapes(node_cases):
    cases = node_cases.cases
    images, targets = snet_batch(cases, snet_samples(cases, _rng(), 1.0)[:5], _rng(), augment=True)
    assert images.shape == targets.shape and images.shape[:2] == (5, 1)
    assert images.shape[2] % 4 == 0 and images.shape[3] % 4 == 0
    assert set(torch.unique(targets).tolist()) <= {0.0, 1.0}
    images, targets = unet_batch(cases, [0, 1], _rng(), (16, 32, 32), foreground_fraction=1.0)
    assert images.shape == targets.shape == (2, 1, 16, 32, 32)
    assert targets.sum() > 0  # centred on a node voxel


@pytest.mark.parametrize("arch,config", [("snet", SNetConfig.tiny()), ("unet3d", UNet3DConfig.tiny())])
def test_loss_falls_on_a_fixed_batch(node_cases, arch, config):
    cases = node_cases.cases
    torch.manual_seed(0)
    network = build_node_network(NodeModelConfig(arch, config))
    if arch == "snet":
        positives = [s for s in snet_samples(cases, _rng(), 0.0)][:4]
        images, targets = snet_batch(cases, positives, None, augment=False)
        lr = 1e-3
    else:
        images, targets = unet_batch(cases, [0, 1], _rng(), (16, 32, 32), 1.0, augment=False)
        lr = 3e-3
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    network.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = batch_loss(network, arch, images, targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.95, losses


def test_trained_checkpoint_round_trip(trained_snet):
    out, result = trained_snet
    assert result.checkpoint.is_file() and result.last_checkpoint.is_file() and (out / "history.json").is_file()
    assert result.epochs_run == 2 and len(result.history) == 2 and result.val_cases == 1
    manifest = verify_node_model(result.checkpoint)
    assert manifest["kind"] == "nodes" and manifest["arch"] == "snet" and manifest["complete"]
    assert manifest["data_config"]["spacing"] == [4.0, 4.0, 8.0]
    assert manifest["threshold"] == result.threshold and 0.0 < result.threshold < 1.0
    assert manifest["threshold_tuning"]["metric"] == "detection_f1"
    assert manifest["data"]["train_fingerprint"] and manifest["versions"]["torch"] == torch.__version__
    assert "all" in manifest["metrics"] and ">=5mm" in manifest["metrics"]
    model = load_node_model(result.checkpoint)
    assert not model.network.training and model.threshold == result.threshold
    state = load_checkpoint(result.checkpoint, kinds=("nodes",)).state_dict
    for k, v in model.network.state_dict().items():
        assert torch.equal(v, state[k])


def test_resume_gives_the_same_weights(node_cases, node_data_config, tmp_path):
    train, val = split_by_patient(node_cases.cases, 0.25, seed=0)
    mconfig = NodeModelConfig("unet3d", UNet3DConfig.tiny())

    def config(epochs: int) -> NodeTrainConfig:
        return NodeTrainConfig(epochs=epochs, max_steps_per_epoch=2, patch=(16, 32, 32), seed=4)

    straight = train_node_network(train, val, tmp_path / "a", mconfig, node_data_config, config(2))
    train_node_network(train, val, tmp_path / "b", mconfig, node_data_config, config(1))
    resumed = train_node_network(train, val, tmp_path / "b", mconfig, node_data_config, config(2))
    assert resumed.resumed_from_epoch == 0 and resumed.epochs_run == 2
    sha = [load_checkpoint(r.last_checkpoint, kinds=("nodes",)).manifest["weights_sha256"] for r in (straight, resumed)]
    assert sha[0] == sha[1]
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    with pytest.raises(UsageError, match="another node training run"):
        train_node_network(train, val, tmp_path / "b", mconfig, node_data_config,
                           NodeTrainConfig(epochs=3, max_steps_per_epoch=2, patch=(16, 32, 32), seed=5))


def test_tampered_and_other_kind_checkpoints_are_refused(trained_snet, tmp_path):
    _, result = trained_snet
    # a changed weight with the manifest left as it was
    payload = torch.load(result.checkpoint, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ModelError, match="weights_sha256"):
        load_node_model(tmp_path / "tampered.pt")
    # a station classifier is not a node model, and a node model is not a station classifier
    cfg = ModelConfig.small(16)
    station = save_checkpoint(tmp_path / "station.pt", StationClassifier(cfg),
                              {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    with pytest.raises(ModelError, match="'station' model; expected a 'nodes' model"):
        verify_node_model(station)
    with pytest.raises(ModelError, match="'nodes' model; expected a 'station' or 'staging' model"):
        load_model(result.checkpoint)
    # a node manifest whose architecture does not fit the weights
    bad = json.loads(json.dumps(payload["manifest"]))
    bad["model_config"]["network"]["width"] = 0.5
    with pytest.raises(ModelError, match="do not fit"):
        save_checkpoint(tmp_path / "bad.pt", build_node_network(NodeModelConfig("snet", SNetConfig.tiny())), bad)


def test_threshold_tuning_prefers_the_separating_threshold(node_cases):
    cases = node_cases.cases[:2]
    probs = [np.where(c.mask, 0.7, 0.2).astype(np.float32) for c in cases]
    threshold, tuning = tune_threshold(cases, probs)
    assert 0.2 < threshold <= 0.7 and max(tuning["f1"]) > 0.95  # touching nodes merge into one component
    # one component over the whole crop touches every node but matches none: it is not a detection
    assert detection_f1(cases, [np.full(c.image.shape, 0.9, np.float32) for c in cases], 0.5) == 0.0


def test_bad_training_settings_are_usage_errors():
    with pytest.raises(UsageError, match="epochs"):
        NodeTrainConfig(epochs=0)
    with pytest.raises(UsageError, match="lr"):
        NodeTrainConfig(lr=-1.0)
    with pytest.raises(UsageError, match="arch"):
        NodeModelConfig("resnet")
