"""Networks: the per-station classifier (the paper's 6-block 3D CNN) and the staging model (TS2/TS3 head).

Reference configuration (the paper's, docs/explanation/method.md): 2-channel 64^3 patches, 6 blocks of
[Conv3d 3^3 without bias -> InstanceNorm3d -> Dropout3d -> MaxPool3d 2 -> ReLU] with 8..256 channels, then one
linear layer to a malignancy logit. Differences from the original, by design: the station identity enters as a
learned embedding (not a raw index through Linear(1, 1)); the staging head has a non-linearity; an optional
rule-consistent ordinal output gives P(N >= k) from the group maxima of the station probabilities for the patient's
tumour side (docs/explanation/method.md), so it has gradients and never contradicts the rule table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..staging.rules import DEFAULT_RULES, SIDES, load_rules
from ..staging.stations import NUM_STATIONS

#: Number of N-stages (N0..N3) and of ordinal thresholds (N>=1, N>=2, N>=3).
NUM_N_STAGES = 4


@dataclass
class ModelConfig:
    """Architecture of the station classifier and the staging head. Defaults: the paper's reference network."""

    in_channels: int = 2
    patch_size: int = 64
    patch_spacing: float = 1.0  # mm per patch voxel: the network sees patch_size * patch_spacing mm
    channels: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.2, 0.2, 0.2)
    station_embedding_dim: int = 8  # 0: no station identity
    head_hidden: int = 32
    side_embedding_dim: int = 4
    rules: str = DEFAULT_RULES  # rule set of the ordinal (group-maximum) layer

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.dropout = tuple(float(p) for p in self.dropout)
        self.patch_spacing = float(self.patch_spacing)
        if not self.patch_spacing > 0:
            raise UsageError(f"patch_spacing must be > 0 mm, got {self.patch_spacing}")
        if not self.channels or len(self.channels) != len(self.dropout):
            raise UsageError(f"model channels {self.channels} and dropout {self.dropout} must be non-empty "
                             "and of the same length (one entry per block)")
        if self.patch_size < 2 ** len(self.channels):
            raise UsageError(f"patch_size {self.patch_size} is too small for {len(self.channels)} blocks "
                             f"(each halves the size; need >= {2 ** len(self.channels)})")
        if self.in_channels < 1 or self.station_embedding_dim < 0 or self.head_hidden < 1:
            raise UsageError(f"invalid model configuration {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["dropout"] = list(self.dropout)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"model configuration has unknown keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)

    @classmethod
    def small(cls, patch_size: int = 32, **kw) -> ModelConfig:
        """A small configuration (fewer channels, 32^3 patches) with the paper's 64 mm field of view: coarser voxels
        (2 mm at 32^3). For the bundled demo model, tests and quick experiments on a CPU."""
        blocks = max(1, min(5, int(np.log2(patch_size))))
        chans = tuple(4 * 2 ** i for i in range(blocks))
        drops = (0.0,) * blocks
        kw.setdefault("patch_spacing", 64.0 / patch_size)
        return cls(patch_size=patch_size, channels=chans, dropout=drops, station_embedding_dim=4, head_hidden=16, **kw)


