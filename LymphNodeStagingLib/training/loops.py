"""Training: case samples, on-the-fly patch datasets, augmentation, and the TS1 / TS2 / TS3 loops.

- TS1: one sample = one (case, present station with a known label); BCE; oversampling of the rarer class.
- TS2: one sample = one case (17 station patches, N-stage, tumour side); CE + differentiable ordinal term +
  pseudo-label loss (inverse-frequency weights) + BCE where station labels exist. Cases with only an N-stage work.
- TS3: as TS2 with the station classifier (from TS1) frozen; only the head learns.

Common: Adam (lr 5e-4, weight decay 1e-3), ReduceLROnPlateau on the validation balanced accuracy, early stopping on
the same metric, best and last checkpoints with a manifest, resume from the last checkpoint after an interruption
(the result is identical to an uninterrupted run: every random draw is derived from (seed, epoch, position)).
Patch centres are drawn on the fly from the station weight maps; augmentation (random affine, elastic displacement,
CT noise) is applied while resampling the patch from the source images, so no border is ever padded with zeros.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..classifier.checkpoint import environment_versions, load_checkpoint, resume_training, save_checkpoint
from ..classifier.metrics import balanced_accuracy, binary_metrics, tune_threshold
from ..classifier.model import ModelConfig, StagingModel, StationClassifier, build_model, station_classifier_of
from ..classifier.patches import DEFAULT_PATCH_SPACING, StationSampler, crop_to_box, extract_patches
from ..errors import InputError, UsageError
from ..runtime import Progress, ProgressCallback, torch_threads
from ..staging.rules import UNKNOWN, load_rules, parse_n_stage, parse_side, pseudo_labels
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .losses import LossWeights, masked_bce, stage_class_weights, staging_loss

log = logging.getLogger(__name__)

STRATEGIES = ("ts1", "ts2", "ts3")
SIDE_INDEX = {"R": 0, "L": 1}


# ----------------------------------------------------------------------------------------------------------------
# Case samples


@dataclass
class CaseSample:
    """One PET/CT study for training or evaluation.

    ``station_labels`` (17,) holds 1 / 0 / -1 (unknown) per station; ``n_stage`` 0..3 or -1 (unknown); ``side`` R/L.
    ``sampler`` gives the centres (centroid, weighted draws) and tells which stations are present in the fused map.
    """

    patient_id: str
    ct: sitk.Image
    pet: sitk.Image | None  # None: CT alone
    sampler: StationSampler
    side: str
    n_stage: int = UNKNOWN
    station_labels: np.ndarray | None = None
    study: str = ""
    features: np.ndarray | None = None  # (17, 3) SUVmax, SUVpeak, volume ml per station (hybrid head); NaN absent

    def __post_init__(self) -> None:
        self.side = parse_side(self.side, f"tumour side of {self.patient_id}")
        self.n_stage = UNKNOWN if self.n_stage is None or self.n_stage == UNKNOWN else parse_n_stage(self.n_stage)
        if self.station_labels is None:
            self.station_labels = np.full(NUM_STATIONS, UNKNOWN, dtype=np.int64)
        labels = np.asarray(self.station_labels, dtype=np.int64).reshape(-1)
        if labels.shape != (NUM_STATIONS,) or not np.isin(labels, (0, 1, UNKNOWN)).all():
            raise UsageError(f"station_labels of {self.patient_id} must be {NUM_STATIONS} values in 1/0/-1, "
                             f"got {labels.tolist()}")
        self.station_labels = labels
        if self.features is not None:
            feats = np.asarray(self.features, dtype=np.float32)
            if feats.shape != (NUM_STATIONS, 3):
                raise UsageError(f"station features of {self.patient_id} must be (17, 3) (SUVmax, SUVpeak, volume), "
                                 f"got {feats.shape}")
            self.features = feats

    def station_features(self, stations: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, 3) raw features of the given station indices; NaN (read as 0) when the case has none."""
        if self.features is None:
            return np.full((len(stations), 3), np.nan, dtype=np.float32)
        return self.features[np.asarray(stations, dtype=int)]

    @property
    def present(self) -> np.ndarray:
        return self.sampler.present

    @property
    def pseudo_targets(self) -> np.ndarray:
        """(G1, G2, G3) pseudo-labels from the N-stage (-1 unknown); all unknown when the N-stage is unknown."""
        if self.n_stage == UNKNOWN:
            return np.full(3, UNKNOWN, dtype=np.int64)
        return pseudo_labels(self.n_stage)

    def cropped(self, margin_mm: float = 48.0) -> CaseSample:
        """The same case holding only the CT/PET box around the stations (+ margin): less memory in training."""
        box = self.sampler.bounding_box_mm(margin_mm)
        if box is None:
            return self
        return dataclasses.replace(self, ct=crop_to_box(self.ct, *box),
                                   pet=None if self.pet is None else crop_to_box(self.pet, *box))

    def without_pet(self) -> CaseSample:
        """The same case as a CT-only model sees it: no PET, no SUV features."""
        return dataclasses.replace(self, pet=None, features=None)


def data_fingerprint(cases: Sequence[CaseSample]) -> str:
    """sha256 over ids, labels, station presence and image content of the cases (order-independent)."""
    rows = []
    for c in cases:
        rows.append(json.dumps([c.patient_id, c.study, c.side, int(c.n_stage), c.station_labels.tolist(),
                                c.present.astype(int).tolist(), sitk.Hash(c.ct), "" if c.pet is None else sitk.Hash(c.pet)]))
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Augmentation


