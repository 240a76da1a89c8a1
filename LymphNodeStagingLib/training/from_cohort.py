"""Training from a cohort table: split rows into training and validation, prepare the cases, train."""

from __future__ import annotations

from pathlib import Path

from ..cohort.table import CohortRow, read_cohort
from ..errors import LNSError
from ..runtime import Device, ProgressCallback, parse_device
from .cases import case_samples


def split_rows(rows: list[CohortRow], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[CohortRow],
                                                                                          list[CohortRow]]:
    """Training and validation rows: the split column when it names validation rows, else a stratified share."""
    if any(r.split in ("val", "validation") for r in rows):
        train = [r for r in rows if r.split not in ("val", "validation", "test")]
        val = [r for r in rows if r.split in ("val", "validation")]
        return train, val
    from ..cohort.splits import make_split

    n_folds = max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
    if not n_folds or len({r.patient_id for r in rows}) < n_folds:
        return rows, []
    patients = [(r.patient_id, r.n_stage if r.n_stage is not None else -1,
                 len(r.positive_stations) if r.positive_stations is not None else None) for r in rows]
    split = make_split(patients, n_folds=n_folds, seed=seed, val_fraction=0.0)
    val_ids = set(split.fold(0).test)
    return [r for r in rows if r.patient_id not in val_ids], [r for r in rows if r.patient_id in val_ids]


def train_from_cohort(cohort_csv: str | Path, out_dir: str | Path, *, strategy: str = "ts1", init=None,
                      epochs: int = 150, batch_size: int | None = None, lr: float = 5e-4, seed: int = 123,
                      sampling: str = "weight_map", pseudo_loss: bool = True, max_steps_per_epoch: int | None = None,
                      small: bool = False, atlases=None, rules: str | None = None, pet_is_suv: bool | str | None = None,
                      val_fraction: float = 0.2, device: str | Device = "cpu", patch_spacing: float | None = None,
                      cache_dir: str | Path | None = None, progress: ProgressCallback | None = None,
                      model_options: dict | None = None, amp: bool = True, workers: int = 0):
    """Train one strategy on a cohort CSV; returns training.TrainingResult. ``model_options``: ModelConfig options
    (instances, pooling, hybrid, norm); ``amp`` and ``workers``: mixed precision and data-loading processes."""
    from ..classifier.model import ModelConfig
    from ..io.files import check_output
    from ..mapping.atlas import resolve_atlas_set
    from ..preflight.parameters import check_model, check_rules
    from .loops import TrainConfig, train
    from .losses import LossWeights

    device = parse_device(device).torch
    check_rules(rules, "rules")
    options = dict(model_options or {})
    mconfig = ModelConfig.small(32, **options) if small else ModelConfig(**options)
    loss = LossWeights() if pseudo_loss else LossWeights(pseudo=0.0)
    tconfig = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, sampling=sampling, loss=loss,
                          patch_spacing=patch_spacing, rules=rules, device=device,
                          max_steps_per_epoch=max_steps_per_epoch, amp=amp, num_workers=workers)
    check_output(out_dir, folder=True, parameter="out_dir")
    if init is not None:
        check_model(init, parameter="init")  # loaded and verified before any case is prepared
    cohort = read_cohort(cohort_csv).require_valid()
    rows = cohort.usable_rows()
    train_rows, val_rows = split_rows(rows, val_fraction, seed)
    if not train_rows:
        raise LNSError(f"cohort {cohort_csv}: no training rows")
    out_dir = Path(out_dir)
    atlas_set = resolve_atlas_set(atlases)
    cache = Path(cache_dir) if cache_dir else None
    train_cases = case_samples(train_rows, atlas_set, cache, device=device, pet_is_suv=pet_is_suv, progress=progress)
    val_cases = case_samples(val_rows, atlas_set, cache, device=device, pet_is_suv=pet_is_suv, progress=progress)
    return train(strategy, train_cases, val_cases, out_dir, mconfig, tconfig, init=init, progress=progress)