class ConvBlock(nn.Sequential):
    """Conv3d 3^3 (no bias) -> InstanceNorm3d -> Dropout3d -> MaxPool3d(2) -> ReLU, in the paper's order."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__(
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=False),
            nn.Dropout3d(dropout),
            nn.MaxPool3d(2),
            nn.ReLU(),
        )


class StationClassifier(nn.Module):
    """Patch (B, C, S, S, S) + station index (B,) -> malignancy logit (B,)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        blocks, cin = [], config.in_channels
        for cout, p in zip(config.channels, config.dropout, strict=True):
            blocks.append(ConvBlock(cin, cout, p))
            cin = cout
        self.encoder = nn.Sequential(*blocks, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.feature_dim = cin
        emb = config.station_embedding_dim
        self.station_embedding = nn.Embedding(NUM_STATIONS, emb) if emb else None
        self.fc = nn.Linear(cin + emb, 1)

    def forward(self, patches: torch.Tensor, station: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(patches)
        if self.station_embedding is not None:
            feats = torch.cat([feats, self.station_embedding(station.long())], dim=1)
        return self.fc(feats).squeeze(1)


@dataclass
class StagingOutput:
    """Outputs of the staging model for a batch of B patients."""

    station_logits: torch.Tensor  # (B, 17); absent stations hold the learned "absent" logit
    n_logits: torch.Tensor  # (B, 4) N0..N3 from the learned head
    group_probs: torch.Tensor  # (B, 3) max station probability in groups N1, N2, N3 for the patient's side
    ordinal: torch.Tensor  # (B, 3) rule-consistent P(N>=1), P(N>=2), P(N>=3)
    present: torch.Tensor = field(repr=False)  # (B, 17) bool

    @property
    def station_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.station_logits) * self.present

    @property
    def rule_stage_probs(self) -> torch.Tensor:
        """(B, 4) P(N = k) implied by the ordinal output."""
        return ordinal_to_stage_probs(self.ordinal)


def group_probabilities(station_probs: torch.Tensor, group_masks: torch.Tensor) -> torch.Tensor:
    """Group maxima (B, 3): station_probs (B, 17) in [0, 1], group_masks (B, 3, 17) bool. Empty group -> 0."""
    masked = station_probs.unsqueeze(1) * group_masks.to(station_probs.dtype)
    return masked.amax(dim=2)


def rule_ordinal(group_probs: torch.Tensor) -> torch.Tensor:
    """P(N>=1), P(N>=2), P(N>=3) from group maxima (B, 3): P(N>=k) = max over groups >= k (monotone by construction)."""
    rev = torch.flip(group_probs, dims=[1])
    return torch.flip(torch.cummax(rev, dim=1).values, dims=[1])


def ordinal_to_stage_probs(ordinal: torch.Tensor) -> torch.Tensor:
    """(B, 3) cumulative P(N>=k) -> (B, 4) P(N=k)."""
    one = torch.ones_like(ordinal[:, :1])
    zero = torch.zeros_like(ordinal[:, :1])
    ge = torch.cat([one, ordinal, zero], dim=1)
    return (ge[:, :-1] - ge[:, 1:]).clamp_min(0.0)


class StagingModel(nn.Module):
    """TS2/TS3 model: one shared station classifier over the 17 station patches, then the N-stage head.

    Head input: the 17 station logits (absent stations get a learned constant) and a learned tumour-side embedding;
    head: Linear -> ReLU -> Linear to N0..N3. The rule-consistent ordinal output uses the group masks of the
    configured rule set for each patient's side.
    """

    def __init__(self, config: ModelConfig, classifier: StationClassifier | None = None):
        super().__init__()
        self.config = config
        self.classifier = classifier if classifier is not None else StationClassifier(config)
        self.absent_logit = nn.Parameter(torch.tensor(-4.0))
        self.side_embedding = nn.Embedding(len(SIDES), config.side_embedding_dim)
        self.head = nn.Sequential(
            nn.Linear(NUM_STATIONS + config.side_embedding_dim, config.head_hidden),
            nn.ReLU(),
            nn.Linear(config.head_hidden, NUM_N_STAGES),
        )
        rules = load_rules(config.rules)
        masks = np.stack([rules.group_masks(s) for s in SIDES])  # (2, 3, 17)
        self.register_buffer("group_masks", torch.as_tensor(masks), persistent=False)

    def freeze_encoder(self) -> None:
        """TS3: freeze the whole station classifier (encoder, station embedding, fc)."""
        for p in self.classifier.parameters():
            p.requires_grad_(False)

    def forward(self, patches: torch.Tensor, side: torch.Tensor, present: torch.Tensor) -> StagingOutput:
        """patches (B, 17, C, S, S, S), side (B,) 0 = R / 1 = L, present (B, 17) bool."""
        b, s = patches.shape[:2]
        if s != NUM_STATIONS:
            raise UsageError(f"staging model expects {NUM_STATIONS} station patches per patient, got {s}")
        present = present.bool()
        station = torch.arange(NUM_STATIONS, device=patches.device).expand(b, -1)
        logits = self.absent_logit.expand(b, s).clone()
        if present.any():
            logits[present] = self.classifier(patches[present], station[present]).to(logits.dtype)
        side = side.long()
        head_in = torch.cat([logits, self.side_embedding(side)], dim=1)
        n_logits = self.head(head_in)
        probs = torch.sigmoid(logits) * present
        groups = group_probabilities(probs, self.group_masks[side])
        return StagingOutput(logits, n_logits, groups, rule_ordinal(groups), present)


def build_model(kind: str, config: ModelConfig) -> nn.Module:
    """``kind`` "station" (TS1) or "staging" (TS2/TS3)."""
    if kind == "station":
        return StationClassifier(config)
    if kind == "staging":
        return StagingModel(config)
    raise UsageError(f"model kind must be 'station' or 'staging', got {kind!r}")


def station_classifier_of(model: nn.Module) -> StationClassifier:
    """The station classifier inside a TS1 or TS2/TS3 model."""
    if isinstance(model, StationClassifier):
        return model
    if isinstance(model, StagingModel):
        return model.classifier
    raise UsageError(f"not a LymphNodeStaging model: {type(model).__name__}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_stations(model: nn.Module, patches: np.ndarray | torch.Tensor, stations: Sequence[int] | np.ndarray,
                     batch_size: int = 17) -> np.ndarray:
    """Malignancy probabilities (S,) for patches (S, C, D, H, W) of station indices (S,), in eval mode."""
    clf = station_classifier_of(model)
    was_training = clf.training
    clf.eval()
    device = model_device(clf)
    x = torch.as_tensor(np.asarray(patches) if not isinstance(patches, torch.Tensor) else patches)
    st = torch.as_tensor(np.asarray(stations), dtype=torch.long)
    if x.ndim != 5 or len(st) != len(x):
        raise UsageError(f"patches must be (S, C, D, H, W) with one station index each, got {tuple(x.shape)} "
                         f"and {len(st)} indices")
    out = []
    try:
        for i in range(0, len(x), batch_size):
            logits = clf(x[i:i + batch_size].to(device, torch.float32), st[i:i + batch_size].to(device))
            out.append(torch.sigmoid(logits).float().cpu())
    finally:
        clf.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)