@dataclass
class AugmentConfig:
    """Training augmentation, applied while resampling each patch from the source images."""

    enabled: bool = True
    p_noise: float = 0.5
    noise_std: float = 0.1  # Gaussian noise on the normalised CT channel only
    p_affine: float = 0.5
    rotation_rad: float = 0.2  # per axis, uniform in +-
    shear: float = 0.05
    p_elastic: float = 0.5
    elastic_grid: int = 8  # displacement control points per axis over the patch
    elastic_sigma: float = 1.0  # smoothing of the random control displacements, in grid cells
    elastic_magnitude_mm: tuple[float, float] = (1.0, 4.0)  # std of the smoothed displacements, drawn uniformly


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_displacement(centre_mm: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                         extent_mm: float) -> sitk.Transform:
    """A smooth random displacement field over the patch (linear interpolation between control points)."""
    from scipy.ndimage import gaussian_filter

    n = max(int(cfg.elastic_grid), 2)
    disp = gaussian_filter(rng.normal(0.0, 1.0, (n, n, n, 3)), sigma=(cfg.elastic_sigma,) * 3 + (0,), mode="nearest")
    disp *= rng.uniform(*cfg.elastic_magnitude_mm) / max(float(disp.std()), 1e-12)
    field_img = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field_img.SetSpacing([extent_mm / (n - 1)] * 3)
    field_img.SetOrigin((np.asarray(centre_mm, dtype=np.float64) - extent_mm / 2).tolist())
    return sitk.DisplacementFieldTransform(field_img)


def random_transform(centre_mm: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, size: int,
                     spacing: float) -> sitk.Transform | None:
    """A random affine (about the centre) and/or smooth elastic displacement of the patch grid, or None."""
    if not cfg.enabled:
        return None
    parts: list[sitk.Transform] = []
    if rng.random() < cfg.p_affine:
        matrix = _rotation(rng.uniform(-cfg.rotation_rad, cfg.rotation_rad, 3))
        shear = np.eye(3)
        off = ~np.eye(3, dtype=bool)
        shear[off] = rng.uniform(-cfg.shear, cfg.shear, 6)
        affine = sitk.AffineTransform(3)
        affine.SetMatrix((matrix @ shear).ravel().tolist())
        affine.SetCenter([float(v) for v in centre_mm])
        parts.append(affine)
    if rng.random() < cfg.p_elastic:
        parts.append(_random_displacement(centre_mm, rng, cfg, size * spacing))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return sitk.CompositeTransform(parts)


def case_patches(case: CaseSample, stations: Sequence[int], rng: np.random.Generator | None, patch_size: int,
                 spacing: float, sampling: str = "weight_map", augment: AugmentConfig | None = None,
                 instances: int = 1) -> np.ndarray:
    """Patches (len(stations), C, s, s, s) of present stations (C = 2, or 1 for a case without PET), or bags
    (len(stations), K, C, s, s, s) with ``instances`` K > 1: weighted random centres (training) or the deterministic ones of ``StationSampler.bag``.

    ``rng`` None means inference: centroid (and spread) patches, no augmentation.
    """
    centres, transforms = [], []
    k = max(int(instances), 1)
    for idx in stations:
        if not case.sampler.present[idx]:
            raise InputError(f"station {STATION_NAMES[idx]} is absent from the station map of {case.patient_id}")
        if sampling == "centroid":
            cs = np.repeat(case.sampler.centroid(idx)[None], k, axis=0) if rng is not None \
                else case.sampler.bag(idx, k)
        else:
            cs = case.sampler.bag(idx, k, rng)
        for c in cs:
            centres.append(c)
            transforms.append(random_transform(c, rng, augment, patch_size, spacing)
                              if rng is not None and augment is not None else None)
    patches = extract_patches(case.ct, case.pet, np.asarray(centres).reshape(-1, 3), patch_size, spacing, transforms)
    if rng is not None and augment is not None and augment.enabled:
        for p in patches:
            if rng.random() < augment.p_noise:
                p[0] += rng.normal(0.0, augment.noise_std, p[0].shape).astype(np.float32)
    if k > 1:
        return patches.reshape(len(stations), k, *patches.shape[1:])
    return patches


# ----------------------------------------------------------------------------------------------------------------
# Datasets (indexable by a key that carries the epoch and the position, so every draw is reproducible)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


class StationPatchDataset(Dataset):
    """TS1 samples: one per (case, present station with a known label). Key = (epoch, position, item)."""

    def __init__(self, cases: Sequence[CaseSample], patch_size: int, spacing: float = DEFAULT_PATCH_SPACING,
                 sampling: str = "weight_map", augment: AugmentConfig | None = None, seed: int = 0,
                 train: bool = True, instances: int = 1):
        self.cases, self.patch_size, self.spacing = list(cases), patch_size, spacing
        self.sampling, self.augment, self.seed, self.train = sampling, augment, seed, train
        self.instances = instances
        self.items: list[tuple[int, int, int]] = []
        skipped = 0
        for ci, c in enumerate(self.cases):
            for si in range(NUM_STATIONS):
                label = int(c.station_labels[si])
                if label == UNKNOWN:
                    continue
                if not c.present[si]:
                    skipped += 1
                    continue
                self.items.append((ci, si, label))
        self.absent_labelled = skipped
        if skipped:
            log.info("%d labelled stations are absent from their station maps and excluded", skipped)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([it[2] for it in self.items], dtype=np.int64)

    def __getitem__(self, key) -> dict:
        epoch, position, item = key if isinstance(key, tuple) else (0, key, key)
        ci, si, label = self.items[item]
        rng = _rng(self.seed, epoch, position, 1) if self.train else None
        case = self.cases[ci]
        patch = case_patches(case, [si], rng, self.patch_size, self.spacing, self.sampling, self.augment,
                             self.instances)[0]
        return {"patch": torch.from_numpy(patch), "station": torch.tensor(si), "label": torch.tensor(label),
                "features": torch.from_numpy(case.station_features([si])[0]), "case": torch.tensor(ci)}


