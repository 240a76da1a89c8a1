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
#: Pooling of the K instance patches of a station, and normalisation layers of the encoder.
POOLINGS = ("max", "noisy_or", "attention")
NORMS = ("instance", "batch")
#: Station features of the hybrid head, in this order (raw values; the network reads log(1 + x / reference)):
#: SUV 2.5 (the classic visual cut-off) and 10 ml map to log 2.
HYBRID_FEATURES = ("suv_max", "suv_peak", "volume_ml")
HYBRID_REFERENCE = (2.5, 2.5, 10.0)


@dataclass
class ModelConfig:
    """Architecture of the station classifier and the staging head. Defaults: the paper's reference network."""

    in_channels: int = 2  # 2: CT + PET; 1: CT alone (CT-only mode)
    patch_size: int = 64
    patch_spacing: float = 1.0  # mm per patch voxel: the network sees patch_size * patch_spacing mm
    channels: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.2, 0.2, 0.2)
    station_embedding_dim: int = 8  # 0: no station identity
    head_hidden: int = 32
    side_embedding_dim: int = 4
    rules: str = DEFAULT_RULES  # rule set of the ordinal (group-maximum) layer
    # multiple-instance learning: K patches per station (1: one patch, the paper's), pooled to one station logit
    instances: int = 1
    pooling: str = "max"  # "max", "noisy_or" or "attention" (used when instances > 1)
    hybrid: bool = False  # the final layer also receives the station's SUVmax, SUVpeak and volume
    norm: str = "instance"  # "instance" (paper) or "batch": batch statistics keep absolute SUV levels

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
        if self.in_channels not in (1, 2) or self.station_embedding_dim < 0 or self.head_hidden < 1:
            raise UsageError(f"invalid model configuration {self} (in_channels: 2 for CT + PET, 1 for CT alone)")
        self.instances = int(self.instances)
        self.hybrid = bool(self.hybrid)
        if not 1 <= self.instances <= 64:
            raise UsageError(f"instances (patches per station) must be 1..64, got {self.instances}")
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.norm not in NORMS:
            raise UsageError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.hybrid and not self.uses_pet:
            raise UsageError("a CT-only station classifier (in_channels 1) cannot be hybrid: its SUV features "
                             "need the PET")

    @property
    def uses_pet(self) -> bool:
        """Whether the network reads a PET channel (False: CT-only mode)."""
        return self.in_channels == 2

    @property
    def modality(self) -> str:
        """"petct" or "ct"."""
        return "petct" if self.uses_pet else "ct"

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
    """Conv3d 3^3 (no bias) -> InstanceNorm3d -> Dropout3d -> MaxPool3d(2) -> ReLU, in the paper's order.

    With ``norm="batch"`` a BatchNorm3d takes the InstanceNorm's place: instance normalisation rescales every patch's
    feature maps to zero mean and unit variance, so a uniformly hotter patch looks like a colder one; batch
    normalisation (running statistics at inference) keeps the absolute SUV level that the PET channel carries.
    """

    def __init__(self, cin: int, cout: int, dropout: float, norm: str = "instance"):
        super().__init__(
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=False) if norm == "instance" else nn.BatchNorm3d(cout),
            nn.Dropout3d(dropout),
            nn.MaxPool3d(2),
            nn.ReLU(),
        )


def hybrid_inputs(features: torch.Tensor) -> torch.Tensor:
    """Raw station features (..., 3) = SUVmax, SUVpeak, volume in ml -> network inputs log(1 + x / reference)
    (``HYBRID_REFERENCE``), a scale on which SUV levels and volumes of nodes differ by units; NaN -> 0."""
    ref = torch.tensor(HYBRID_REFERENCE, dtype=torch.float32, device=features.device)
    return torch.log1p(torch.nan_to_num(features.float(), nan=0.0).clamp_min(0.0) / ref)


