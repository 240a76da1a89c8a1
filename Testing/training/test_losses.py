"""Loss functions on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from LymphNodeStagingLib.classifier.model import StagingOutput, rule_ordinal
from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.staging.rules import pseudo_labels
from LymphNodeStagingLib.training.losses import (
    LossWeights,
    expected_stage,
    inverse_frequency_weights,
    masked_bce,
    ordinal_mse,
    pseudo_label_loss,
    rule_ordinal_bce,
    staging_loss,
)


def test_pseudo_loss_with_unknown_entries_by_hand():
    p = torch.tensor([[0.2, 0.7, 0.1], [0.9, 0.4, 0.6]], requires_grad=True)
    t = torch.tensor([[0, 0, 0], [-1, 1, 0]])
    # known: five entries, four zeros and one one -> omega_0 = 5 / (4 * 2), omega_1 = 5 / (1 * 2)
    assert inverse_frequency_weights(t) == {0: 0.625, 1: 2.5}
    loss = pseudo_label_loss(p, t)
    assert float(loss.detach()) == pytest.approx(0.625 * (0.2 + 0.7 + 0.1 + 0.6) + 2.5 * (1 - 0.4))
    loss.backward()
    assert float(p.grad[1, 0]) == 0.0  # unknown entry: no gradient
    assert float(p.grad[1, 1]) == pytest.approx(-2.5)
    assert float(p.grad[0, 0]) == pytest.approx(0.625)


def test_pseudo_loss_all_unknown_is_zero_and_targets_from_rules():
    p = torch.rand(2, 3)
    t = torch.tensor([list(pseudo_labels("N3")), [-1, -1, -1]])
    assert t[0].tolist() == [-1, -1, 1]
    assert float(pseudo_label_loss(p, torch.full((2, 3), -1))) == 0.0
    assert float(pseudo_label_loss(p, t)) == pytest.approx(1.0 * (1 - float(p[0, 2])))
    with pytest.raises(UsageError):
        pseudo_label_loss(p, torch.zeros(2, 2))


def test_masked_bce_skips_unknown_and_absent():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    labels = torch.tensor([[1, 0, -1, 1]])
    present = torch.tensor([[True, True, True, False]])
    got = masked_bce(logits, labels, present)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, :2], torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx(float(expected))
    assert float(masked_bce(logits, torch.full((1, 4), -1))) == 0.0
    assert float(masked_bce(logits, labels, present, reduction="sum")) == pytest.approx(2 * float(expected))


def test_ordinal_term_has_gradients():
    logits = torch.tensor([[0.1, 0.2, 1.5, -0.3], [2.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([3, 0])
    e = expected_stage(logits)
    soft = torch.softmax(logits, 1)
    assert float(e[0].detach()) == pytest.approx(float((soft[0] * torch.arange(4)).sum().detach()))
    loss = ordinal_mse(logits, y)
    loss.backward()
    assert float(logits.grad.abs().sum()) > 0
    # the original argmax version has none: argmax is not differentiable
    assert not torch.argmax(torch.softmax(logits, 1), 1).float().requires_grad


def test_rule_ordinal_bce_by_hand_and_gradient():
    groups = torch.tensor([[0.3, 0.6, 0.2]], requires_grad=True)
    ordinal = rule_ordinal(groups)  # [0.6, 0.6, 0.2]
    loss = rule_ordinal_bce(ordinal, torch.tensor([2]))  # targets [1, 1, 0]
    expected = -(2 * torch.log(torch.tensor(0.6)) + torch.log(torch.tensor(0.8))) / 3
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert float(groups.grad[0, 1]) != 0.0 and float(groups.grad[0, 2]) != 0.0
    assert float(groups.grad[0, 0]) == 0.0  # not the maximum of any threshold


def _output(b=2):
    torch.manual_seed(0)
    logits = torch.randn(b, 17, requires_grad=True)
    present = torch.ones(b, 17, dtype=torch.bool)
    n_logits = torch.randn(b, 4, requires_grad=True)
    groups = torch.sigmoid(torch.randn(b, 3))
    return StagingOutput(logits, n_logits, groups, rule_ordinal(groups), present)


def test_staging_loss_is_the_weighted_sum_and_skips_zero_weights():
    out = _output()
    labels = torch.full((2, 17), -1)
    labels[0, 4] = 1
    n = torch.tensor([2, 0])
    pseudo = torch.stack([torch.as_tensor(pseudo_labels(int(k))) for k in n])
    w = LossWeights()
    assert (w.ce, w.ordinal, w.pseudo, w.bce) == (0.1, 0.1, 0.02, 1.0)  # the paper's Eq. 2
    total, parts = staging_loss(out, labels, n, pseudo, w)
    assert set(parts) == {"bce", "ce", "ordinal", "pseudo"}
    assert float(total.detach()) == pytest.approx(0.1 * parts["ce"] + 0.1 * parts["ordinal"] + 0.02 * parts["pseudo"]
                                         + parts["bce"], rel=1e-6)
    total2, parts2 = staging_loss(out, labels, n, pseudo, LossWeights(pseudo=0.0, bce=0.0, rule_ordinal=1.0))
    assert set(parts2) == {"ce", "ordinal", "rule_ordinal"}
    with pytest.raises(UsageError, match="pseudo"):
        LossWeights(pseudo=-1)
