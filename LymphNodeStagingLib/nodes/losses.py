"""Losses of the lymph node segmentation networks (S-Net of Al Hasan et al. 2024; node U-Net of Shevtsov et al.).

- S-Net: Tversky loss on the main output (alpha = 0.7 weighs false positives, beta = 0.3 false negatives, over the
  whole batch) plus PraNet's "structure loss" (edge-weighted BCE + weighted IoU) on every side output.
- Node U-Net: binary cross-entropy with adaptive re-weighting of the foreground voxels (positive weight = background
  / foreground voxel count of the batch, clamped to [1, 1000], a constant for the gradient).

All functions take logits and a target of the same shape with values in [0, 1] (binary masks; soft targets work too)
and return a scalar tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UsageError


def _check(logits: torch.Tensor, target: torch.Tensor, name: str, ndims: Sequence[int] | None = None) -> torch.Tensor:
    if logits.shape != target.shape:
        raise UsageError(f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
    if ndims is not None and logits.ndim not in ndims:
        raise UsageError(f"{name}: expects (B, C, H, W) or (B, C, D, H, W) tensors, got {tuple(logits.shape)}")
    return target.to(logits.dtype)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, beta: float = 0.3,
                 smooth: float = 1.0) -> torch.Tensor:
    """1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth) with soft counts over the whole batch.

    ``alpha`` weighs false positives and ``beta`` false negatives (S-Net: 0.7 / 0.3, false positives cost more).
    """
    if alpha < 0 or beta < 0 or smooth < 0:
        raise UsageError(f"tversky_loss: alpha, beta and smooth must be >= 0, got {alpha}, {beta}, {smooth}")
    g = _check(logits, target, "tversky_loss")
    p = torch.sigmoid(logits)
    tp = (p * g).sum()
    fp = (p * (1 - g)).sum()
    fn = ((1 - p) * g).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def structure_weights(target: torch.Tensor, kernel: int = 31) -> torch.Tensor:
    """PraNet's edge weights w = 1 + 5 |avgpool_kernel(g) - g| (stride 1, zero padding kernel // 2, padded zeros
    counted): 1 wherever the ``kernel`` window around a pixel is uniform, up to 6 near mask boundaries."""
    if kernel < 1 or kernel % 2 == 0:
        raise UsageError(f"structure loss kernel must be a positive odd size, got {kernel}")
    if target.ndim not in (4, 5):
        raise UsageError(f"structure loss expects (B, C, H, W) or (B, C, D, H, W) tensors, got {tuple(target.shape)}")
    pool = F.avg_pool2d if target.ndim == 4 else F.avg_pool3d
    g = target.float() if not target.is_floating_point() else target
    spatial = g.ndim - 2
    mean = g
    for axis in range(spatial):  # the zero-padded box mean is separable: one 1D mean per axis (cheap in 3D too)
        size = [1] * spatial
        size[axis] = kernel
        pad = [0] * (2 * spatial)
        pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = kernel // 2  # F.pad: last axis first
        mean = pool(F.pad(mean, pad), tuple(size), stride=1)
    return 1 + 5 * torch.abs(mean - g)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, kernel: int = 31) -> torch.Tensor:
    """PraNet structure loss: weighted BCE + weighted IoU per image (weights of ``structure_weights``), batch mean.

    wBCE = sum(w bce) / sum(w); wIoU = 1 - (sum(w p g) + 1) / (sum(w (p + g)) - sum(w p g) + 1), sums per image.
    """
    g = _check(logits, target, "structure_loss", (4, 5))
    w = structure_weights(g, kernel)
    dims = tuple(range(1, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    wbce = (w * bce).sum(dims) / w.sum(dims)
    p = torch.sigmoid(logits)
    inter = (w * p * g).sum(dims)
    union = (w * (p + g)).sum(dims)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def snet_loss(output, target: torch.Tensor, side_weight: float = 1.0, alpha: float = 0.7,
              beta: float = 0.3) -> torch.Tensor:
    """S-Net loss: Tversky on the main logits + ``side_weight`` * structure loss on each side output.

    ``output``: an ``SNetOutput`` (or any (logits, side list) pair); target (B, 1, H, W).
    """
    logits, side = output
    loss = tversky_loss(logits, target, alpha, beta)
    for s in side:
        loss = loss + side_weight * structure_loss(s, target)
    return loss


@torch.no_grad()
def adaptive_pos_weight(target: torch.Tensor, max_weight: float = 1000.0) -> torch.Tensor:
    """Foreground weight of ``adaptive_bce``: background / foreground voxel count of the batch, clamped to
    [1, ``max_weight``] (an empty target gives ``max_weight``, which then weighs nothing). No gradient."""
    if not max_weight >= 1:
        raise UsageError(f"adaptive_bce: max_weight must be >= 1, got {max_weight}")
    g = target.float()
    fg = g.sum()
    bg = g.numel() - fg
    return (bg / fg.clamp_min(1e-6)).clamp(1.0, float(max_weight))


def adaptive_bce(logits: torch.Tensor, target: torch.Tensor, max_weight: float = 1000.0) -> torch.Tensor:
    """BCE with logits, mean over all voxels, with the foreground voxels re-weighted by ``adaptive_pos_weight``.

    The weight is recomputed for every batch (no gradient flows through it), so that foreground and background
    contribute about equally whatever the node volume: with w = bg / fg, the foreground terms sum to the same total
    weight as the background ones. 2D (B, C, H, W) and 3D (B, C, D, H, W) alike.
    """
    g = _check(logits, target, "adaptive_bce")
    w = adaptive_pos_weight(g, max_weight).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, g, pos_weight=w)