def noisy_or_logit(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logit of 1 - prod(1 - sigmoid(z_k)) over ``dim``, computed in log space (stable for large |z|)."""
    log_none = -nn.functional.softplus(logits).sum(dim=dim)  # log prod(1 - p_k) = log P(no instance positive)
    log_none = log_none.clamp(max=-1e-7)
    return torch.log(-torch.expm1(log_none)) - log_none


class StationClassifier(nn.Module):
    """Patches + station index (B,) [+ station features (B, 3)] -> malignancy logit (B,).

    Patches are (B, C, S, S, S) for one patch per station or (B, K, C, S, S, S) for a bag of K patches
    (multiple-instance learning). A bag is pooled to one station logit: ``max`` (the largest instance logit),
    ``noisy_or`` (P = 1 - prod(1 - p_k)) or ``attention`` (attention-weighted mean of the instance features, then
    the final layer). With ``hybrid`` the final layer also receives log(1 + x / reference) of SUVmax, SUVpeak and
    volume in ml, standardised by a BatchNorm1d.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        blocks, cin = [], config.in_channels
        for cout, p in zip(config.channels, config.dropout, strict=True):
            blocks.append(ConvBlock(cin, cout, p, config.norm))
            cin = cout
        self.encoder = nn.Sequential(*blocks, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.feature_dim = cin
        emb = config.station_embedding_dim
        self.station_embedding = nn.Embedding(NUM_STATIONS, emb) if emb else None
        n_hybrid = len(HYBRID_FEATURES) if config.hybrid else 0
        # the station features are standardised by batch statistics (running statistics at inference), so that
        # the final layer weighs them on the same scale as the image features from the first steps on
        self.hybrid_norm = nn.BatchNorm1d(n_hybrid) if n_hybrid else None
        self.fc = nn.Linear(cin + emb + n_hybrid, 1)
        self.attention = (nn.Sequential(nn.Linear(cin, config.head_hidden), nn.Tanh(),
                                        nn.Linear(config.head_hidden, 1))
                          if config.instances > 1 and config.pooling == "attention" else None)

    def _extra(self, station: torch.Tensor, features: torch.Tensor | None, n: int) -> list[torch.Tensor]:
        extra = []
        if self.station_embedding is not None:
            extra.append(self.station_embedding(station.long()))
        if self.config.hybrid:
            if features is None:
                raise UsageError("this station classifier is hybrid: it needs the station features "
                                 f"{', '.join(HYBRID_FEATURES)} for every patch")
            extra.append(self.hybrid_norm(hybrid_inputs(features).reshape(n, len(HYBRID_FEATURES))))
        return extra

    def instance_logits(self, patches: torch.Tensor, station: torch.Tensor,
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """Logit of every instance patch (B, K) of bags (B, K, C, S, S, S) (max and noisy-OR pooling)."""
        b, k = patches.shape[:2]
        feats = self.encoder(patches.flatten(0, 1)).reshape(b, k, -1)
        extra = self._extra(station, features, b)
        if extra:
            feats = torch.cat([feats, torch.cat(extra, dim=1).unsqueeze(1).expand(b, k, -1)], dim=2)
        return self.fc(feats).squeeze(2)

    def forward(self, patches: torch.Tensor, station: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if patches.ndim == 5:
            feats = self.encoder(patches)
            return self.fc(torch.cat([feats, *self._extra(station, features, len(feats))], dim=1)).squeeze(1)
        if patches.ndim != 6:
            raise UsageError(f"patches must be (B, C, S, S, S) or bags (B, K, C, S, S, S), got {tuple(patches.shape)}")
        if self.attention is None:
            z = self.instance_logits(patches, station, features)
            return z.amax(dim=1) if self.config.pooling == "max" or z.shape[1] == 1 else noisy_or_logit(z, dim=1)
        b, k = patches.shape[:2]
        h = self.encoder(patches.flatten(0, 1)).reshape(b, k, -1)
        a = torch.softmax(self.attention(h).squeeze(2), dim=1)
        pooled = (a.unsqueeze(2) * h).sum(dim=1)
        return self.fc(torch.cat([pooled, *self._extra(station, features, b)], dim=1)).squeeze(1)


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

    def forward(self, patches: torch.Tensor, side: torch.Tensor, present: torch.Tensor,
                features: torch.Tensor | None = None) -> StagingOutput:
        """patches (B, 17, C, S, S, S) or bags (B, 17, K, C, S, S, S), side (B,) 0 = R / 1 = L, present (B, 17)
        bool, features (B, 17, 3) for a hybrid station classifier."""
        b, s = patches.shape[:2]
        if s != NUM_STATIONS:
            raise UsageError(f"staging model expects {NUM_STATIONS} station patches per patient, got {s}")
        present = present.bool()
        station = torch.arange(NUM_STATIONS, device=patches.device).expand(b, -1)
        logits = self.absent_logit.expand(b, s).clone()
        if present.any():
            feats = features[present] if features is not None else None
            logits[present] = self.classifier(patches[present], station[present], feats).to(logits.dtype)
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
                     batch_size: int = 17, features: np.ndarray | None = None) -> np.ndarray:
    """Malignancy probabilities (S,) for patches (S, C, D, H, W) or bags (S, K, C, D, H, W) of station indices (S,),
    in eval mode; ``features`` (S, 3) raw SUVmax, SUVpeak, volume for a hybrid classifier."""
    clf = station_classifier_of(model)
    was_training = clf.training
    clf.eval()
    device = model_device(clf)
    x = torch.as_tensor(np.asarray(patches) if not isinstance(patches, torch.Tensor) else patches)
    st = torch.as_tensor(np.asarray(stations), dtype=torch.long)
    f = None if features is None else torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(len(st), -1)
    if x.ndim not in (5, 6) or len(st) != len(x):
        raise UsageError(f"patches must be (S, C, D, H, W) or (S, K, C, D, H, W) with one station index each, got "
                         f"{tuple(x.shape)} and {len(st)} indices")
    out = []
    try:
        for i in range(0, len(x), batch_size):
            fi = None if f is None else f[i:i + batch_size].to(device)
            logits = clf(x[i:i + batch_size].to(device, torch.float32), st[i:i + batch_size].to(device), fi)
            out.append(torch.sigmoid(logits).float().cpu())
    finally:
        clf.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
