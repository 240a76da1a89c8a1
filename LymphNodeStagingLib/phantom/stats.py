"""Cohort statistics of the phantom: N-stage mix, positives per station, SUVmax of benign vs malignant nodes and
the AUC of SUVmax alone (node and station level), measured on the generated PET images."""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.stats import mannwhitneyu

from ..runtime import Progress, ProgressCallback
from ..staging.rules import N_STAGES
from ..staging.stations import STATION_NAMES
from .patient import PhantomConfig, generate_patient, patient_seed


def auc(pos: list[float], neg: list[float]) -> float | None:
    """Area under the ROC curve of a score (Mann-Whitney U / (n1 n0)); None if a class is empty."""
    if not pos or not neg:
        return None
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u) / (len(pos) * len(neg))


def _summary(v: list[float]) -> dict:
    if not v:
        return {"n": 0}
    a = np.asarray(v)
    return {"n": len(v), "mean": round(float(a.mean()), 3),
            **{f"p{q}": round(float(np.percentile(a, q)), 3) for q in (5, 25, 50, 75, 95)}}


def cohort_stats(patients: int, seed: int = 0, size: str = "small", config: PhantomConfig | None = None,
                 progress: ProgressCallback | None = None) -> dict:
    """Generate ``patients`` phantoms in memory and summarise their labels and PET statistics."""
    n_counts: Counter = Counter()
    reported_counts: Counter = Counter()
    pos_per_station: Counter = Counter()
    node_suv = {"malignant": [], "benign": [], "inflammatory": []}
    small_malignant: list[float] = []
    st_pos, st_neg = [], []
    tumour, blood, myo = [], [], []
    noisy = 0
    for i in range(patients):
        t = generate_patient(patient_seed(seed, i), size, config).truth
        n_counts[t["n_stage"]] += 1
        reported_counts[t["reported"]["n_stage"]] += 1
        noisy += bool(t["reported"]["label_noise_applied"])
        for name, s in t["stations"].items():
            if s["status"] == "positive":
                pos_per_station[name] += 1
            if s["pet_suvmax"] is not None:
                (st_pos if s["status"] == "positive" else st_neg).append(s["pet_suvmax"])
            for n in s["nodes"]:
                if n["pet_suvmax"] is None:
                    continue
                node_suv[n["kind"]].append(n["pet_suvmax"])
                if n["malignant"] and n["short_axis_mm"] < 8:
                    small_malignant.append(n["pet_suvmax"])
        if t["tumour"] and t["tumour"]["pet_suvmax"] is not None:
            tumour.append(t["tumour"]["pet_suvmax"])
        blood.append(t["physiology"]["blood_pool"])
        myo.append(t["physiology"]["myocardium"])
        if progress:
            progress(Progress(i + 1, patients, f"patient {i + 1} of {patients}"))
    benign_all = node_suv["benign"] + node_suv["inflammatory"]
    thr = {str(t): {"station_sensitivity": round(float(np.mean(np.asarray(st_pos) > t)), 3) if st_pos else None,
                    "station_specificity": round(float(np.mean(np.asarray(st_neg) <= t)), 3) if st_neg else None}
           for t in (2.5, 3.0, 4.0)}
    return {
        "patients": patients, "seed": seed, "size": size,
        "n_stage_counts": {k: n_counts.get(k, 0) for k in N_STAGES},
        "reported_n_stage_counts": {k: reported_counts.get(k, 0) for k in N_STAGES},
        "label_noise_patients": noisy,
        "positives_per_station": {k: pos_per_station.get(k, 0) for k in STATION_NAMES},
        "node_pet_suvmax": {k: _summary(v) for k, v in node_suv.items()},
        "small_malignant_node_pet_suvmax": _summary(small_malignant),
        "station_pet_suvmax": {"positive": _summary(st_pos), "negative": _summary(st_neg)},
        "tumour_pet_suvmax": _summary(tumour),
        "blood_pool_suv": _summary(blood), "myocardium_suv": _summary(myo),
        "auc_node_suvmax": auc(node_suv["malignant"], benign_all),
        "auc_station_suvmax": auc(st_pos, st_neg),
        "station_threshold": thr,
    }