class CaseDataset(Dataset):
    """TS2/TS3 samples: one per case, the 17 station patches (zeros where absent, masked out by ``present``)."""

    def __init__(self, cases: Sequence[CaseSample], patch_size: int, spacing: float = DEFAULT_PATCH_SPACING,
                 sampling: str = "weight_map", augment: AugmentConfig | None = None, seed: int = 0,
                 train: bool = True, instances: int = 1):
        self.cases, self.patch_size, self.spacing = list(cases), patch_size, spacing
        self.sampling, self.augment, self.seed, self.train = sampling, augment, seed, train
        self.instances = instances

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.n_stage for c in self.cases], dtype=np.int64)

    def __getitem__(self, key) -> dict:
        epoch, position, item = key if isinstance(key, tuple) else (0, key, key)
        case = self.cases[item]
        rng = _rng(self.seed, epoch, position, 2) if self.train else None
        present = case.present
        idx = np.flatnonzero(present)
        s = self.patch_size
        bag = (self.instances,) if self.instances > 1 else ()
        patches = np.zeros((NUM_STATIONS, *bag, 1 if case.pet is None else 2, s, s, s), dtype=np.float32)
        if idx.size:
            patches[idx] = case_patches(case, idx.tolist(), rng, s, self.spacing, self.sampling, self.augment,
                                        self.instances)
        return {"patches": torch.from_numpy(patches), "present": torch.from_numpy(present),
                "features": torch.from_numpy(case.station_features(range(NUM_STATIONS))),
                "side": torch.tensor(SIDE_INDEX[case.side]), "n_stage": torch.tensor(case.n_stage),
                "station_labels": torch.from_numpy(case.station_labels),
                "pseudo": torch.from_numpy(case.pseudo_targets), "case": torch.tensor(item)}


def epoch_order(labels: np.ndarray, oversample: bool, rng: np.random.Generator) -> np.ndarray:
    """Item order of one epoch: a permutation, or len(labels) draws with replacement with weight 1/class count."""
    n = len(labels)
    if not oversample:
        return rng.permutation(n)
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


# ----------------------------------------------------------------------------------------------------------------
# Metrics


STAGE_THRESHOLD_GRID = np.round(np.arange(0.05, 0.991, 0.01), 2)


def tune_stage_threshold(cases: Sequence[CaseSample], probs: np.ndarray, rule_set, prefer: float = 0.5
                         ) -> tuple[float, float]:
    """Probability threshold whose station decisions, staged by the rules, give the best N-stage accuracy on the
    cases with a known N-stage (grid 0.05..0.99; ties -> nearest to ``prefer``). Returns (threshold, accuracy)."""
    known = [(c, pr) for c, pr in zip(cases, probs, strict=True) if c.n_stage != UNKNOWN]
    if not known:
        return float(prefer), float("nan")
    truth = np.array([c.n_stage for c, _ in known])
    p = np.nan_to_num(np.stack([pr for _, pr in known]), nan=0.0)
    decisions = p[None] >= STAGE_THRESHOLD_GRID[:, None, None]  # (thresholds, cases, 17)
    acc = np.mean(rule_set.stage_rows(decisions, [c.side for c, _ in known]) == truth, axis=1)
    good = STAGE_THRESHOLD_GRID[np.isclose(acc, acc.max())]
    return float(good[np.argmin(np.abs(good - prefer))]), float(acc.max())


# ----------------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass
class TrainConfig:
    """Training settings. Defaults follow the paper (docs/explanation/method.md), with its known bugs fixed."""

    epochs: int = 150
    batch_size: int | None = None  # None: 64 for TS1, 16 for TS2/TS3
    lr: float = 5e-4
    weight_decay: float = 1e-3
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_cooldown: int = 10
    min_lr: float = 5e-6
    early_stopping_patience: int = 30
    seed: int = 123
    oversample: bool = True
    sampling: str = "weight_map"  # or "centroid" (the paper's "no weighted sampling" ablation)
    # the model's operating threshold (station status; TS1's N-stage through the rules), tuned on the validation
    # cases for "stage": N-stage accuracy (TS1 only), or "station": station balanced accuracy
    threshold_for: str = "stage"
    patch_spacing: float | None = None  # mm; None: the model configuration's
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    rules: str | None = None  # rule set for TS1 validation N-staging; None: the model's
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    amp: bool = True  # mixed precision (float16 autocast, gradient scaling) on a CUDA device; no effect on a CPU
    num_threads: int | None = None
    num_workers: int = 0
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if isinstance(self.loss, dict):
            self.loss = LossWeights(**self.loss)
        if self.threshold_for not in ("stage", "station"):
            raise UsageError(f"threshold_for must be 'stage' or 'station', got {self.threshold_for!r}")
        if self.sampling not in ("weight_map", "centroid"):
            raise UsageError(f"sampling must be 'weight_map' or 'centroid', got {self.sampling!r}")
        if self.epochs < 1 or self.lr <= 0 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError(f"epochs, lr and batch_size must be positive (got {self.epochs}, {self.lr}, "
                                f"{self.batch_size})")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class TrainingResult:
    strategy: str
    checkpoint: Path  # best validation epoch
    last_checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_metric: float
    metrics: dict  # validation metrics of the best epoch
    history: list[dict]
    stopped_early: bool
    resumed_from_epoch: int | None = None
    threshold: float = 0.5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"], d["last_checkpoint"] = str(self.checkpoint), str(self.last_checkpoint)
        return d


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def evaluate_stations(model: nn.Module, cases: Sequence[CaseSample], patch_size: int, spacing: float,
                      rules: str, threshold: float = 0.5, batch_size: int = 17) -> dict:
    """TS1 evaluation on centroid patches: station metrics (known labels, present stations) and rule-based N."""
    from ..classifier.model import predict_stations

    probs = np.full((len(cases), NUM_STATIONS), np.nan)
    k = station_classifier_of(model).config.instances
    for i, c in enumerate(cases):
        idx = np.flatnonzero(c.present)
        if idx.size:
            patches = case_patches(c, idx.tolist(), None, patch_size, spacing, instances=k)
            probs[i, idx] = predict_stations(model, patches, idx, batch_size=batch_size,
                                             features=c.station_features(idx))
    return _station_and_stage_metrics(cases, probs, rules, threshold)


