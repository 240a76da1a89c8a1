"""Training of the node networks from a cohort with node masks (``nodes_path``).

- **S-Net** (Al Hasan et al. 2024): every epoch, every axial slice of the training cases that holds a node plus as
  many random slices without one (redrawn each epoch); slices are augmented (vertical flip, 90-degree rotation, a
  5-10 degree rotation, each with p = 0.5) and a batch is padded with air to its largest slice. Loss: Tversky
  (alpha 0.7 on false positives) on the main output + structure loss on the side outputs. AdamW, lr 5e-5.
- **3D U-Net** (Shevtsov et al.): every epoch ``patches_per_case`` random patches per training case, a share
  ``foreground_fraction`` of them centred (with jitter) on a random node voxel; flips in the axial plane. Loss: BCE
  with adaptive foreground re-weighting. AdamW, lr 1e-3.

Both: validation split by patient (``data.split_by_patient``, seeded), voxel Dice on the validation patients at 0.5
after every epoch drives ReduceLROnPlateau (factor 0.5, patience 5) and early stopping (patience 30); ``best.pt``
(best validation Dice) and ``last.pt`` (every epoch, with the optimiser state) are node checkpoints
(``nodes/model.py``); a run resumes from ``last.pt`` of the same configuration and data, with the same result as
an uninterrupted run (every random draw comes from (seed, epoch)). After training, the instance threshold of
``best.pt`` is tuned on the validation patients for node detection (the F1 of truth nodes and predicted components
that match with Dice >= 0.1; ties: voxel Dice, then the threshold nearest 0.5), and the validation detection metrics
at that threshold are stored in its manifest. Mixed precision only on CUDA; CPU by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..classifier.checkpoint import (
    environment_versions,
    load_checkpoint,
    model_from_checkpoint,
    resume_training,
    save_checkpoint,
)
from ..cohort.table import read_cohort
from ..errors import InputError, UsageError
from ..io.files import write_json
from ..runtime import Progress, ProgressCallback, parse_device, torch_threads
from .data import NodeCase, NodeDataConfig, data_fingerprint, load_node_cases, split_by_patient
from .infer import predict_volume
from .losses import adaptive_bce, snet_loss
from .metrics import evaluate_detection, match_components
from .model import DEFAULT_PATCH, NODE_KIND, InferenceConfig, NodeModel, NodeModelConfig, build_node_network

log = logging.getLogger(__name__)

DEFAULT_LR = {"snet": 5e-5, "unet3d": 1e-3}
DEFAULT_BATCH = {"snet": 16, "unet3d": 2}
#: Thresholds tried when the instance threshold is tuned on the validation patients.
THRESHOLD_GRID = (*(round(t, 2) for t in np.arange(0.1, 0.951, 0.05)), 0.97, 0.98, 0.99)
#: Dice with which a predicted component and a truth node match when the threshold is tuned.
MATCH_DICE = 0.1


@dataclass
class NodeTrainConfig:
    """Training settings (defaults: the published recipes, see the module docstring)."""

    epochs: int = 150
    lr: float | None = None  # None: 5e-5 (S-Net) or 1e-3 (U-Net)
    batch_size: int | None = None  # None: 16 slices (S-Net) or 2 patches (U-Net)
    weight_decay: float = 1e-2
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    early_stopping_patience: int = 30
    seed: int = 0
    val_fraction: float = 0.2
    negatives_per_positive: float = 1.0  # S-Net: random node-free slices per slice with a node
    side_weight: float = 1.0  # S-Net: weight of the structure loss of each side output
    patch: tuple[int, int, int] = DEFAULT_PATCH  # U-Net patch (z, y, x) voxels
    patches_per_case: int = 4  # U-Net patches per training case and epoch
    foreground_fraction: float = 0.5  # U-Net: share of patches centred on a node voxel
    augment: bool = True
    max_steps_per_epoch: int | None = None
    min_volume_ml: float = 0.0  # smallest node instance kept at inference
    overlap: float = 0.5  # U-Net sliding-window overlap at inference (and validation)
    device: str = "cpu"
    amp: bool = True  # float16 autocast + gradient scaling on CUDA; no effect on the CPU
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.patch) != 3 or min(self.patch) < 4:
            raise UsageError(f"patch must be three sizes (z, y, x) >= 4 voxels, got {list(self.patch)}")
        if not 0.0 <= self.foreground_fraction <= 1.0 or self.negatives_per_positive < 0:
            raise UsageError("foreground_fraction must be in 0..1 and negatives_per_positive >= 0")
        if self.patches_per_case < 1 or (self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1):
            raise UsageError("patches_per_case and max_steps_per_epoch must be >= 1")
        if self.plateau_patience < 0 or self.early_stopping_patience < 1 or not 0 < self.plateau_factor < 1:
            raise UsageError("plateau_patience >= 0, early_stopping_patience >= 1 and 0 < plateau_factor < 1")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class NodeTrainingResult:
    """What a node training run wrote and reached."""

    arch: str
    checkpoint: Path  # best validation epoch, threshold tuned
    last_checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_val_dice: float | None
    threshold: float
    metrics: dict  # validation detection metrics of the best checkpoint at its threshold
    history: list[dict]
    stopped_early: bool
    train_cases: int
    val_cases: int
    skipped_rows: list[dict] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    seconds_per_epoch: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"], d["last_checkpoint"] = str(self.checkpoint), str(self.last_checkpoint)
        d["skipped_without_nodes"] = sum(1 for s in self.skipped_rows if s.get("reason") == "no nodes_path")
        return d


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


def snet_samples(cases: Sequence[NodeCase], rng: np.random.Generator,
                 negatives_per_positive: float = 1.0) -> list[tuple[int, int]]:
    """One epoch of S-Net samples (case index, slice index): every slice with a node plus
    round(negatives_per_positive * positives) random node-free slices, shuffled."""
    pos, neg = [], []
    for i, c in enumerate(cases):
        has = c.mask.any(axis=(1, 2))
        pos += [(i, int(z)) for z in np.nonzero(has)[0]]
        neg += [(i, int(z)) for z in np.nonzero(~has)[0]]
    n_neg = min(len(neg), int(round(negatives_per_positive * len(pos)))) if pos else min(len(neg), 16)
    chosen = [neg[k] for k in rng.choice(len(neg), size=n_neg, replace=False)] if n_neg else []
    samples = pos + chosen
    order = rng.permutation(len(samples))
    return [samples[k] for k in order]


def _augment_slice(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """S-Net augmentation: vertical flip, a 90-degree rotation, a 5-10 degree rotation, each with p = 0.5."""
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        angle = float(rng.uniform(5.0, 10.0) * rng.choice([-1.0, 1.0]))
        image = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=0.0)
        mask = ndimage.rotate(mask.astype(np.float32), angle, reshape=False, order=0, mode="constant", cval=0.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask > 0.5, dtype=np.float32)


def snet_batch(cases: Sequence[NodeCase], samples: Sequence[tuple[int, int]], rng: np.random.Generator | None,
               augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets (B, 1, H, W) of S-Net samples; slices of different sizes are padded with 0 (air) to the
    largest, rounded up to a multiple of 4."""
    slices = []
    for i, z in samples:
        image, mask = cases[i].image[z], cases[i].mask[z].astype(np.float32)
        if augment and rng is not None:
            image, mask = _augment_slice(image, mask, rng)
        slices.append((image, mask))
    h = max(s[0].shape[0] for s in slices)
    w = max(s[0].shape[1] for s in slices)
    h, w = -(-h // 4) * 4, -(-w // 4) * 4
    images = np.zeros((len(slices), 1, h, w), dtype=np.float32)
    targets = np.zeros_like(images)
    for k, (image, mask) in enumerate(slices):
        images[k, 0, : image.shape[0], : image.shape[1]] = image
        targets[k, 0, : mask.shape[0], : mask.shape[1]] = mask
    return torch.from_numpy(images), torch.from_numpy(targets)


def _extract(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[start:start + size] with zeros where the window leaves the array."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape, strict=True):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def unet_batch(cases: Sequence[NodeCase], case_indices: Sequence[int], rng: np.random.Generator,
               patch: Sequence[int], foreground_fraction: float = 0.5,
               augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets (B, 1, D, H, W) of random U-Net patches of the given cases (foreground oversampling)."""
    size = tuple(int(p) for p in patch)
    images, targets = [], []
    for i in case_indices:
        case = cases[i]
        shape = np.array(case.image.shape)
        fg = np.argwhere(case.mask) if rng.random() < foreground_fraction else np.zeros((0, 3))
        if len(fg):
            centre = fg[int(rng.integers(len(fg)))] + rng.integers(-np.array(size) // 4, np.array(size) // 4 + 1)
            start = centre - np.array(size) // 2
        else:
            start = np.array([int(rng.integers(0, max(d - s, 0) + 1)) for d, s in zip(shape, size, strict=True)])
        start = np.clip(start, 0, np.maximum(shape - np.array(size), 0))
        image = _extract(case.image, start, size)
        mask = _extract(case.mask.astype(np.float32), start, size)
        if augment:
            for axis in (1, 2):
                if rng.random() < 0.5:
                    image, mask = np.flip(image, axis), np.flip(mask, axis)
        images.append(np.ascontiguousarray(image))
        targets.append(np.ascontiguousarray(mask))
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets)[:, None])


def batch_loss(network: nn.Module, arch: str, images: torch.Tensor, targets: torch.Tensor,
               side_weight: float = 1.0) -> torch.Tensor:
    """The training loss of one batch: S-Net loss (Tversky + structure loss) or adaptive BCE (U-Net)."""
    if arch == "snet":
        return snet_loss(network(images), targets, side_weight=side_weight)
    return adaptive_bce(network(images), targets)


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def _voxel_dice(cases: Sequence[NodeCase], probs: Sequence[np.ndarray], threshold: float) -> float | None:
    inter = truth = pred = 0
    for c, p in zip(cases, probs, strict=True):
        m, q = c.mask, p >= threshold
        inter += int(np.count_nonzero(m & q))
        truth += int(np.count_nonzero(m))
        pred += int(np.count_nonzero(q))
    return 2.0 * inter / (truth + pred) if truth + pred else None


def detection_f1(cases: Sequence[NodeCase], probs: Sequence[np.ndarray], threshold: float,
                 min_dice: float = MATCH_DICE) -> float:
    """F1 of node detection at ``threshold``, pooled over the cases: a truth node is found when its best predicted
    component overlaps it with Dice >= ``min_dice``, and a predicted component is right when its best truth node
    does. The Dice criterion keeps one component spread over the whole crop from counting as a detection of every
    node it touches."""
    found = n_truth = right = n_pred = 0
    for c, p in zip(cases, probs, strict=True):
        m = match_components(c.truth, p, threshold)
        found += int(np.count_nonzero(m.truth_hit_dice >= min_dice))
        n_truth += m.n_truth
        right += int(np.count_nonzero(m.pred_hit_dice >= min_dice))
        n_pred += m.n_pred
    recall = found / n_truth if n_truth else 0.0
    precision = right / n_pred if n_pred else 0.0
    return 2 * recall * precision / (recall + precision) if recall + precision else 0.0


def tune_threshold(cases: Sequence[NodeCase], probs: Sequence[np.ndarray],
                   grid: Sequence[float] = THRESHOLD_GRID) -> tuple[float, dict]:
    """The threshold of ``grid`` with the best detection F1 on the cases (ties: voxel Dice, then nearest 0.5)."""
    rows = []
    for t in grid:
        rows.append((float(t), detection_f1(cases, probs, t), _voxel_dice(cases, probs, t) or 0.0))
    best = max(rows, key=lambda r: (round(r[1], 9), round(r[2], 9), -abs(r[0] - 0.5)))
    return best[0], {"metric": "detection_f1", "match_dice": MATCH_DICE, "grid": [r[0] for r in rows],
                     "f1": [round(r[1], 4) for r in rows], "voxel_dice": [round(r[2], 4) for r in rows]}


def _predict_cases(model: NodeModel, cases: Sequence[NodeCase]) -> list[np.ndarray]:
    return [predict_volume(model, c.image) for c in cases]


def validation_metrics(cases: Sequence[NodeCase], probs: Sequence[np.ndarray], threshold: float) -> dict:
    """Detection metrics (``evaluate_detection``) on the working grid: overall and for nodes >= 5 mm."""
    report = evaluate_detection([c.truth for c in cases], list(probs), [c.grid.spacing for c in cases], threshold)
    d = report.to_dict()

    def short(m: dict) -> dict:
        return {k: m[k] for k in ("n_truth", "average_recall", "object_dice", "voxel_dice", "slice_dice",
                                  "fp_per_scan_at_80_recall")}

    return {"threshold": threshold, "all": short(d["overall"]), ">=5mm": short(d["bins"][">=5mm"])}


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


def _resume_key(mconfig: NodeModelConfig, dconfig: NodeDataConfig, tconfig: NodeTrainConfig, train_fp: str,
                val_fp: str) -> str:
    cfg = tconfig.to_dict()
    for volatile in ("device", "num_threads", "epochs", "amp"):
        cfg.pop(volatile, None)
    blob = json.dumps([mconfig.to_dict(), dconfig.to_dict(), cfg, train_fp, val_fp], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _epoch_batches(arch: str, cases: Sequence[NodeCase], tconfig: NodeTrainConfig, epoch: int,
                   batch_size: int) -> list[list]:
    rng = _rng(tconfig.seed, epoch, 1)
    if arch == "snet":
        items: list = snet_samples(cases, rng, tconfig.negatives_per_positive)
    else:
        items = list(rng.permutation(np.repeat(np.arange(len(cases)), tconfig.patches_per_case)))
    batches = [items[k:k + batch_size] for k in range(0, len(items), batch_size)]
    if tconfig.max_steps_per_epoch is not None:
        batches = batches[: tconfig.max_steps_per_epoch]
    return batches


def _train_epoch(model: NodeModel, cases: Sequence[NodeCase], optimizer: torch.optim.Optimizer,
                 tconfig: NodeTrainConfig, epoch: int, batch_size: int, device: torch.device,
                 scaler: torch.amp.GradScaler | None) -> tuple[float, int]:
    network = model.network
    network.train()
    rng = _rng(tconfig.seed, epoch, 2)
    total, steps = 0.0, 0
    for batch in _epoch_batches(model.arch, cases, tconfig, epoch, batch_size):
        if model.arch == "snet":
            images, targets = snet_batch(cases, batch, rng, tconfig.augment)
        else:
            patch = tuple(-(-p // model.config.divisor) * model.config.divisor for p in tconfig.patch)
            images, targets = unet_batch(cases, batch, rng, patch, tconfig.foreground_fraction, tconfig.augment)
        images, targets = images.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = batch_loss(network, model.arch, images, targets, tconfig.side_weight)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss = batch_loss(network, model.arch, images, targets, tconfig.side_weight)
            loss.backward()
            optimizer.step()
        total += float(loss.detach())
        steps += 1
    return (total / steps if steps else math.nan), steps


def _clean(obj):
    """Plain JSON values (weights-only checkpoints): numpy scalars become Python numbers, NaN stays a float."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def train_node_network(train_cases: Sequence[NodeCase], val_cases: Sequence[NodeCase], out_dir: str | Path,
                       model_config: NodeModelConfig | None = None, data_config: NodeDataConfig | None = None,
                       config: NodeTrainConfig | None = None, resume: bool = True,
                       progress: ProgressCallback | None = None, extra_manifest: dict | None = None
                       ) -> NodeTrainingResult:
    """Train a node network on cases already on their working grid; writes best.pt, last.pt (+ .json manifests)
    and history.json to ``out_dir``. ``data_config`` must be the one the cases were made with."""
    mconfig = model_config or NodeModelConfig()
    dconfig = data_config or NodeDataConfig()
    tconfig = config or NodeTrainConfig()
    if not train_cases:
        raise UsageError("no training cases with node masks")
    for c in [*train_cases, *val_cases]:
        if tuple(c.grid.spacing) != tuple(dconfig.spacing):
            raise UsageError(f"case {c.case_id} is on a {list(c.grid.spacing)} mm grid, the data configuration "
                             f"says {list(dconfig.spacing)} mm")
    arch = mconfig.arch
    device = torch.device(parse_device(tconfig.device).torch)
    lr = tconfig.lr if tconfig.lr is not None else DEFAULT_LR[arch]
    batch_size = tconfig.batch_size or DEFAULT_BATCH[arch]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_fp, val_fp = data_fingerprint(train_cases), data_fingerprint(val_cases)
    window = tuple(-(-p // mconfig.divisor) * mconfig.divisor for p in tconfig.patch)
    inference = InferenceConfig(window=window, overlap=tconfig.overlap)

    with torch_threads(tconfig.num_threads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tconfig.seed)
            network = build_node_network(mconfig)
        network.to(device)
        model = NodeModel(network, mconfig, dconfig, 0.5, tconfig.min_volume_ml, inference)
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=tconfig.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=tconfig.plateau_factor,
                                                               patience=tconfig.plateau_patience)
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tconfig.amp else None
        key = _resume_key(mconfig, dconfig, tconfig, train_fp, val_fp)
        base = {
            "kind": NODE_KIND, "arch": arch, "model_config": mconfig.to_dict(), "data_config": dconfig.to_dict(),
            "inference": inference.to_dict(), "train_config": {**tconfig.to_dict(), "lr": lr, "batch_size": batch_size},
            "working_spacing_mm": list(dconfig.spacing), "seed": tconfig.seed, "min_volume_ml": tconfig.min_volume_ml,
            "data": {"train_fingerprint": train_fp, "val_fingerprint": val_fp, "train_cases": len(train_cases),
                     "val_cases": len(val_cases), "val_ids": sorted(c.case_id for c in val_cases)},
            "resume_key": key, "versions": environment_versions(), **(extra_manifest or {}),
        }
        state: dict = {"epoch": -1, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False,
                       "history": []}
        best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
        resumed_from = None
        if resume and last_path.is_file():
            state = resume_training(last_path, key, network, optimizer, scheduler,
                                    "node training run (different network, settings or data)", kinds=(NODE_KIND,))
            resumed_from = state["epoch"]
            log.info("resuming node training from epoch %d in %s", state["epoch"] + 1, out_dir)

        for epoch in range(state["epoch"] + 1, tconfig.epochs):
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(_rng(tconfig.seed, epoch, 3).integers(2**62)))
                loss, steps = _train_epoch(model, train_cases, optimizer, tconfig, epoch, batch_size, device, scaler)
            t_train = time.perf_counter() - t0
            val_dice = _voxel_dice(val_cases, _predict_cases(model, val_cases), 0.5) if val_cases else None
            monitor = val_dice if val_dice is not None else -loss
            scheduler.step(monitor)
            record = {"epoch": epoch, "train_loss": loss, "steps": steps, "lr": optimizer.param_groups[0]["lr"],
                      "val_dice": val_dice, "train_seconds": round(t_train, 3),
                      "seconds": round(time.perf_counter() - t0, 3)}
            state["history"].append(record)
            state["epoch"] = epoch
            improved = monitor > state["best"] + 1e-9
            if improved:
                state.update(best=monitor, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
                state["stopped"] = state["bad_epochs"] >= tconfig.early_stopping_patience
            if improved:
                save_checkpoint(best_path, network, {**base, "epoch": epoch, "val_dice": val_dice, "threshold": 0.5,
                                                     "complete": False})
            save_checkpoint(last_path, network, {**base, "epoch": epoch, "val_dice": val_dice, "threshold": 0.5,
                                                 "complete": state["stopped"] or epoch == tconfig.epochs - 1},
                            training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                            "loop": _clean(state)})
            log.info("node %s epoch %d: loss %.4f, validation Dice %s", arch, epoch, loss, val_dice)
            if progress is not None:
                vd = "-" if val_dice is None else f"{val_dice:.3f}"
                progress(Progress(epoch + 1, tconfig.epochs, f"{arch} epoch {epoch + 1}/{tconfig.epochs}: loss "
                                                             f"{loss:.4f}, validation Dice {vd}"))
        threshold, metrics = _finish_best(best_path, val_cases, device)

    write_json(out_dir / "history.json", state["history"])
    seconds = [h["seconds"] for h in state["history"]]
    return NodeTrainingResult(
        arch=arch, checkpoint=best_path, last_checkpoint=last_path, epochs_run=state["epoch"] + 1,
        best_epoch=state["best_epoch"], best_val_dice=state["best"] if val_cases and state["best"] > -math.inf
        else None, threshold=threshold, metrics=metrics, history=state["history"], stopped_early=state["stopped"],
        train_cases=len(train_cases), val_cases=len(val_cases), resumed_from_epoch=resumed_from,
        seconds_per_epoch=float(np.mean(seconds)) if seconds else None)


def _finish_best(best_path: Path, val_cases: Sequence[NodeCase], device: torch.device) -> tuple[float, dict]:
    """Tune the instance threshold of best.pt on the validation cases, store it with the validation metrics and mark
    the checkpoint complete (once)."""
    ckpt = load_checkpoint(best_path, kinds=(NODE_KIND,))
    man = {k: v for k, v in ckpt.manifest.items() if k not in ("format", "format_version", "weights_sha256")}
    if man.get("complete"):
        return float(man.get("threshold", 0.5)), man.get("metrics", {})
    network = model_from_checkpoint(ckpt).to(device).eval()
    mconfig = NodeModelConfig.from_dict(man["model_config"])
    model = NodeModel(network, mconfig, NodeDataConfig.from_dict(man["data_config"]), 0.5,
                      float(man.get("min_volume_ml", 0.0)), InferenceConfig.from_dict(man.get("inference")))
    threshold, metrics = 0.5, {}
    if val_cases:
        probs = _predict_cases(model, val_cases)
        threshold, tuning = tune_threshold(val_cases, probs)
        metrics = validation_metrics(val_cases, probs, threshold)
        man["threshold_tuning"] = tuning
    man.update(threshold=threshold, metrics=_clean(metrics), complete=True)
    save_checkpoint(best_path, network.cpu(), man)
    return threshold, metrics


def train_nodes(cohort_csv: str | Path, out_dir: str | Path, arch: str = "snet", epochs: int = 150, seed: int = 0,
                device: str = "cpu", lr: float | None = None, val_fraction: float = 0.2, width: float = 1.0,
                data_config: NodeDataConfig | None = None, config: NodeTrainConfig | None = None,
                model_config: NodeModelConfig | None = None, resume: bool = True,
                progress: ProgressCallback | None = None) -> NodeTrainingResult:
    """Train a node network (``arch`` "snet" or "unet3d") from a cohort CSV whose rows have a ``nodes_path``.

    ``width`` scales the network's channels (1: the published size) unless ``model_config`` is given; ``config``
    (``NodeTrainConfig``) gives every setting, and then ``epochs``, ``seed``, ``device``, ``lr`` and
    ``val_fraction`` are ignored. Rows without ``nodes_path`` are skipped and listed in the result.
    """
    mconfig = model_config or NodeModelConfig.sized(arch, width)
    if mconfig.arch != arch:
        raise UsageError(f"model_config is a {mconfig.arch} network, arch says {arch}")
    tconfig = config or NodeTrainConfig(epochs=epochs, seed=seed, device=device, lr=lr, val_fraction=val_fraction)
    parse_device(tconfig.device)
    dconfig = data_config or NodeDataConfig()
    cohort = read_cohort(cohort_csv).require_valid()
    rows = cohort.usable_rows()
    if not any(r.nodes_path is not None for r in rows):
        raise InputError(f"cohort {cohort_csv}: no row has a nodes_path (the node masks to learn from); add a "
                         "nodes_path column (node instance map or binary mask on the CT grid)")
    loaded = load_node_cases(rows, dconfig, progress=None)
    train_cases, val_cases = split_by_patient(loaded.cases, tconfig.val_fraction, tconfig.seed)
    log.info("node training: %d training and %d validation scans, %d rows without nodes_path skipped",
             len(train_cases), len(val_cases), loaded.skipped_without_nodes)
    extra = {"cohort": str(Path(cohort_csv)), "skipped_rows": loaded.skipped}
    result = train_node_network(train_cases, val_cases, out_dir, mconfig, dconfig, tconfig, resume=resume,
                                progress=progress, extra_manifest=extra)
    result.skipped_rows = loaded.skipped
    return result
