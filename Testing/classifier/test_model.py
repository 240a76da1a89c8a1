"""Networks: reference architecture, station embedding, staging head, rule-consistent ordinal output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LymphNodeStagingLib.classifier.model import (
    ModelConfig,
    StagingModel,
    StationClassifier,
    group_probabilities,
    ordinal_to_stage_probs,
    predict_stations,
    rule_ordinal,
)
from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.staging.rules import load_rules
from LymphNodeStagingLib.training.losses import rule_ordinal_bce


def test_reference_configuration_matches_the_paper_network():
    torch.manual_seed(0)
    m = StationClassifier(ModelConfig())
    conv = sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder"))
    assert conv == 1_178_928  # the paper's six conv blocks, 8..256 channels, no bias
    assert sum(p.numel() for p in m.parameters()) == conv + 17 * 8 + (256 + 8 + 1)
    blocks = [b for b in m.encoder if isinstance(b, torch.nn.Sequential)]
    assert [type(x).__name__ for x in blocks[0]] == ["Conv3d", "InstanceNorm3d", "Dropout3d", "MaxPool3d", "ReLU"]
    m.eval()
    with torch.no_grad():
        out = m(torch.rand(1, 2, 64, 64, 64), torch.tensor([3]))
    assert out.shape == (1,)


def test_station_identity_is_an_embedding():
    torch.manual_seed(0)
    m = StationClassifier(ModelConfig.small(patch_size=16)).eval()
    x = torch.rand(1, 2, 16, 16, 16).expand(17, -1, -1, -1, -1)
    with torch.no_grad():
        logits = m(x, torch.arange(17))
    assert isinstance(m.station_embedding, torch.nn.Embedding)
    assert len(torch.unique(logits)) == 17


def test_config_validation_and_round_trip():
    with pytest.raises(UsageError, match="too small"):
        ModelConfig(patch_size=32)  # 6 blocks need 64
    with pytest.raises(UsageError, match="same length"):
        ModelConfig(channels=(4, 8), dropout=(0.1,))
    with pytest.raises(UsageError, match="unknown keys"):
        ModelConfig.from_dict({"bogus": 1})
    c = ModelConfig.small(patch_size=32)
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_group_maxima_and_rule_ordinal_by_hand():
    probs = torch.zeros(1, 17)
    names = ["1L", "1R", "2L", "2R", "3A", "3P", "4L", "4R", "5", "6", "7", "8", "9", "10L", "10R", "11L", "11R"]
    probs[0, names.index("10R")] = 0.3  # N1 for a right tumour
    probs[0, names.index("7")] = 0.6  # N2
    probs[0, names.index("4L")] = 0.2  # N3 (contralateral)
    masks = torch.as_tensor(load_rules("ajcc8").group_masks("R"))[None]
    g = group_probabilities(probs, masks)
    np.testing.assert_allclose(g.numpy(), [[0.3, 0.6, 0.2]])
    ordinal = rule_ordinal(g)
    np.testing.assert_allclose(ordinal.numpy(), [[0.6, 0.6, 0.2]], atol=1e-7)
    stage = ordinal_to_stage_probs(ordinal)
    np.testing.assert_allclose(stage.numpy(), [[0.4, 0.0, 0.4, 0.2]], atol=1e-7)
    assert float(stage.sum()) == pytest.approx(1.0)


def _staging_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.rand(2, 17, 2, 16, 16, 16, generator=g)
    present = torch.ones(2, 17, dtype=torch.bool)
    present[0, [3, 9]] = False
    return patches, torch.tensor([0, 1]), present


def test_staging_model_never_looks_at_absent_patches():
    torch.manual_seed(0)
    m = StagingModel(ModelConfig.small(patch_size=16)).eval()
    patches, side, present = _staging_inputs()
    patches[0, 3] = float("nan")
    patches[0, 9] = float("nan")
    with torch.no_grad():
        out = m(patches, side, present)
    assert torch.isfinite(out.station_logits).all() and torch.isfinite(out.n_logits).all()
    assert out.n_logits.shape == (2, 4) and out.ordinal.shape == (2, 3)
    assert float(out.station_probs[0, 3]) == 0.0
    assert (out.ordinal[:, :-1] >= out.ordinal[:, 1:]).all()  # P(N>=1) >= P(N>=2) >= P(N>=3)


def test_rule_ordinal_loss_reaches_the_encoder():
    torch.manual_seed(0)
    m = StagingModel(ModelConfig.small(patch_size=16))
    patches, side, present = _staging_inputs()
    out = m(patches, side, present)
    loss = rule_ordinal_bce(out.ordinal, torch.tensor([2, 0]))
    loss.backward()
    grads = [p.grad for p in m.classifier.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_freeze_encoder_and_predict_stations():
    torch.manual_seed(0)
    m = StagingModel(ModelConfig.small(patch_size=16))
    m.freeze_encoder()
    assert not any(p.requires_grad for p in m.classifier.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    m.train()
    x = np.random.default_rng(0).random((3, 2, 16, 16, 16), dtype=np.float32)
    p1 = predict_stations(m, x, [0, 5, 16])
    p2 = predict_stations(m, x, [0, 5, 16])
    assert p1.shape == (3,) and ((p1 > 0) & (p1 < 1)).all()
    np.testing.assert_array_equal(p1, p2)  # eval mode: no dropout
    assert m.classifier.training  # mode restored
    with pytest.raises(UsageError, match="one station index"):
        predict_stations(m, x, [0])


def test_predict_case_centroid_is_deterministic_and_tta_is_seeded():
    from LymphNodeStagingLib.classifier.predict import predict_case
    from LymphNodeStagingLib.training.loops import make_toy_case

    case = make_toy_case(1, stations=(7, 10, 14), absent=(14,))
    torch.manual_seed(0)
    m = StationClassifier(ModelConfig.small(patch_size=16))
    a = predict_case(m, case.ct, case.pet, case.sampler, spacing=2.0)
    b = predict_case(m, case.ct, case.pet, case.sampler, spacing=2.0)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert np.flatnonzero(a.present).tolist() == [7, 10]
    assert np.isnan(a.probabilities[14]) and not a.positive[14]
    t1 = predict_case(m, case.ct, case.pet, case.sampler, spacing=2.0, tta=4, seed=3)
    t2 = predict_case(m, case.ct, case.pet, case.sampler, spacing=2.0, tta=4, seed=3)
    np.testing.assert_array_equal(t1.probabilities, t2.probabilities)
    assert t1.tta == 4 and (t1.tta_std[[7, 10]] >= 0).all()