def _station_and_stage_metrics(cases: Sequence[CaseSample], probs: np.ndarray, rules: str,
                               threshold: float) -> dict:
    labels = np.stack([c.station_labels for c in cases]) if cases else np.zeros((0, NUM_STATIONS), int)
    known = (labels != UNKNOWN) & ~np.isnan(probs)
    y, p = labels[known], probs[known]
    out = {f"station_{k}": v for k, v in binary_metrics(y, p, 0.5).items()}
    out["station_threshold"] = tune_threshold(y, p)[0]
    out["station_balanced_accuracy_at_threshold"] = binary_metrics(y, p, threshold)["balanced_accuracy"]
    rs = load_rules(rules)
    staged = [(c.n_stage, int(rs.stage_array(np.nan_to_num(pr, nan=0.0) >= threshold, c.side)))
              for c, pr in zip(cases, probs, strict=True) if c.n_stage != UNKNOWN]
    if staged:
        t, pr = np.array(staged).T
        out["n_accuracy"] = float(np.mean(t == pr))
        out["n_balanced_accuracy"] = balanced_accuracy(t, pr)
        out["stage_threshold"], out["n_accuracy_at_stage_threshold"] = tune_stage_threshold(
            cases, probs, rs, out["station_threshold"])
    out["_probs"] = probs
    return out


@torch.no_grad()
def evaluate_staging(model: StagingModel, cases: Sequence[CaseSample], patch_size: int, spacing: float,
                     device: torch.device, threshold: float = 0.5) -> dict:
    """TS2/TS3 evaluation: N-stage from the head (and from the rule-consistent output), station metrics."""
    ds = CaseDataset(cases, patch_size, spacing, train=False, instances=model.config.instances)
    was = model.training
    model.eval()
    n_true, n_head, n_rule, probs = [], [], [], np.full((len(cases), NUM_STATIONS), np.nan)
    try:
        for i in range(len(ds)):
            b = ds[i]
            out = model(b["patches"][None].to(device), b["side"][None].to(device), b["present"][None].to(device),
                        b["features"][None].to(device))
            p = torch.sigmoid(out.station_logits[0]).cpu().numpy()
            probs[i, b["present"].numpy()] = p[b["present"].numpy()]
            n_true.append(cases[i].n_stage)
            n_head.append(int(out.n_logits.argmax(1)))
            n_rule.append(int(out.rule_stage_probs.argmax(1)))
    finally:
        model.train(was)
    out_m = _station_and_stage_metrics(cases, probs, model.config.rules, threshold)
    t = np.array(n_true)
    keep = t != UNKNOWN
    out_m["n_accuracy"] = float(np.mean(t[keep] == np.array(n_head)[keep])) if keep.any() else float("nan")
    out_m["n_balanced_accuracy"] = balanced_accuracy(t[keep], np.array(n_head)[keep])
    out_m["n_rule_accuracy"] = float(np.mean(t[keep] == np.array(n_rule)[keep])) if keep.any() else float("nan")
    return out_m


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _init_model(strategy: str, mconfig: ModelConfig, seed: int, init: str | Path | None) -> tuple[nn.Module, dict]:
    """Build the model of a strategy (weights seeded), optionally initialised from a checkpoint."""
    kind = "station" if strategy == "ts1" else "staging"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(kind, mconfig)
    info: dict = {}
    if init is not None:
        ckpt = load_checkpoint(init)
        info = {"path": str(init), "weights_sha256": ckpt.manifest.get("weights_sha256"),
                "kind": ckpt.manifest.get("kind")}
        init_config = ModelConfig.from_dict(ckpt.manifest.get("model_config", {})).to_dict()
        clf_keys = ("in_channels", "patch_size", "patch_spacing", "channels", "dropout", "station_embedding_dim",
                    "instances", "pooling", "hybrid", "norm")
        for k in clf_keys:
            if init_config.get(k) != mconfig.to_dict().get(k):
                raise UsageError(f"--init checkpoint {init}: model_config.{k} = {init_config.get(k)!r} differs "
                                 f"from the requested {mconfig.to_dict().get(k)!r}")
        if ckpt.manifest["kind"] == "station":
            target = station_classifier_of(model)
            target.load_state_dict(ckpt.state_dict, strict=True)
        elif kind == "staging":
            model.load_state_dict(ckpt.state_dict, strict=True)
        else:
            station_classifier_of(model).load_state_dict(
                {k[len("classifier."):]: v for k, v in ckpt.state_dict.items() if k.startswith("classifier.")})
    elif strategy == "ts3":
        raise UsageError("ts3 needs --init: a TS1 checkpoint whose station classifier is frozen")
    return model, info


