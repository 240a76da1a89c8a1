"""Training of the station network from a cohort, with the labels of either source (chosen per run):

- ``truth``: the cohort's own station maps (``stations_path``; e.g. a phantom cohort);
- ``atlas``: the fused atlas maps the product computes for the cohort (``anatomy_path`` needed; registration with
  the atlas set, through the shared station-map store, so a case mapped before is not registered again). A cohort
  without station drawings so trains its own network (distillation of the atlas registration).

Every step one training case: a random crop of ``patch`` voxels (z, y, x) of its working grid, centred on a random
voxel of its station region (with jitter), augmented (``data.augment``: small rotation, shift, intensity; never a
flip). Loss: adaptive BCE of the region head + cross-entropy of the station head inside the true region. Adam,
learning rate ``lr`` with cosine decay to ``lr * min_lr_factor`` over the epochs. After every epoch the mean station
Dice of the validation cases (whole working grid) picks ``best.pt``; ``last.pt`` holds the optimiser state, and a run
resumes from it with the same result as an uninterrupted run (every random draw comes from (seed, epoch)).
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

from ..classifier.checkpoint import environment_versions, resume_training, save_checkpoint
from ..errors import InputError, UsageError
from ..io.files import write_json
from ..runtime import Progress, ProgressCallback, parse_device, torch_threads
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .data import AugmentConfig, StationCase, StationDataConfig, augment, data_fingerprint, make_case
from .model import STATION_NET_KIND, StationModel
from .network import StationNet, StationNetConfig, station_losses

log = logging.getLogger(__name__)

LABEL_SOURCES = ("truth", "atlas")


@dataclass
class StationTrainConfig:
    """Training settings (see the module docstring)."""

    epochs: int = 30
    lr: float = 3e-3  # Shevtsov et al.
    min_lr_factor: float = 0.05
    weight_decay: float = 1e-5
    patch: tuple[int, int, int] = (64, 48, 48)  # z, y, x voxels of the working grid
    steps_per_case: int = 1
    val_fraction: float = 0.15
    seed: int = 0
    augment: bool = True
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        if self.epochs < 1 or self.steps_per_case < 1:
            raise UsageError(f"epochs and steps_per_case must be >= 1, got {self.epochs}, {self.steps_per_case}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 < self.min_lr_factor <= 1:
            raise UsageError(f"lr must be > 0 and min_lr_factor in (0, 1], got {self.lr}, {self.min_lr_factor}")
        if len(self.patch) != 3 or min(self.patch) < 8:
            raise UsageError(f"patch must be three sizes (z, y, x) >= 8 voxels, got {list(self.patch)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class StationTrainingResult:
    """What a station network training run wrote and reached."""

    labels: str
    checkpoint: Path
    last_checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_val_dice: float | None
    history: list[dict]
    train_cases: int
    val_cases: int
    resumed_from_epoch: int | None = None
    seconds: float = 0.0
    skipped_rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"], d["last_checkpoint"] = str(self.checkpoint), str(self.last_checkpoint)
        return d


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


def random_crop(case: StationCase, patch: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (z, y, x) crop of ``patch`` voxels centred (with jitter of a quarter patch) on a random station voxel; air
    and background beyond the grid."""
    size = np.asarray(patch, int)
    shape = np.asarray(case.image.shape)
    fg = np.argwhere(case.labels > 0)
    centre = fg[int(rng.integers(len(fg)))] if len(fg) else shape // 2
    centre = centre + rng.integers(-(size // 4), size // 4 + 1)
    start = centre - size // 2
    image = np.zeros(tuple(size), np.float32)
    labels = np.zeros(tuple(size), np.uint8)
    src, dst = [], []
    for s, n, dim in zip(start, size, shape, strict=True):
        a, b = max(int(s), 0), min(int(s + n), int(dim))
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - int(s), a - int(s) + max(0, b - a)))
    image[tuple(dst)] = case.image[tuple(src)]
    labels[tuple(dst)] = case.labels[tuple(src)]
    return image, labels


