"""The station network: a 3D residual U-Net with two heads (Shevtsov et al., first step of their CT pipeline).

- Encoder: one residual block per level (conv3-BN-ReLU-conv3-BN + shortcut, ReLU after the sum), max-pooling
  between levels; decoder: trilinear upsampling, concatenation with the skip, one residual block per level. Every
  convolution is followed by batch norm and a ReLU except the two 1x1 output convolutions.
- Head "mediastinum": one logit, the station region (the union of the 17 stations) against the background; loss:
  binary cross-entropy with adaptive foreground re-weighting (positive weight = background / foreground voxels of the
  batch, clamped to 1..1000, a constant for the gradient).
- Head "stations": 17 logits, the station of a voxel inside the region; loss: cross-entropy over the voxels of the
  true region only.

The map of a voxel: background when sigmoid(mediastinum) < 0.5, else the station of the largest logit; the class
probabilities are (1 - p) for the background and p * softmax(stations) for the stations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..nodes.networks import ResBlock3d
from ..staging.stations import NUM_STATIONS


@dataclass
class StationNetConfig:
    """Architecture: ``channels[i]`` channels at level i (``len(channels)`` levels, each halving the grid)."""

    in_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32, 48)
    stations: int = NUM_STATIONS

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 1 or min(self.channels) < 1 or self.in_channels < 1:
            raise UsageError(f"station network channels must be positive counts, got {list(self.channels)}")
        if self.stations != NUM_STATIONS:
            raise UsageError(f"station network must have {NUM_STATIONS} station outputs, got {self.stations}")

    @property
    def divisor(self) -> int:
        """D, H and W of the input must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> StationNetConfig:
        if not isinstance(data, dict):
            raise UsageError(f"station network configuration must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"station network configuration has unknown keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def tiny(cls) -> StationNetConfig:
        """A tiny network (2 levels, 4/8 channels) for tests."""
        return cls(channels=(4, 8))


class StationNetOutput(NamedTuple):
    """Logits of the two heads: mediastinum (B, 1, D, H, W) and stations (B, 17, D, H, W)."""

    mediastinum: torch.Tensor
    stations: torch.Tensor


class StationNet(nn.Module):
    """Two-head residual 3D U-Net: windowed CT (B, 1, D, H, W), sizes multiples of ``config.divisor``."""

    def __init__(self, config: StationNetConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else StationNetConfig()
        ch = cfg.channels
        self.down = nn.ModuleList()
        cin = cfg.in_channels
        for c in ch:
            self.down.append(ResBlock3d(cin, c))
            cin = c
        self.dec = nn.ModuleList(ResBlock3d(ch[lvl + 1] + ch[lvl], ch[lvl]) for lvl in range(len(ch) - 2, -1, -1))
        self.mediastinum_head = nn.Conv3d(ch[0], 1, 1)
        self.station_head = nn.Conv3d(ch[0], cfg.stations, 1)

    def forward(self, x: torch.Tensor) -> StationNetOutput:
        k = self.config.divisor
        if x.ndim != 5 or x.shape[1] != self.config.in_channels or any(s % k for s in x.shape[2:]):
            raise UsageError(f"station network expects (B, {self.config.in_channels}, D, H, W) with D, H, W "
                             f"multiples of {k}, got {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for dec in self.dec:
            skip = skips.pop()
            x = dec(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False), skip],
                              dim=1))
        return StationNetOutput(self.mediastinum_head(x), self.station_head(x))


def adaptive_bce(logits: torch.Tensor, target: torch.Tensor, max_weight: float = 1000.0) -> torch.Tensor:
    """BCE with the foreground voxels weighted by background / foreground count of the batch (clamped 1..max)."""
    if logits.shape != target.shape:
        raise UsageError(f"adaptive_bce: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    t = target.to(logits.dtype)
    fg = t.sum()
    weight = ((t.numel() - fg) / fg.clamp_min(1.0)).clamp(1.0, max_weight).detach()
    return F.binary_cross_entropy_with_logits(logits, t, pos_weight=weight)


def station_losses(out: StationNetOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two losses of a batch and their sum: ``labels`` (B, D, H, W) int64, 0 = background, 1..17 = station.

    "mediastinum": adaptive BCE of the region head against labels > 0; "stations": cross-entropy of the station
    head over the voxels of the true region (0 when the batch has none); "total": their sum."""
    if labels.ndim != 4 or tuple(labels.shape) != tuple(out.mediastinum.shape[:1] + out.mediastinum.shape[2:]):
        raise UsageError(f"station labels {tuple(labels.shape)} do not fit the network output "
                         f"{tuple(out.mediastinum.shape)}")
    region = labels > 0
    bce = adaptive_bce(out.mediastinum[:, 0], region.float())
    if region.any():
        logits = out.stations.permute(0, 2, 3, 4, 1)[region]  # (N, 17)
        ce = F.cross_entropy(logits, labels[region] - 1)
    else:
        ce = out.stations.sum() * 0.0
    return {"mediastinum": bce, "stations": ce, "total": bce + ce}


def class_probabilities(out: StationNetOutput) -> torch.Tensor:
    """(B, 18, D, H, W): background (1 - p) and the 17 stations p * softmax(stations), p = sigmoid(mediastinum)."""
    p = torch.sigmoid(out.mediastinum)
    return torch.cat([1.0 - p, p * torch.softmax(out.stations, dim=1)], dim=1)
