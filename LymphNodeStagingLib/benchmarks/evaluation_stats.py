"""Benchmark of the evaluation statistics on synthetic test predictions: split, metrics with bootstrap CIs
per scan and per patient, McNemar and the permutation test between two methods."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

import numpy as np

from ..io.files import peak_memory_mb

if TYPE_CHECKING:
    from ..evaluation.metrics import ScanPrediction

HELP = "split + metrics with bootstrap CIs + McNemar + permutation test on synthetic predictions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, default=500, help="number of patients (default 500)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    parser.add_argument("--permutations", type=int, default=10000, help="permutations (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the statistics")


def synthetic_predictions(n_patients: int, quality: float, seed: int, data_seed: int = 0,
                          test_fold: dict[str, int] | None = None) -> list[ScanPrediction]:
    """Predictions of a method of the given quality (0.5 = chance, 1 = perfect) on a synthetic cohort.

    The reference labels depend on ``data_seed`` only, so two methods share them; a third of the patients have a
    second scan.
    """
    from ..evaluation.metrics import ScanPrediction

    drng = np.random.default_rng(data_seed)
    mrng = np.random.default_rng(seed)
    out = []
    for i in range(n_patients):
        pid = f"P{i:04d}"
        truth = (drng.random(17) < 0.12).astype(np.int64)
        n_true = int(min(3, truth.sum()))
        for j in range(1 + (i % 3 == 0)):
            prob = np.clip(np.where(truth == 1, quality, 1 - quality) + mrng.normal(0, 0.2, 17), 0, 1)
            n_pred = int(min(3, (prob >= 0.5).sum()))
            out.append(ScanPrediction(pid, f"{pid}_s{j}", truth, prob, n_true, n_pred,
                                      fold=None if test_fold is None else test_fold[pid]))
    return out


def run(args: argparse.Namespace) -> dict:
    from ..cohort.splits import make_split
    from ..evaluation.metrics import evaluate_method
    from ..evaluation.stat_tests import compare_methods

    times: dict[str, float] = {}
    t = time.perf_counter()
    base = synthetic_predictions(args.patients, 0.8, seed=1, data_seed=args.seed)
    patients = [(s.patient_id, s.n_true, int(s.station_true.sum())) for s in base]
    split = make_split(patients, n_folds=args.folds, seed=args.seed)
    fold = {p: split.test_fold_of(p) for p in split.patients}
    times["split_s"] = time.perf_counter() - t
    a = synthetic_predictions(args.patients, 0.8, seed=1, data_seed=args.seed, test_fold=fold)
    b = synthetic_predictions(args.patients, 0.7, seed=2, data_seed=args.seed, test_fold=fold)
    t = time.perf_counter()
    ev = evaluate_method("A", a, n_boot=args.boot, seed=args.seed)
    times["evaluate_one_method_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cmp = compare_methods(a, b, "A", "B", n_permutations=args.permutations, seed=args.seed)
    times["compare_two_methods_s"] = time.perf_counter() - t
    pooled = ev.pooled["patient"]
    return {
        "patients": args.patients, "scans": len(a), "folds": args.folds, "boot": args.boot,
        "permutations": args.permutations,
        "wall_s": {k: round(v, 3) for k, v in times.items()},
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "strata": len(split.stratum_counts()),
        "example": {
            "station_balanced_accuracy": ev.summary["patient"]["station.balanced_accuracy"].format(),
            "station_auc_ci": [round(pooled.ci["station.auc"].low, 3), round(pooled.ci["station.auc"].high, 3)],
            "stage_accuracy": ev.summary["patient"]["stage.accuracy"].format(),
            "mcnemar_p": cmp.mcnemar.p_value, "mcnemar_method": cmp.mcnemar.method,
            "permutation_p": cmp.permutation.p_value,
        },
    }
