"""Loss functions of TS1 and TS2/TS3 (docs/explanation/method.md), with the known bugs of the original fixed.

Unknown labels are encoded as -1 (``rules.UNKNOWN``) everywhere and never contribute, nor do absent stations.
TS2/TS3 loss (paper Eq. 2, weights configurable):
    L = w_ce * CE(N logits, N) + w_ordinal * ordinal + w_pseudo * L_pseudo + w_bce * BCE(known station labels)
The ordinal term is the squared error of the expected stage sum_k k softmax_k (differentiable, unlike the original
argmax) and, for the rule-consistent ordinal output, the binary cross-entropy of P(N>=k) against [N >= k].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..staging.rules import UNKNOWN


@dataclass
class LossWeights:
    """Weights of the TS2/TS3 loss terms. Defaults: the paper's Eq. 2 (lambda1..4 = 0.1, 0.1, 0.02, 1)."""

    ce: float = 0.1
    ordinal: float = 0.1
    pseudo: float = 0.02
    bce: float = 1.0
    rule_ordinal: float = 0.0  # BCE on the rule-consistent P(N>=k); 0 = off (paper), > 0 trains the rule layer
    balanced: bool = True  # N-stage cross-entropy weighted by inverse class frequency of the training patients

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not (float(v) >= 0.0):
                raise UsageError(f"loss weight {k} must be >= 0, got {v}")


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """BCE with logits over entries whose label is 0/1 (not -1) and where ``mask`` is True (e.g. station present).

    ``reduction`` "mean" (over the counted entries) or "sum". No counted entry -> 0 (with a graph).
    """
    labels = labels.to(logits.device)
    keep = labels != UNKNOWN
    if mask is not None:
        keep = keep & mask.to(logits.device).bool()
    if not keep.any():
        return logits.sum() * 0.0 + 0.0
    loss = F.binary_cross_entropy_with_logits(logits[keep], labels[keep].to(logits.dtype), reduction="sum")
    return loss / keep.sum() if reduction == "mean" else loss


def inverse_frequency_weights(targets: torch.Tensor) -> dict[int, float]:
    """omega_c = |K| / (n_c * C) over the known entries K (target != -1), C = number of distinct values present."""
    known = targets[targets != UNKNOWN]
    if known.numel() == 0:
        return {}
    values, counts = torch.unique(known, return_counts=True)
    total, classes = known.numel(), len(values)
    return {int(v): total / (int(n) * classes) for v, n in zip(values, counts, strict=True)}


def pseudo_label_loss(group_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_pseudo = sum_c omega_c * sum_{known entries with target c} |t - p| (a sum, as in the paper).

    group_probs (B, 3) in [0, 1] (group maxima for N1, N2, N3), targets (B, 3) in {0, 1, -1 = unknown}.
    """
    if group_probs.shape != targets.shape:
        raise UsageError(f"group_probs {tuple(group_probs.shape)} and pseudo-label targets "
                         f"{tuple(targets.shape)} must have the same shape")
    targets = targets.to(group_probs.device)
    weights = inverse_frequency_weights(targets)
    total = group_probs.sum() * 0.0 + 0.0
    for value, w in weights.items():
        sel = targets == value
        total = total + w * (float(value) - group_probs[sel]).abs().sum()
    return total


def expected_stage(n_logits: torch.Tensor) -> torch.Tensor:
    """sum_k k * softmax_k (B,): a differentiable stage estimate."""
    k = torch.arange(n_logits.shape[1], device=n_logits.device, dtype=n_logits.dtype)
    return (n_logits.softmax(dim=1) * k).sum(dim=1)


def ordinal_mse(n_logits: torch.Tensor, n_stage: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the expected stage and the true stage; entries with N = -1 are skipped."""
    n_stage = n_stage.to(n_logits.device)
    keep = n_stage != UNKNOWN
    if not keep.any():
        return n_logits.sum() * 0.0 + 0.0
    return F.mse_loss(expected_stage(n_logits[keep]), n_stage[keep].to(n_logits.dtype))


def cumulative_targets(n_stage: torch.Tensor, thresholds: int = 3) -> torch.Tensor:
    """[N >= 1, N >= 2, N >= 3] as float (B, 3)."""
    k = torch.arange(1, thresholds + 1, device=n_stage.device)
    return (n_stage.unsqueeze(1) >= k).float()


def rule_ordinal_bce(ordinal: torch.Tensor, n_stage: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean BCE of the rule-consistent P(N>=k) (B, 3) against [N >= k]; N = -1 entries skipped."""
    n_stage = n_stage.to(ordinal.device)
    keep = n_stage != UNKNOWN
    if not keep.any():
        return ordinal.sum() * 0.0 + 0.0
    p = ordinal[keep].clamp(eps, 1 - eps)
    return F.binary_cross_entropy(p, cumulative_targets(n_stage[keep]).to(p.dtype))


def stage_class_weights(n_stages, classes: int = 4) -> torch.Tensor:
    """Class-balanced weights (classes,) of the N-stage cross-entropy from the training patients' N-stages:
    w_c = K / (C * n_c) over the known stages (mean weight per patient 1); a stage no patient has gets weight 0."""
    t = torch.as_tensor(n_stages).reshape(-1)
    known = t[t != UNKNOWN].long()
    counts = torch.bincount(known, minlength=classes).float()[:classes]
    present = counts > 0
    w = torch.zeros(classes)
    if present.any():
        w[present] = known.numel() / (int(present.sum()) * counts[present])
    return w


def stage_ce(n_logits: torch.Tensor, n_stage: torch.Tensor, class_weights: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Cross-entropy of the N-stage logits (B, 4), optionally class-weighted (a weighted mean); N = -1 skipped."""
    n_stage = n_stage.to(n_logits.device)
    keep = n_stage != UNKNOWN
    if not keep.any():
        return n_logits.sum() * 0.0 + 0.0
    w = None if class_weights is None else class_weights.to(n_logits.device, n_logits.dtype)
    return F.cross_entropy(n_logits[keep], n_stage[keep].long(), weight=w)


def staging_loss(output, station_labels: torch.Tensor, n_stage: torch.Tensor, pseudo_targets: torch.Tensor,
                 weights: LossWeights, class_weights: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The TS2/TS3 loss of a :class:`model.StagingOutput`; returns (total, {term: value}).

    station_labels (B, 17) in {0, 1, -1}; n_stage (B,) 0..3; pseudo_targets (B, 3) from ``rules.pseudo_labels``;
    class_weights (4,) of the N-stage cross-entropy (:func:`stage_class_weights`; None: unweighted).
    A zero weight skips its term.
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.bce:
        terms["bce"] = masked_bce(output.station_logits, station_labels, output.present)
    if weights.ce:
        terms["ce"] = stage_ce(output.n_logits, n_stage, class_weights)
    if weights.ordinal:
        terms["ordinal"] = ordinal_mse(output.n_logits, n_stage)
    if weights.pseudo:
        terms["pseudo"] = pseudo_label_loss(output.group_probs, pseudo_targets)
    if weights.rule_ordinal:
        terms["rule_ordinal"] = rule_ordinal_bce(output.ordinal, n_stage)
    total = output.n_logits.sum() * 0.0 + 0.0
    for name, value in terms.items():
        total = total + getattr(weights, name) * value
    return total, {k: float(v.detach()) for k, v in terms.items()}
