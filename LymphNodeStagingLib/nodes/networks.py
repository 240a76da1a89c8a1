"""Lymph node segmentation networks: S-Net (2D, axial CT slices) and a 3D residual U-Net (CT crop of the mediastinum).

S-Net (Al Hasan et al., J Imaging Inform Med 37(6):2955-2966, 2024), written from the paper's description:

- encoder that downsamples only twice: 3x3 conv to c0 + one residual block (full resolution); max-pool, two blocks
  c0 -> c1 (1/2); max-pool, two blocks c1 -> c2 and two c2 blocks with dilation 2 (1/4). Blocks are pre-activation
  residual blocks (BN-ReLU-conv3x3 twice) with squeeze-and-excitation (reduction 2) and a 1x1 shortcut when the
  channel count changes;
- dense ASPP at 1/4: four chained blocks at dilation rates 3, 6, 12, 18 (BN-ReLU-1x1 to 64, BN-ReLU-3x3 dilated to
  32), each fed with the encoder feature concatenated with all previous block outputs; the output is the encoder
  feature concatenated with the four block outputs: c2 + 4 * 32 = 192 channels by default;
- decoder: nearest x2 upsampling, concatenation with the (attention-refined) skip, one residual SE block per level
  (192 -> c1 -> c0), then BN-ReLU and a 1x1 head to one logit channel at full resolution;
- reverse axial attention on each skip: a side map p (1x1 conv of the upsampled decoder feature) gates, through
  1 - sigmoid(p), an axial self-attention of the encoder feature (along the height, then along the width; query and
  key at C/8 channels, value at C, residual scaled by a learnable gamma that starts at 0); three 3x3 conv-BN-PReLU
  layers reduce the gated feature to one channel and p is added back. The refined side map is a side output (deep
  supervision; ``SNetOutput.side``, coarsest first, upsampled to the input size).

Deviations of the published S-Net code that are NOT followed here:

- its reshape makes both axial passes attend along the width when H == W; here the first pass always attends along
  the height (within each column) and the second along the width (within each row), whatever the shape;
- its side outputs feed deep supervision only; here (``SNetConfig.side_to_decoder``, default True, the paper's
  intent) the decoder uses them: the gated attention feature replaces the raw skip in the concatenation and the
  refined side logit is concatenated as one more channel. ``side_to_decoder=False`` gives the published wiring
  (raw skip, side maps supervised only).

Own choices where neither paper nor code decides: attention logits are scaled by 1/sqrt(query channels); a final
BN-ReLU precedes the 1x1 head (the blocks are pre-activation); side maps are upsampled bilinearly.

3D residual U-Net (Shevtsov et al., preprint: the node segmentation step of their CT pipeline): residual blocks (conv3-BN-ReLU-conv3-BN + shortcut,
ReLU after), max-pool down, transposed conv (or trilinear upsampling) up + concatenation, one logit channel; "fewer
levels, more channels" than the station network: 3 levels of (32, 64, 128) channels by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

UPSAMPLE_MODES = ("transpose", "trilinear")


def _from_dict(cls, data: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{what} configuration has unknown keys {sorted(unknown)}; expected {sorted(known)}")
    return cls(**data)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def state_dict_megabytes(model: nn.Module) -> float:
    """Size in MB (10^6 bytes) of the tensors of ``model.state_dict()`` (parameters and buffers) as stored."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