def _resume_key(strategy: str, mconfig: ModelConfig, tconfig: TrainConfig, fingerprint: str, val_fp: str,
                init: dict) -> str:
    cfg = tconfig.to_dict()
    for volatile in ("device", "num_threads", "num_workers", "epochs", "amp"):
        cfg.pop(volatile, None)
    blob = json.dumps([strategy, mconfig.to_dict(), cfg, fingerprint, val_fp, init.get("weights_sha256")],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train(strategy: str, train_cases: Sequence[CaseSample], val_cases: Sequence[CaseSample], out_dir: str | Path,
          model_config: ModelConfig | None = None, config: TrainConfig | None = None,
          init: str | Path | None = None, resume: bool = True,
          progress: ProgressCallback | None = None) -> TrainingResult:
    """Train TS1, TS2 or TS3; writes ``best.pt`` / ``last.pt`` (+ .json manifests) and ``history.json`` to out_dir.

    With ``resume`` an existing ``last.pt`` of the same strategy, configuration and data continues where it stopped.
    """
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    mconfig = model_config or ModelConfig()
    tconfig = config or TrainConfig()
    out_dir = Path(out_dir)
    if not train_cases:
        raise UsageError("no training cases")
    if not mconfig.uses_pet:  # CT-only mode: the PET and its SUV features stay unseen
        train_cases = [c.without_pet() for c in train_cases]
        val_cases = [c.without_pet() for c in val_cases]
    elif any(c.pet is None for c in (*train_cases, *val_cases)):
        missing = next(c.patient_id for c in (*train_cases, *val_cases) if c.pet is None)
        raise UsageError(f"{missing} has no PET: train a CT-only model (modality ct) or give the PET")
    device = _device(tconfig.device)
    batch_size = tconfig.batch_size or (64 if strategy == "ts1" else 16)
    if tconfig.patch_spacing is not None and float(tconfig.patch_spacing) != mconfig.patch_spacing:
        mconfig = dataclasses.replace(mconfig, patch_spacing=float(tconfig.patch_spacing))
    size, spacing = mconfig.patch_size, mconfig.patch_spacing
    rules = tconfig.rules or mconfig.rules

    if strategy == "ts1":
        train_ds: Dataset = StationPatchDataset(train_cases, size, spacing, tconfig.sampling, tconfig.augment,
                                                tconfig.seed, instances=mconfig.instances)
    else:
        usable = [c for c in train_cases if c.n_stage != UNKNOWN or (c.station_labels != UNKNOWN).any()]
        train_ds = CaseDataset(usable, size, spacing, tconfig.sampling, tconfig.augment, tconfig.seed,
                               instances=mconfig.instances)
    if len(train_ds) == 0:
        raise UsageError(f"{strategy}: the training cases hold no usable sample (TS1 needs known station labels "
                            "of present stations; TS2/TS3 need an N-stage or station labels)")

    fingerprint, val_fp = data_fingerprint(train_cases), data_fingerprint(val_cases)
    with torch_threads(tconfig.num_threads):
        model, init_info = _init_model(strategy, mconfig, tconfig.seed, init)
        model.to(device)
        if strategy == "ts3":
            model.freeze_encoder()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=tconfig.lr, weight_decay=tconfig.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=tconfig.plateau_factor, patience=tconfig.plateau_patience,
            cooldown=tconfig.plateau_cooldown, min_lr=tconfig.min_lr)
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tconfig.amp else None
        key = _resume_key(strategy, mconfig, tconfig, fingerprint, val_fp, init_info)
        manifest_base = {
            "kind": "station" if strategy == "ts1" else "staging", "strategy": strategy,
            "model_config": mconfig.to_dict(), "train_config": tconfig.to_dict(), "patch_spacing_mm": spacing,
            "stations": list(STATION_NAMES), "rules": rules, "seed": tconfig.seed, "init": init_info,
            "data": {"train_fingerprint": fingerprint, "val_fingerprint": val_fp, "train_cases": len(train_cases),
                     "val_cases": len(val_cases), "train_samples": len(train_ds)},
            "resume_key": key, "versions": environment_versions(),
        }
        state = {"epoch": -1, "best_metric": -math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False,
                 "history": [], "best_metrics": {}, "threshold": 0.5}
        best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
        resumed_from = None
        if resume and last_path.is_file():
            state = resume_training(last_path, key, model, optimizer, scheduler,
                                    "training run (different strategy, configuration or data)")
            resumed_from = state["epoch"]
            log.info("resuming %s from epoch %d in %s", strategy, state["epoch"] + 1, out_dir)

        start = state["epoch"] + 1
        for epoch in range(start, tconfig.epochs):
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(_rng(tconfig.seed, epoch, 3).integers(2**62)))
                train_loss, parts = _train_epoch(strategy, model, train_ds, optimizer, tconfig, batch_size, epoch,
                                                 device, scaler)
            if val_cases:
                metrics = _evaluate(strategy, model, val_cases, size, spacing, rules, device)
                monitor = metrics["n_balanced_accuracy"] if strategy != "ts1" else metrics["station_balanced_accuracy"]
                if monitor is None or math.isnan(monitor):
                    monitor = -train_loss
            else:
                metrics, monitor = {}, -train_loss
            scheduler.step(monitor)
            record = {"epoch": epoch, "train_loss": train_loss, **{f"train_{k}": v for k, v in parts.items()},
                      "lr": optimizer.param_groups[0]["lr"], "monitor": monitor,
                      "seconds": round(time.perf_counter() - t0, 3),
                      **{f"val_{k}": v for k, v in metrics.items() if not k.startswith("_")}}
            state["history"].append(record)
            state["epoch"] = epoch
            improved = monitor > state["best_metric"] + 1e-9
            if improved:
                state.update(best_metric=monitor, best_epoch=epoch, bad_epochs=0,
                             best_metrics={k: v for k, v in metrics.items() if not k.startswith("_")},
                             threshold=_operating_threshold(strategy, tconfig, metrics))
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= tconfig.early_stopping_patience:
                    state["stopped"] = True
            finished = state["stopped"] or epoch == tconfig.epochs - 1
            if improved:
                save_checkpoint(best_path, model, {**manifest_base, "epoch": epoch, "metrics": state["best_metrics"],
                                                   "threshold": state["threshold"], "complete": False})
            save_checkpoint(last_path, model, {**manifest_base, "epoch": epoch, "metrics": metrics_clean(metrics),
                                               "threshold": state["threshold"], "complete": finished},
                            training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                            "loop": _json_clean(state)})
            log.info("%s epoch %d: loss %.4f monitor %.4f", strategy, epoch, train_loss, monitor)
            if progress is not None:
                progress(Progress(epoch + 1, tconfig.epochs, f"{strategy} epoch {epoch + 1}/{tconfig.epochs}: "
                                                             f"loss {train_loss:.4f}, validation {monitor:.4f}"))
        if not best_path.is_file():  # nothing improved (cannot happen with a finite monitor); keep the last weights
            save_checkpoint(best_path, model, {**manifest_base, "epoch": state["epoch"], "metrics": {},
                                               "threshold": state["threshold"], "complete": True})
        else:
            _mark_complete(best_path, state, strategy, tconfig, val_cases, size, spacing, rules, device)

    from ..io.files import write_json

    write_json(out_dir / "history.json", state["history"])
    return TrainingResult(strategy=strategy, checkpoint=best_path, last_checkpoint=last_path,
                          epochs_run=state["epoch"] + 1, best_epoch=state["best_epoch"],
                          best_metric=float(state["best_metric"]), metrics=state["best_metrics"],
                          history=state["history"], stopped_early=state["stopped"], resumed_from_epoch=resumed_from,
                          threshold=state["threshold"])