def station_dice(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice of every station present in either map (station name -> Dice)."""
    out = {}
    for lab, name in enumerate(STATION_NAMES, 1):
        t, p = truth == lab, pred == lab
        n = int(t.sum() + p.sum())
        if n:
            out[name] = 2.0 * float((t & p).sum()) / n
    return out


#: Region thresholds tried when ``region_threshold`` is tuned on the validation patients.
THRESHOLD_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975)
#: Share of the true station region the tuned region must keep covering.
MIN_COVERAGE = 0.98


def predict_probs(network: StationNet, image: np.ndarray, device: torch.device) -> np.ndarray:
    """(18, z, y, x) class probabilities of a prepared image on its working grid."""
    from .network import class_probabilities

    network.eval()
    with torch.inference_mode():
        return class_probabilities(network(torch.from_numpy(image)[None, None].to(device)))[0].cpu().numpy()


def labels_at(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The label map of class probabilities: a station where the region probability is >= ``threshold``."""
    return np.where(1.0 - probs[0] >= threshold, probs[1:].argmax(0) + 1, 0).astype(np.uint8)


def predict_labels(network: StationNet, image: np.ndarray, device: torch.device, threshold: float = 0.5
                   ) -> np.ndarray:
    """The label map (z, y, x uint8) of a prepared image on its working grid."""
    return labels_at(predict_probs(network, image, device), threshold)


def _mean_dice(cases: Sequence[StationCase], probs: Sequence[np.ndarray], threshold: float) -> float:
    means = []
    for c, p in zip(cases, probs, strict=True):
        d = station_dice(c.labels, labels_at(p, threshold))
        means.append(float(np.mean(list(d.values()))) if d else 0.0)
    return float(np.mean(means))


def _val_dice(network: StationNet, cases: Sequence[StationCase], device: torch.device) -> float | None:
    """Mean station Dice of the validation cases at region threshold 0.5 (picks the best epoch; the threshold is
    tuned once, on the best epoch)."""
    if not cases:
        return None
    return _mean_dice(cases, [predict_probs(network, c.image, device) for c in cases], 0.5)


def _coverage(cases: Sequence[StationCase], probs: Sequence[np.ndarray], threshold: float) -> float:
    """Share of the true station region (all cases) inside the predicted region."""
    hit = total = 0
    for c, p in zip(cases, probs, strict=True):
        truth = c.labels > 0
        hit += int(np.count_nonzero(truth & (1.0 - p[0] >= threshold)))
        total += int(np.count_nonzero(truth))
    return hit / total if total else 1.0


def tune_region_threshold(network: StationNet, cases: Sequence[StationCase], device: torch.device,
                          min_coverage: float = MIN_COVERAGE) -> tuple[float, dict]:
    """The region threshold of THRESHOLD_GRID with the best mean station Dice on ``cases`` among those whose region
    still covers ``min_coverage`` of the true station region (the nodes lie there; a tight region leaves them
    unassigned); the lowest threshold when none does."""
    probs = [predict_probs(network, c.image, device) for c in cases]
    dice = [_mean_dice(cases, probs, t) for t in THRESHOLD_GRID]
    cover = [_coverage(cases, probs, t) for t in THRESHOLD_GRID]
    ok = [i for i, c in enumerate(cover) if c >= min_coverage] or [0]
    best = max(ok, key=lambda i: (round(dice[i], 9), -i))
    return THRESHOLD_GRID[best], {"grid": list(THRESHOLD_GRID), "mean_station_dice": [round(d, 4) for d in dice],
                                  "coverage": [round(c, 4) for c in cover], "min_coverage": min_coverage}


def split_cases(cases: Sequence[StationCase], val_fraction: float, seed: int) -> tuple[list, list]:
    """Training and validation cases by patient: the cohort's split column when it names validation rows, else a
    seeded draw of round(val_fraction * patients) patients (at least one of two or more)."""
    usable = [c for c in cases if c.split != "test"]
    if any(c.split in ("val", "validation") for c in usable):
        return ([c for c in usable if c.split not in ("val", "validation")],
                [c for c in usable if c.split in ("val", "validation")])
    patients = sorted({c.patient_id for c in usable})
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    chosen = set(_rng(seed, 7919).permutation(patients)[:n_val].tolist()) if n_val else set()
    return [c for c in usable if c.patient_id not in chosen], [c for c in usable if c.patient_id in chosen]


def train_station_network(train_cases: Sequence[StationCase], val_cases: Sequence[StationCase], out_dir: str | Path,
                          labels: str, model_config: StationNetConfig | None = None,
                          data_config: StationDataConfig | None = None, config: StationTrainConfig | None = None,
                          resume: bool = True, progress: ProgressCallback | None = None,
                          extra_manifest: dict | None = None) -> StationTrainingResult:
    """Train on cases already on their working grid; writes best.pt, last.pt (+ .json) and history.json."""
    mconfig = model_config or StationNetConfig()
    dconfig = data_config or StationDataConfig()
    tconfig = config or StationTrainConfig()
    if labels not in LABEL_SOURCES:
        raise UsageError(f"labels must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    if not train_cases:
        raise UsageError("no training cases for the station network")
    device = torch.device(parse_device(tconfig.device).torch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_fp, val_fp = data_fingerprint(train_cases), data_fingerprint(val_cases)
    patch = tuple(-(-p // mconfig.divisor) * mconfig.divisor for p in tconfig.patch)
    aug = AugmentConfig()
    cfg = tconfig.to_dict()
    for volatile in ("device", "num_threads"):
        cfg.pop(volatile)
    key = hashlib.sha256(json.dumps([mconfig.to_dict(), dconfig.to_dict(), cfg, aug.to_dict(), labels, train_fp,
                                     val_fp], sort_keys=True).encode()).hexdigest()
    t_start = time.perf_counter()
    with torch_threads(tconfig.num_threads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tconfig.seed)
            network = StationNet(mconfig)
        network.to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=tconfig.lr, weight_decay=tconfig.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tconfig.epochs,
                                                               eta_min=tconfig.lr * tconfig.min_lr_factor)
        base = {"kind": STATION_NET_KIND, "model_config": mconfig.to_dict(), "data_config": dconfig.to_dict(),
                "labels": labels, "train_config": tconfig.to_dict(), "augmentation": aug.to_dict(),
                "seed": tconfig.seed, "resume_key": key, "versions": environment_versions(),
                "data": {"train_fingerprint": train_fp, "val_fingerprint": val_fp, "train_cases": len(train_cases),
                         "val_cases": len(val_cases), "val_ids": sorted(c.case_id for c in val_cases)},
                **(extra_manifest or {})}
        state: dict = {"epoch": -1, "best": -math.inf, "best_epoch": -1, "history": []}
        best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
        resumed_from = None
        if resume and last_path.is_file():
            state = resume_training(last_path, key, network, optimizer, scheduler,
                                    "station network training run (different network, settings or data)",
                                    kinds=(STATION_NET_KIND,))
            resumed_from = state["epoch"]
            log.info("resuming station network training from epoch %d in %s", state["epoch"] + 1, out_dir)
        for epoch in range(state["epoch"] + 1, tconfig.epochs):
            t0 = time.perf_counter()
            rng = _rng(tconfig.seed, epoch, 1)
            order = rng.permutation(np.repeat(np.arange(len(train_cases)), tconfig.steps_per_case))
            network.train()
            totals = {"total": 0.0, "mediastinum": 0.0, "stations": 0.0}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(_rng(tconfig.seed, epoch, 3).integers(2**62)))
                for i in order:
                    case = train_cases[int(i)]
                    image, lab = random_crop(case, patch, rng)
                    if tconfig.augment:
                        image, lab = augment(image, lab, case.grid.spacing, rng, aug)
                    x = torch.from_numpy(image)[None, None].to(device)
                    y = torch.from_numpy(lab.astype(np.int64))[None].to(device)
                    optimizer.zero_grad(set_to_none=True)
                    losses = station_losses(network(x), y)
                    losses["total"].backward()
                    optimizer.step()
                    for k in totals:
                        totals[k] += float(losses[k].detach())
            scheduler.step()
            steps = len(order)
            val = _val_dice(network, val_cases, device)
            record = {"epoch": epoch, **{f"loss_{k}": v / steps for k, v in totals.items()}, "steps": steps,
                      "lr": optimizer.param_groups[0]["lr"], "val_dice": val,
                      "seconds": round(time.perf_counter() - t0, 3)}
            state["history"].append(record)
            state["epoch"] = epoch
            monitor = val if val is not None else -record["loss_total"]
            if monitor > state["best"] + 1e-9:
                state.update(best=monitor, best_epoch=epoch)
                save_checkpoint(best_path, network, {**base, "epoch": epoch, "val_dice": val})
            save_checkpoint(last_path, network, {**base, "epoch": epoch, "val_dice": val,
                                                 "complete": epoch == tconfig.epochs - 1},
                            training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                            "loop": json.loads(json.dumps(state))})
            log.info("station network epoch %d: loss %.4f, validation Dice %s", epoch, record["loss_total"], val)
            if progress is not None:
                vd = "-" if val is None else f"{val:.3f}"
                progress(Progress(epoch + 1, tconfig.epochs, f"station network epoch {epoch + 1}/{tconfig.epochs}: "
                                                             f"loss {record['loss_total']:.4f}, validation Dice {vd}"))
        _finish_best(best_path, val_cases, device)
    write_json(out_dir / "history.json", state["history"])
    return StationTrainingResult(
        labels=labels, checkpoint=best_path, last_checkpoint=last_path, epochs_run=state["epoch"] + 1,
        best_epoch=state["best_epoch"], best_val_dice=state["best"] if val_cases and state["best"] > -math.inf
        else None, history=state["history"], train_cases=len(train_cases), val_cases=len(val_cases),
        resumed_from_epoch=resumed_from, seconds=round(time.perf_counter() - t_start, 1))


def _finish_best(best_path: Path, val_cases: Sequence[StationCase], device: torch.device) -> None:
    """Tune the region threshold of best.pt on the validation cases, store it and mark the checkpoint complete
    (once)."""
    from ..classifier.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(best_path, kinds=(STATION_NET_KIND,))
    man = {k: v for k, v in ckpt.manifest.items() if k not in ("format", "format_version", "weights_sha256")}
    if man.get("complete"):
        return
    network = model_from_checkpoint(ckpt).to(device).eval()
    threshold, tuning = (0.5, {}) if not val_cases else tune_region_threshold(network, val_cases, device)
    man.update(region_threshold=threshold, region_threshold_tuning=tuning, complete=True)
    save_checkpoint(best_path, network.cpu(), man)


def _row_labels(row, labels: str, atlas_set, store_dir, device: str):
    """The station map of a cohort row: its stations_path (truth) or the fused atlas map (atlas, via the store)."""
    import SimpleITK as sitk

    from ..anatomy.vocabulary import load_anatomy
    from ..io.images import load_ct, read_image_file
    from ..mapping.station_mapping import map_stations
    from ..mapping.store import StationMapStore, atlas_set_identity, station_map_key

    ct, _, _ = load_ct(row.ct_path)
    if labels == "truth":
        stations = read_image_file(row.stations_path, pixel_type=None)
        arr = sitk.GetArrayViewFromImage(stations)
        if arr.dtype.kind == "f" or arr.min() < 0 or arr.max() > NUM_STATIONS or not arr.any():
            raise InputError(f"stations_path {row.stations_path}: expected station labels 0..{NUM_STATIONS} "
                             "(whole numbers, not all 0)")
        return ct, stations
    store = StationMapStore(store_dir)
    key = station_map_key(row.ct_path, row.anatomy_path,
                          atlas_set_identity(atlas_set.root, [a.id for a in atlas_set.atlases]))
    mapping = store.get(key)
    if mapping is None:
        mapping = map_stations(ct, load_anatomy(row.anatomy_path, reference=ct), atlas_set, device=device)
        store.put(key, mapping)
    return ct, mapping.label_image()


def load_station_cases(cohort_csv: str | Path, labels: str, data_config: StationDataConfig, divisor: int,
                       atlases=None, store_dir: str | Path | None = None, device: str = "cpu",
                       progress: ProgressCallback | None = None) -> list[StationCase]:
    """Training cases of every usable row of a cohort with the labels of ``labels`` ("truth" or "atlas"). Every row
    is checked for the column its source needs before any image is read; an InputError names the row."""
    from ..cohort.table import read_cohort

    if labels not in LABEL_SOURCES:
        raise UsageError(f"--labels {labels!r}: expected one of {', '.join(LABEL_SOURCES)}")
    rows = read_cohort(cohort_csv).require_valid().usable_rows()
    if not rows:
        raise InputError(f"cohort {cohort_csv}: no usable row")
    need = "stations_path" if labels == "truth" else "anatomy_path"
    for row in rows:
        if row.ct_path is None:
            raise InputError(f"cohort {cohort_csv}, line {row.line} ({row.scan_id}): ct_path is empty")
        if getattr(row, need) is None:
            why = ("the true station map to learn from" if labels == "truth" else
                   "the anatomy the atlas registration needs; or train with --labels truth from a stations_path")
            raise InputError(f"cohort {cohort_csv}, line {row.line} ({row.scan_id}): {need} is empty ({why})")
    atlas_set = None
    if labels == "atlas":
        from ..mapping.atlas import resolve_atlas_set

        atlas_set = resolve_atlas_set(atlases)
    cases = []
    for i, row in enumerate(rows):
        where = f"cohort {cohort_csv}, line {row.line} ({row.scan_id})"
        try:
            ct, stations = _row_labels(row, labels, atlas_set, store_dir, device)
            cases.append(make_case(row.scan_id, ct, stations, data_config, divisor, row.patient_id, row.split))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if progress is not None:
            progress(Progress(i + 1, len(rows), f"station data ({labels}): scan {i + 1} of {len(rows)}"))
    return cases


def train_stations(cohort_csv: str | Path, out_dir: str | Path, labels: str = "truth", *,
                   config: StationTrainConfig | None = None, model_config: StationNetConfig | None = None,
                   data_config: StationDataConfig | None = None, atlases=None, store_dir: str | Path | None = None,
                   resume: bool = True, progress: ProgressCallback | None = None) -> StationTrainingResult:
    """Train the station network from a cohort CSV with ``labels`` "truth" (stations_path) or "atlas" (the fused
    atlas maps of the rows' anatomy_path)."""
    tconfig = config or StationTrainConfig()
    parse_device(tconfig.device)
    mconfig = model_config or StationNetConfig()
    dconfig = data_config or StationDataConfig()
    with torch_threads(tconfig.num_threads):
        cases = load_station_cases(cohort_csv, labels, dconfig, mconfig.divisor, atlases, store_dir,
                                   parse_device(tconfig.device).torch, progress)
    train, val = split_cases(cases, tconfig.val_fraction, tconfig.seed)
    log.info("station network training: %d training and %d validation scans (%s labels)", len(train), len(val),
             labels)
    return train_station_network(train, val, out_dir, labels, mconfig, dconfig, tconfig, resume=resume,
                                 progress=progress, extra_manifest={"cohort": str(Path(cohort_csv))})


def model_of(network: StationNet, data_config: StationDataConfig) -> StationModel:
    """A StationModel of a network in memory (e.g. to map a case right after training)."""
    return StationModel(network.eval(), network.config, data_config)