# --------------------------------------------------------------------------------------------------------------------
# S-Net
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SNetConfig:
    """Architecture of S-Net. Defaults: the paper's network (32/48/64 channels, dense ASPP of 192 channels)."""

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 48, 64)  # encoder channels at 1, 1/2 and 1/4 resolution, before ``width``
    width: float = 1.0  # scale of every channel count (0.25: a tiny network for tests)
    aspp_rates: tuple[int, ...] = (3, 6, 12, 18)
    aspp_mid: int = 64  # 1x1 bottleneck of each dense ASPP block, before ``width``
    aspp_out: int = 32  # output channels of each dense ASPP block, before ``width``
    dilated_blocks: int = 2  # c2-channel blocks with dilation 2 at the end of the encoder
    se_reduction: int = 2
    attention_reduction: int = 8  # query/key channels of the axial attention = C / attention_reduction
    side_to_decoder: bool = True  # False: the published wiring (raw skips; side maps for deep supervision only)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)
        self.width = float(self.width)
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise UsageError(f"S-Net channels must be 3 positive counts (full, 1/2, 1/4 resolution), got {self.channels}")
        if not self.width > 0:
            raise UsageError(f"S-Net width must be > 0, got {self.width}")
        if not self.aspp_rates or min(self.aspp_rates) < 1:
            raise UsageError(f"S-Net aspp_rates must be non-empty positive dilation rates, got {self.aspp_rates}")
        if min(self.in_channels, self.aspp_mid, self.aspp_out, self.se_reduction, self.attention_reduction) < 1 \
                or self.dilated_blocks < 0:
            raise UsageError(f"invalid S-Net configuration {self}")

    def scaled(self, c: int) -> int:
        """A channel count after the ``width`` scale (at least 2)."""
        return max(2, int(round(c * self.width)))

    @property
    def encoder_channels(self) -> tuple[int, int, int]:
        c0, c1, c2 = (self.scaled(c) for c in self.channels)
        return c0, c1, c2

    @property
    def aspp_channels(self) -> int:
        """Channels of the dense ASPP output: the encoder feature + one output per rate (192 by default)."""
        return self.encoder_channels[2] + len(self.aspp_rates) * self.scaled(self.aspp_out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> SNetConfig:
        return _from_dict(cls, data, "S-Net")

    @classmethod
    def tiny(cls, **kw) -> SNetConfig:
        """A tiny S-Net (a quarter of the channels) for tests and quick CPU experiments."""
        kw.setdefault("width", 0.25)
        return cls(**kw)


class SqueezeExcitation(nn.Module):
    """Channel re-weighting: global average -> FC (C/r) -> ReLU -> FC (C) -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 2, dims: int = 2):
        super().__init__()
        hidden = max(1, channels // reduction)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.fc1 = conv(channels, hidden, 1)
        self.fc2 = conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class PreActSEBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3 twice, squeeze-and-excitation, 1x1 shortcut if cin != cout."""

    def __init__(self, cin: int, cout: int, dilation: int = 1, se_reduction: int = 2):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.se = SqueezeExcitation(cout, se_reduction)
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return self.se(h) + self.shortcut(x)


class DenseASPP(nn.Module):
    """Chained atrous blocks; block i sees the input concatenated with every previous block output (dense).

    Each block: BN-ReLU-conv1x1 to ``mid``, BN-ReLU-conv3x3 with dilation ``rate`` to ``out``. Output: the input
    concatenated with all block outputs, ``cin + len(rates) * out`` channels.
    """

    def __init__(self, cin: int, mid: int, out: int, rates: Sequence[int]):
        super().__init__()
        self.blocks = nn.ModuleList()
        c = cin
        for r in rates:
            self.blocks.append(nn.Sequential(
                nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, mid, 1, bias=False),
                nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, out, 3, padding=r, dilation=r, bias=False),
            ))
            c += out
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for block in self.blocks:
            feats.append(block(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class AxialAttention(nn.Module):
    """Self-attention along one spatial axis of a (B, C, H, W) map, with a gamma-scaled residual (gamma starts at 0).

    ``axis="height"``: every pixel attends to the pixels of its own column (varying h, same w);
    ``axis="width"``: to the pixels of its own row (same h, varying w). Query/key at C / ``reduction`` channels.
    """

    def __init__(self, channels: int, axis: str, reduction: int = 8):
        super().__init__()
        if axis not in ("height", "width"):
            raise UsageError(f"axial attention axis must be 'height' or 'width', got {axis!r}")
        self.axis = axis
        qk = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = 1.0 / math.sqrt(qk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # Move the attended axis last and fold the other one into the batch: (B * other, C', L).
        perm = (0, 3, 1, 2) if self.axis == "height" else (0, 2, 1, 3)  # (B, W, C, H) or (B, H, C, W)
        other, length = (w, h) if self.axis == "height" else (h, w)

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.permute(*perm).reshape(b * other, t.shape[1], length)

        q, k, v = fold(self.query(x)), fold(self.key(x)), fold(self.value(x))
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # (B*other, L, L)
        out = torch.bmm(v, attn.transpose(1, 2))  # (B*other, C, L)
        out = out.reshape(b, other, -1, length)
        out = out.permute(0, 2, 3, 1) if self.axis == "height" else out.permute(0, 2, 1, 3)
        return x + self.gamma * out


class ConvBNPReLU(nn.Sequential):
    """3x3 conv -> BN -> PReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class ReverseAxialAttention(nn.Module):
    """Reverse axial attention on one skip: returns the gated attention feature and the refined side logit.

    p = 1x1 conv of the decoder feature (at the skip's resolution); gated = (1 - sigmoid(p)) * axial(skip);
    side = p + three 3x3 conv-BN-PReLU layers (C, C, 1 channels) of ``gated``.
    """

    def __init__(self, skip_channels: int, decoder_channels: int, reduction: int = 8):
        super().__init__()
        self.side = nn.Conv2d(decoder_channels, 1, 1)
        self.axial = nn.Sequential(AxialAttention(skip_channels, "height", reduction),
                                   AxialAttention(skip_channels, "width", reduction))
        self.refine = nn.Sequential(ConvBNPReLU(skip_channels, skip_channels), ConvBNPReLU(skip_channels, skip_channels),
                                    ConvBNPReLU(skip_channels, 1))

    def forward(self, skip: torch.Tensor, decoder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.side(decoder)
        gated = (1.0 - torch.sigmoid(p)) * self.axial(skip)
        return gated, p + self.refine(gated)


class SNetOutput(NamedTuple):
    """S-Net outputs: main logits (B, 1, H, W) and side logits, coarsest first, each upsampled to (B, 1, H, W)."""

    logits: torch.Tensor
    side: list[torch.Tensor]


class SNet(nn.Module):
    """S-Net: CT slice (B, 1, H, W), windowed 40/400 and scaled to [0, 1] outside, H and W multiples of 4."""

    def __init__(self, config: SNetConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else SNetConfig()
        c0, c1, c2 = cfg.encoder_channels
        se = cfg.se_reduction
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, c0, 3, padding=1), PreActSEBlock(c0, c0, se_reduction=se))
        self.enc2 = nn.Sequential(PreActSEBlock(c0, c1, se_reduction=se), PreActSEBlock(c1, c1, se_reduction=se))
        self.enc3 = nn.Sequential(PreActSEBlock(c1, c2, se_reduction=se), PreActSEBlock(c2, c2, se_reduction=se),
                                  *(PreActSEBlock(c2, c2, dilation=2, se_reduction=se) for _ in range(cfg.dilated_blocks)))
        self.aspp = DenseASPP(c2, cfg.scaled(cfg.aspp_mid), cfg.scaled(cfg.aspp_out), cfg.aspp_rates)
        ca = self.aspp.out_channels
        extra = 1 if cfg.side_to_decoder else 0  # the refined side logit as one more decoder input channel
        self.ra2 = ReverseAxialAttention(c1, ca, cfg.attention_reduction)
        self.dec2 = PreActSEBlock(ca + c1 + extra, c1, se_reduction=se)
        self.ra1 = ReverseAxialAttention(c0, c1, cfg.attention_reduction)
        self.dec1 = PreActSEBlock(c1 + c0 + extra, c0, se_reduction=se)
        self.head = nn.Sequential(nn.BatchNorm2d(c0), nn.ReLU(), nn.Conv2d(c0, 1, 1))

    def _decode(self, up: torch.Tensor, skip: torch.Tensor, ra: ReverseAxialAttention,
                block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        gated, side = ra(skip, up)
        parts = [up, gated, side] if self.config.side_to_decoder else [up, skip]
        return block(torch.cat(parts, dim=1)), side

    def forward(self, x: torch.Tensor) -> SNetOutput:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise UsageError(f"S-Net expects (B, {self.config.in_channels}, H, W) with H and W multiples of 4, "
                             f"got {tuple(x.shape)}")
        size = x.shape[2:]
        e1 = self.stem(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d = self.aspp(e3)
        d, side2 = self._decode(F.interpolate(d, scale_factor=2, mode="nearest"), e2, self.ra2, self.dec2)
        d, side1 = self._decode(F.interpolate(d, scale_factor=2, mode="nearest"), e1, self.ra1, self.dec1)
        side2 = F.interpolate(side2, size=size, mode="bilinear", align_corners=False)
        return SNetOutput(self.head(d), [side2, side1])


# --------------------------------------------------------------------------------------------------------------------
# 3D residual U-Net
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class UNet3DConfig:
    """Architecture of the 3D node U-Net. ``levels`` resolutions with ``channels[i]`` channels at level i."""

    in_channels: int = 1
    levels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    upsample: str = "transpose"  # "transpose" (ConvTranspose3d 2^3, stride 2) or "trilinear"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.levels < 1 or len(self.channels) != self.levels or min(self.channels) < 1:
            raise UsageError(f"U-Net channels {self.channels} must hold one positive count per level "
                             f"(levels = {self.levels})")
        if self.upsample not in UPSAMPLE_MODES:
            raise UsageError(f"U-Net upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.in_channels < 1:
            raise UsageError(f"U-Net in_channels must be >= 1, got {self.in_channels}")

    @property
    def divisor(self) -> int:
        """D, H and W of the input must be multiples of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> UNet3DConfig:
        return _from_dict(cls, data, "U-Net")

    @classmethod
    def tiny(cls, **kw) -> UNet3DConfig:
        """A tiny U-Net (4/8/16 channels) for tests and quick CPU experiments."""
        levels = kw.pop("levels", 3)
        kw.setdefault("channels", tuple(4 * 2 ** i for i in range(levels)))
        return cls(levels=levels, **kw)


class ResBlock3d(nn.Module):
    """conv3-BN-ReLU-conv3-BN + shortcut (1x1x1 conv + BN if the channel count changes), then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
        )
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False),
                                                                         nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UNet3D(nn.Module):
    """Residual 3D U-Net: (B, C, D, H, W) -> logits (B, 1, D, H, W); D, H, W multiples of 2 ** (levels - 1)."""

    def __init__(self, config: UNet3DConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else UNet3DConfig()
        ch = cfg.channels
        self.down = nn.ModuleList()
        cin = cfg.in_channels
        for c in ch:
            self.down.append(ResBlock3d(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for lvl in range(cfg.levels - 2, -1, -1):
            deep, c = ch[lvl + 1], ch[lvl]
            if cfg.upsample == "transpose":
                self.up.append(nn.ConvTranspose3d(deep, c, 2, stride=2))
                self.dec.append(ResBlock3d(2 * c, c))
            else:
                self.up.append(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))
                self.dec.append(ResBlock3d(deep + c, c))
        self.head = nn.Conv3d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.config.divisor
        if x.ndim != 5 or x.shape[1] != self.config.in_channels or any(s % k for s in x.shape[2:]):
            raise UsageError(f"U-Net expects (B, {self.config.in_channels}, D, H, W) with D, H, W multiples of {k}, "
                             f"got {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
