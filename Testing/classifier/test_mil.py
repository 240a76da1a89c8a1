"""Multiple-instance pooling of the station classifier on hand-built bags, the hybrid head and the bag centres."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier, noisy_or_logit, predict_stations
from LymphNodeStagingLib.classifier.patches import StationSampler
from LymphNodeStagingLib.errors import UsageError

S = 8


def _hand_built(pooling: str, k: int = 3, hybrid: bool = False) -> StationClassifier:
    """A classifier whose instance feature is the hottest PET value of the patch and whose logit is
    10 * (feature - 1): a patch with PET 2 gives +10, a cold one (PET 0) -10."""
    cfg = ModelConfig(patch_size=S, channels=(4,), dropout=(0.0,), station_embedding_dim=0, instances=k,
                      pooling=pooling, hybrid=hybrid, head_hidden=4)
    clf = StationClassifier(cfg)
    hot = nn.Linear(2, clf.feature_dim)
    with torch.no_grad():
        hot.weight.zero_()
        hot.weight[:, 1] = 1.0 / clf.feature_dim
        hot.bias.zero_()
        clf.fc.weight.zero_()
        clf.fc.weight[0, :clf.feature_dim] = 10.0
        clf.fc.bias.fill_(-10.0)
        if clf.attention is not None:  # attention grows with the feature: hot instances are attended to
            for m in clf.attention:
                if isinstance(m, nn.Linear):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            clf.attention[-1].weight.fill_(20.0)
    clf.encoder = nn.Sequential(nn.AdaptiveMaxPool3d(1), nn.Flatten(), hot)
    return clf.eval()


def _bag(hot: list[bool]) -> torch.Tensor:
    x = torch.zeros(1, len(hot), 2, S, S, S)
    for i, h in enumerate(hot):
        if h:
            x[0, i, 1, 4, 4, 4] = 2.0
    return x


@pytest.mark.parametrize("pooling", ["max", "noisy_or", "attention"])
def test_the_positive_bag_is_driven_by_its_positive_instance(pooling):
    clf = _hand_built(pooling)
    st = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        negative = torch.sigmoid(clf(_bag([False, False, False]), st)).item()
        positive = torch.sigmoid(clf(_bag([False, True, False]), st)).item()
        moved = torch.sigmoid(clf(_bag([True, False, False]), st)).item()
    assert negative < 1e-3
    assert positive > 0.99  # one hot instance among cold ones makes the bag positive
    assert moved == pytest.approx(positive, abs=1e-6)  # wherever it is in the bag


def test_noisy_or_matches_its_definition_and_is_stable():
    z = torch.tensor([[-2.0, 0.5, 1.0], [-30.0, -30.0, -30.0], [40.0, -5.0, 0.0]])
    p = torch.sigmoid(z)
    expected = 1 - torch.prod(1 - p, dim=1)
    got = torch.sigmoid(noisy_or_logit(z, dim=1))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.isfinite(noisy_or_logit(z, dim=1)).all()
    # one instance alone: the instance's own probability
    assert torch.allclose(noisy_or_logit(torch.tensor([[1.3]]), dim=1), torch.tensor([1.3]), atol=1e-5)


def test_hybrid_head_reads_the_station_features_and_refuses_without_them():
    clf = _hand_built("max", k=2, hybrid=True)
    with torch.no_grad():
        clf.fc.weight[0, clf.feature_dim:] = torch.tensor([5.0, 0.0, 0.0])  # log(1 + SUVmax / 2.5)
    st = torch.zeros(1, dtype=torch.long)
    cold = _bag([False, False])
    with torch.no_grad():
        low = clf(cold, st, torch.tensor([[0.0, 0.0, 1.0]]))
        high = clf(cold, st, torch.tensor([[10.0, 0.0, 1.0]]))
    assert high.item() == pytest.approx(low.item() + 5.0 * np.log(1 + 10.0 / 2.5), rel=1e-4)
    with pytest.raises(UsageError, match="hybrid"):
        clf(cold, st)
    p = predict_stations(clf, cold.numpy(), [0], features=np.array([[10.0, 0.0, 1.0]]))
    assert p.shape == (1,) and 0 < p[0] < 1


def test_model_config_rejects_unknown_pooling_norm_and_bag_size():
    with pytest.raises(UsageError, match="pooling"):
        ModelConfig(pooling="mean")
    with pytest.raises(UsageError, match="norm"):
        ModelConfig(norm="layer")
    with pytest.raises(UsageError, match="instances"):
        ModelConfig(instances=0)
    # old checkpoints have none of the new keys: their configuration is the single-patch paper network
    cfg = ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items()
                                 if k not in ("instances", "pooling", "hybrid", "norm")})
    assert cfg.instances == 1 and not cfg.hybrid and cfg.norm == "instance"


def test_batch_norm_keeps_the_absolute_level_that_instance_norm_removes():
    torch.manual_seed(0)
    x = torch.rand(4, 2, S, S, S)
    outs = {}
    for norm in ("instance", "batch"):
        clf = StationClassifier(ModelConfig(patch_size=S, channels=(4, 8), dropout=(0.0, 0.0), norm=norm)).eval()
        with torch.no_grad():
            outs[norm] = (clf.encoder(x), clf.encoder(x * 3.0))
    a, b = outs["instance"]
    assert torch.allclose(a, b, atol=1e-4)  # a 3 times hotter copy of the same patch looks identical
    a, b = outs["batch"]
    assert not torch.allclose(a, b, atol=1e-2)


def test_bag_centres_start_at_the_centroid_and_spread_over_the_station():
    pts = np.stack(np.meshgrid(np.arange(0, 60.0, 2), np.arange(0, 20.0, 2), np.arange(0, 10.0, 2), indexing="ij"),
                   -1).reshape(-1, 3)
    w = 1.0 / (1.0 + np.linalg.norm(pts - pts.mean(0), axis=1))
    sampler = StationSampler.from_points({4: (pts, w, pts.mean(0), np.eye(3) * 2)})
    bag = sampler.bag(4, 4)
    assert np.allclose(bag[0], pts.mean(0))
    assert np.ptp(bag[:, 0]) > 25  # spread along the long axis of the station
    assert np.array_equal(bag, sampler.bag(4, 4))  # deterministic at inference
    drawn = sampler.bag(4, 4, np.random.default_rng(1))
    assert drawn.shape == (4, 3) and not np.array_equal(drawn, bag)
    assert np.allclose(sampler.bag(4, 1), pts.mean(0)[None])