def _operating_threshold(strategy: str, tconfig: TrainConfig, metrics: dict) -> float:
    if strategy == "ts1" and tconfig.threshold_for == "stage" and "stage_threshold" in metrics:
        return float(metrics["stage_threshold"])
    return float(metrics.get("station_threshold", 0.5))


def metrics_clean(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _json_clean(obj):
    """Plain values only (for weights-only checkpoints); infinities stay floats."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _mark_complete(best_path: Path, state: dict, strategy: str, tconfig: TrainConfig, val_cases: Sequence[CaseSample],
                   size: int, spacing: float, rules: str, device: torch.device) -> None:
    """Finish the best checkpoint: calibrate its station probabilities on the validation cases (classifier/
    calibration.py), state the operating threshold on the calibrated scale, and mark it complete."""
    ckpt = load_checkpoint(best_path)
    if ckpt.manifest.get("complete"):
        state["threshold"] = float(ckpt.manifest.get("threshold", state["threshold"]))
        return
    from ..classifier.calibration import fit_calibration
    from ..classifier.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(ckpt).to(device)
    man = {k: v for k, v in ckpt.manifest.items() if k not in ("format", "format_version", "weights_sha256")}
    if val_cases:
        metrics = _evaluate(strategy, model, val_cases, size, spacing, rules, device)
        probs = metrics["_probs"]
        labels = np.stack([c.station_labels for c in val_cases])
        cal = fit_calibration(probs, labels)
        calibrated = _station_and_stage_metrics(val_cases, cal.apply(probs), rules, 0.5)
        man.update(calibration=cal.to_dict(), calibrated=True, threshold_uncalibrated=man.get("threshold"),
                   threshold=_operating_threshold(strategy, tconfig, calibrated))
        if strategy != "ts1":
            # the N-stage of a staging model: its head, or its calibrated station decisions staged by the rules at
            # the stage-tuned threshold, whichever staged the validation patients better (ties: the rules)
            head, by_rules = metrics.get("n_accuracy", np.nan), calibrated.get("n_accuracy_at_stage_threshold", np.nan)
            use_rules = not (np.nan_to_num(head, nan=-1.0) > np.nan_to_num(by_rules, nan=-1.0))
            man.update(n_stage_from="rules" if use_rules else "head",
                       n_accuracy_head=head, n_accuracy_rules=by_rules)
            if use_rules and "stage_threshold" in calibrated:
                man["threshold"] = float(calibrated["stage_threshold"])
        state["threshold"] = man["threshold"]
    man.update(complete=True, epochs_run=state["epoch"] + 1, stopped_early=state["stopped"])
    save_checkpoint(best_path, model.cpu(), man)


def _evaluate(strategy: str, model: nn.Module, cases: Sequence[CaseSample], size: int, spacing: float, rules: str,
              device: torch.device) -> dict:
    if strategy == "ts1":
        return evaluate_stations(model, cases, size, spacing, rules)
    return evaluate_staging(model, cases, size, spacing, device)


def _train_epoch(strategy: str, model: nn.Module, ds: Dataset, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, batch_size: int, epoch: int, device: torch.device,
                 scaler: torch.amp.GradScaler | None = None) -> tuple[float, dict]:
    """One epoch. TS1 oversamples the rarer station class; TS2/TS3 with the class-balanced N-stage loss see every
    training patient once per epoch (a permutation), without it they oversample by N-stage."""
    oversample = cfg.oversample and (strategy == "ts1" or not cfg.loss.balanced)
    order = epoch_order(ds.labels, oversample, _rng(cfg.seed, epoch, 4))
    if cfg.max_steps_per_epoch:
        order = order[: cfg.max_steps_per_epoch * batch_size]
    keys = [(epoch, pos, int(item)) for pos, item in enumerate(order)]
    cuda = device.type == "cuda"
    loader = DataLoader(ds, batch_size=batch_size, sampler=keys, num_workers=cfg.num_workers, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
    class_weights = stage_class_weights(ds.labels) if strategy != "ts1" and cfg.loss.balanced else None
    model.train()
    if strategy == "ts3":
        station_classifier_of(model).eval()  # frozen: no dropout noise in its features
    total, count, parts_sum = 0.0, 0, {}
    amp = scaler is not None
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(device, non_blocking=cuda) for k, v in batch.items()}
        loss, parts = _batch_loss(strategy, model, batch, cfg, class_weights, amp)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = len(batch["case"])
        total += float(loss.detach()) * n
        count += n
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v * n
    return total / max(count, 1), {k: v / max(count, 1) for k, v in parts_sum.items()}


def _batch_loss(strategy: str, model: nn.Module, batch: dict, cfg: TrainConfig,
                class_weights: torch.Tensor | None, amp: bool = False) -> tuple[torch.Tensor, dict]:
    """Forward pass (in float16 autocast with ``amp``, CUDA only) and the loss in float32."""
    device_type = batch["case"].device.type
    with torch.autocast(device_type, dtype=torch.float16, enabled=amp):
        if strategy == "ts1":
            out = model(batch["patch"], batch["station"], batch["features"])
        else:
            out = model(batch["patches"], batch["side"], batch["present"], batch["features"])
    if strategy == "ts1":
        loss = masked_bce(out.float(), batch["label"])
        return loss, {"bce": float(loss.detach())}
    out = dataclasses.replace(out, station_logits=out.station_logits.float(), n_logits=out.n_logits.float(),
                              group_probs=out.group_probs.float(), ordinal=out.ordinal.float())
    return staging_loss(out, batch["station_labels"], batch["n_stage"], batch["pseudo"], cfg.loss, class_weights)


def train_ts1(train_cases: Sequence[CaseSample], val_cases: Sequence[CaseSample], out_dir: str | Path,
              model_config: ModelConfig | None = None, config: TrainConfig | None = None,
              **kw) -> TrainingResult:
    """TS1: the station classifier with BCE and oversampling of positive stations."""
    return train("ts1", train_cases, val_cases, out_dir, model_config, config, **kw)


def train_ts2(train_cases: Sequence[CaseSample], val_cases: Sequence[CaseSample], out_dir: str | Path,
              model_config: ModelConfig | None = None, config: TrainConfig | None = None,
              init: str | Path | None = None, **kw) -> TrainingResult:
    """TS2: end to end (encoder initialised from ``init``, usually the TS1 checkpoint), staging loss."""
    return train("ts2", train_cases, val_cases, out_dir, model_config, config, init=init, **kw)


def train_ts3(train_cases: Sequence[CaseSample], val_cases: Sequence[CaseSample], out_dir: str | Path,
              model_config: ModelConfig | None = None, config: TrainConfig | None = None,
              init: str | Path | None = None, **kw) -> TrainingResult:
    """TS3: the TS1 station classifier frozen; only the side embedding, absent logit and head learn."""
    return train("ts3", train_cases, val_cases, out_dir, model_config, config, init=init, **kw)




# ----------------------------------------------------------------------------------------------------------------
# A tiny synthetic case (tests, benchmarks, smoke runs; independent of the phantom generator)


def make_toy_case(seed: int, stations: Sequence[int] = (7, 10, 14, 2, 12), positive: Sequence[int] | None = None,
                  side: str = "R", absent: Sequence[int] = (), spacing_ct: tuple[float, float, float] = (2.0, 2.0, 2.5),
                  size_ct: tuple[int, int, int] = (40, 40, 24), rules: str = "ajcc8") -> CaseSample:
    """A small CT/PET pair: each listed station (index 0..16) is a box in the station map with a node at its centre,
    bright on PET (SUV ~6) when positive, faint (SUV ~1.2) otherwise. Stations in ``absent`` keep their node and label
    but are missing from the station map. ``positive`` None: a seeded random half. N-stage from the rule set."""
    rng = np.random.default_rng(seed)
    stations = list(stations)
    if positive is None:
        positive = [s for s in stations if rng.random() < 0.5]
    nx, ny, nz = size_ct
    sx, sy, sz = spacing_ct
    origin = np.array([-nx * sx / 2, -ny * sy / 2, -nz * sz / 2]) + rng.uniform(-3, 3, 3)
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    phys = np.stack([origin[0] + xx * sx, origin[1] + yy * sy, origin[2] + zz * sz], axis=-1)
    ct = rng.normal(-100.0, 15.0, (nz, ny, nx)).astype(np.float32)
    smap = np.zeros((nz, ny, nx), np.uint8)
    extent = np.array([nx * sx, ny * sy, nz * sz])
    grid = [(gx, gy, gz) for gz in (0.3, 0.7) for gy in (0.25, 0.5, 0.75) for gx in (0.25, 0.5, 0.75)]
    order = rng.permutation(len(grid))
    centres = {}
    pet_nodes = []
    for k, st in enumerate(stations):
        c = origin + np.array(grid[order[k % len(grid)]]) * extent + rng.uniform(-1.5, 1.5, 3)
        centres[st] = c
        d = np.linalg.norm(phys - c, axis=-1)
        ct[d <= 5.0] = rng.normal(40.0, 10.0, int((d <= 5.0).sum()))
        if st not in absent:
            box = np.all(np.abs(phys - c) <= np.array([7.0, 7.0, 6.0]), axis=-1) & (smap == 0)
            smap[box] = st + 1
        pet_nodes.append((c, 6.0 if st in positive else 1.2))
    ct_img = sitk.GetImageFromArray(ct)
    ct_img.SetSpacing(spacing_ct)
    ct_img.SetOrigin(origin.tolist())
    st_img = sitk.GetImageFromArray(smap)
    st_img.CopyInformation(ct_img)
    # PET: a coarser grid over the same field of view
    pspacing = (3.0, 3.0, 3.0)
    psize = [int(math.ceil(e / p)) for e, p in zip(extent, pspacing, strict=True)]
    pz, py, px = np.meshgrid(np.arange(psize[2]), np.arange(psize[1]), np.arange(psize[0]), indexing="ij")
    pphys = np.stack([origin[0] + px * pspacing[0], origin[1] + py * pspacing[1], origin[2] + pz * pspacing[2]], -1)
    pet = np.full(pz.shape, 0.8, np.float32) + rng.normal(0.0, 0.1, pz.shape).astype(np.float32)
    for c, suv in pet_nodes:
        d = np.linalg.norm(pphys - c, axis=-1)
        pet += ((suv - 0.8) * np.exp(-0.5 * (d / 3.5) ** 2)).astype(np.float32)
    pet_img = sitk.GetImageFromArray(pet)
    pet_img.SetSpacing(pspacing)
    pet_img.SetOrigin(origin.tolist())
    labels = np.full(NUM_STATIONS, UNKNOWN, dtype=np.int64)
    labels[stations] = 0
    labels[list(positive)] = 1
    n_stage = int(load_rules(rules).stage_array(labels == 1, side))
    from ..suv.statistics import station_feature_array, station_suv_stats

    features = station_feature_array(station_suv_stats(pet_img, st_img))
    return CaseSample(f"toy{seed:03d}", ct_img, pet_img, StationSampler.from_label_map(st_img), side, n_stage,
                      labels, features=features)


def measure_ts1_throughput(model_config: ModelConfig | None = None, batch_size: int = 16, steps: int = 3,
                           spacing: float | None = None, device: str = "cpu", seed: int = 0,
                           augment: bool = True, amp: bool = True) -> dict:
    """Patches per second of TS1 training steps (patch sampling + augmentation + forward/backward + Adam step)
    on toy cases; the first step is a warm-up and is not counted. ``amp``: float16 autocast and gradient scaling on
    a CUDA device (no effect on a CPU). A multiple-instance configuration counts every patch of a bag. For
    ``lnstaging bench training``."""
    mconfig = model_config or ModelConfig()
    spacing = mconfig.patch_spacing if spacing is None else spacing
    cases = [make_toy_case(seed + i, stations=tuple(range(NUM_STATIONS)), size_ct=(96, 96, 48),
                           spacing_ct=(1.5, 1.5, 3.0)) for i in range(2)]
    ds = StationPatchDataset(cases, mconfig.patch_size, spacing, augment=AugmentConfig(enabled=augment), seed=seed,
                             instances=mconfig.instances)
    dev = _device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StationClassifier(mconfig).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-3)
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    cfg = TrainConfig()
    t_patch = t_step = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        items = [ds[(0, step * batch_size + j, (step * batch_size + j) % len(ds))] for j in range(batch_size)]
        batch = {k: torch.stack([it[k] for it in items]).to(dev) for k in items[0]}
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = _batch_loss("ts1", model, batch, cfg, None, use_amp)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        if step:
            t_patch += t1 - t0
            t_step += t2 - t1
    n = steps * batch_size * mconfig.instances
    out = {"patch_size": mconfig.patch_size, "patch_spacing_mm": spacing, "batch_size": batch_size,
           "instances": mconfig.instances, "steps": steps, "device": str(dev), "amp": use_amp, "augment": augment,
           "torch_threads": torch.get_num_threads(),
           "patch_sampling_s_per_patch": round(t_patch / n, 5), "train_step_s_per_batch": round(t_step / steps, 4),
           "patches_per_second": round(n / (t_patch + t_step), 2),
           "patches_per_second_network_only": round(n / t_step, 2)}
    if dev.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(dev),
                   gpu_peak_memory_mb=round(torch.cuda.max_memory_allocated(dev) / 2**20, 1))
    return out
