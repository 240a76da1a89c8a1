"""Evaluation metrics at station level and N-stage level, per scan and per patient, with bootstrap CIs.

Definitions (y_true = reference, always the first argument; confusion matrices have the reference in rows):

Station level (binary, stations of all test scans pooled; stations with an unknown label (-1) are left out):
  accuracy, sensitivity TP/(TP+FN), specificity TN/(TN+FP), balanced accuracy = mean of sensitivity and
  specificity over the classes present in the reference (as scikit-learn's balanced_accuracy_score), ROC AUC from
  the probabilities (Mann-Whitney, ties count 1/2), never from hard labels. A rate whose denominator is zero
  (e.g. sensitivity without positive stations, AUC with one class) is NaN, never 1.0.

N-stage level (N0..N3):
  accuracy; balanced accuracy = macro sensitivity = mean one-vs-rest sensitivity over the stages present in the
  reference; macro specificity = mean one-vs-rest specificity over the same stages (stages absent from the
  reference are not counted: the original code counted them as 1.0); quadratic weighted kappa with the four
  stages as fixed categories, weights (i - j)^2 / 9; rate of errors of two or more stages |true - pred| >= 2.

Per scan: every scan counts once. Per patient: the scans of a patient are combined first (``aggregate_per_patient``)
so that patients with several scans are not over-weighted. Bootstrap: patients are resampled with replacement
(all scans of a drawn patient come along), percentile intervals; replicates where a metric is undefined are
dropped and their number is reported. Over folds: mean and sample standard deviation (ddof = 1) of the folds where
the metric is defined.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..classifier.metrics import _div, _nanmean, binary_from_counts, mean_recall, roc_auc
from ..errors import UsageError
from ..staging.rules import UNKNOWN

log = logging.getLogger(__name__)

N_CLASSES = 4
STATION_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
STAGE_METRICS: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "macro_sensitivity", "macro_specificity", "qwk", "severe_error_rate",
)
LEVELS: tuple[str, ...] = ("scan", "patient")


# --- elementary metrics (vectorised over leading axes) -----------------------------------------------------------


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int = N_CLASSES) -> np.ndarray:
    """Integer confusion matrix (n_classes x n_classes), reference in rows, prediction in columns."""
    t = _labels(y_true, n_classes, "y_true")
    p = _labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise UsageError(f"y_true and y_pred must have the same length, got {t.shape} and {p.shape}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _labels(y: Any, n_classes: int, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise UsageError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size and (not np.all(np.isfinite(a.astype(float))) or np.any(a != np.round(a))
                   or a.min() < 0 or a.max() >= n_classes):
        raise UsageError(f"{name} must hold integers 0..{n_classes - 1}, got values {np.unique(a)[:10]}")
    return a.astype(np.int64)


def stage_from_confusion(cm: Any) -> dict[str, np.ndarray]:
    """All N-stage metrics from confusion matrices of shape (..., K, K), vectorised over the leading axes."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[-1]
    n = cm.sum(axis=(-2, -1))
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    rows = cm.sum(axis=-1)  # reference count per stage
    cols = cm.sum(axis=-2)  # predicted count per stage
    sens = _div(diag, rows)
    negatives = n[..., None] - rows
    tn = negatives - (cols - diag)
    spec = _div(tn, negatives)
    present = rows > 0
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / float((k - 1) ** 2)
    expected = _div(rows[..., :, None] * cols[..., None, :], n[..., None, None])
    observed_w = (w * cm).sum(axis=(-2, -1))
    expected_w = (w * expected).sum(axis=(-2, -1))
    macro_sens = mean_recall(cm)
    return {
        "accuracy": _div(diag.sum(axis=-1), n),
        "balanced_accuracy": macro_sens,
        "macro_sensitivity": macro_sens,
        "macro_specificity": _nanmean(np.where(present, spec, np.nan)),
        "qwk": 1.0 - _div(observed_w, expected_w),
        "severe_error_rate": _div((cm * (np.abs(i - j) >= 2)).sum(axis=(-2, -1)), n),
        "sensitivity_per_stage": sens,
        "specificity_per_stage": spec,
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return [_clean(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


@dataclass
class StationMetrics:
    """Binary station-level metrics of pooled stations."""

    n: int
    n_positive: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    balanced_accuracy: float
    sensitivity: float
    specificity: float
    auc: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN (undefined) becomes null."""
        return _clean(asdict(self))


@dataclass
class StageMetrics:
    """N-stage metrics with the confusion matrix (reference in rows, N0..N3)."""

    n: int
    confusion: list[list[int]]
    accuracy: float
    balanced_accuracy: float
    macro_sensitivity: float
    macro_specificity: float
    qwk: float
    severe_error_rate: float
    sensitivity_per_stage: list[float]
    specificity_per_stage: list[float]

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def station_metrics(y_true: Any, prob: Any | None = None, y_pred: Any | None = None,
                    threshold: float = 0.5) -> StationMetrics:
    """Station-level metrics. ``y_pred`` defaults to ``prob >= threshold``; AUC needs ``prob`` (else NaN).

    Labels equal to UNKNOWN (-1) are left out together with their predictions.
    """
    t = np.asarray(y_true).ravel()
    if prob is None and y_pred is None:
        raise UsageError("station_metrics needs prob or y_pred")
    pr = None if prob is None else np.asarray(prob, dtype=float).ravel()
    pd = (pr >= threshold) if y_pred is None else np.asarray(y_pred).ravel()
    for name, a in (("prob", pr), ("y_pred", pd)):
        if a is not None and a.shape != t.shape:
            raise UsageError(f"{name} must have the same number of stations as y_true ({t.size}), got {a.size}")
    if not np.isin(t, (0, 1, UNKNOWN)).all():
        raise UsageError(f"station labels must be 0, 1 or {UNKNOWN} (unknown), got {np.unique(t)[:10]}")
    known = t != UNKNOWN
    t = t[known].astype(bool)
    pd = pd[known].astype(bool)
    tp, fp = int(np.sum(t & pd)), int(np.sum(~t & pd))
    tn, fn = int(np.sum(~t & ~pd)), int(np.sum(t & ~pd))
    m = binary_from_counts(tp, fp, tn, fn)
    auc = float("nan") if pr is None else float(roc_auc(t, pr[known]))
    return StationMetrics(n=int(t.size), n_positive=int(t.sum()), tp=tp, fp=fp, tn=tn, fn=fn,
                          accuracy=float(m["accuracy"]), balanced_accuracy=float(m["balanced_accuracy"]),
                          sensitivity=float(m["sensitivity"]), specificity=float(m["specificity"]), auc=auc)


def stage_metrics(y_true: Any, y_pred: Any) -> StageMetrics:
    """N-stage metrics from reference and predicted stages (integers 0..3)."""
    cm = confusion_matrix(y_true, y_pred)
    m = stage_from_confusion(cm)
    return StageMetrics(
        n=int(cm.sum()), confusion=cm.tolist(),
        **{k: float(m[k]) for k in STAGE_METRICS},
        sensitivity_per_stage=[float(x) for x in m["sensitivity_per_stage"]],
        specificity_per_stage=[float(x) for x in m["specificity_per_stage"]],
    )


# --- predictions of a method on test scans ----------------------------------------------------------------------


@dataclass
class ScanPrediction:
    """A method's output on one test scan, with the reference labels.

    ``station_prob`` is the malignancy probability per station (catalogue order), or any score that grows with
    it (SUVmax for the threshold baseline): AUC is computed from it. ``station_pred`` gives the hard decisions when
    they are not ``station_prob >= threshold``. ``n_prob`` (optional) holds stage probabilities N0..N3.
    """

    patient_id: str
    scan_id: str
    station_true: np.ndarray  # (17,) 1, 0 or UNKNOWN
    station_prob: np.ndarray  # (17,)
    n_true: int
    n_pred: int
    station_pred: np.ndarray | None = None  # (17,) bool
    n_prob: np.ndarray | None = None  # (4,)
    fold: int | None = None
    n_score: float | None = None  # score of N+ against N0 (None: 1 - P(N0) from n_prob, else the top station score)

    def __post_init__(self) -> None:
        if self.n_score is None:
            if self.n_prob is not None:
                self.n_score = float(1.0 - np.asarray(self.n_prob, dtype=float)[0])
            else:
                sp = np.nan_to_num(np.asarray(self.station_prob, dtype=float), nan=0.0)
                self.n_score = float(sp.max()) if sp.size else 0.0
        self.station_true = np.asarray(self.station_true, dtype=np.int64)
        self.station_prob = np.asarray(self.station_prob, dtype=float)
        if self.station_pred is not None:
            self.station_pred = np.asarray(self.station_pred, dtype=bool)
        if self.n_prob is not None:
            self.n_prob = np.asarray(self.n_prob, dtype=float)
        if self.station_true.shape != self.station_prob.shape or (
                self.station_pred is not None and self.station_pred.shape != self.station_true.shape):
            raise UsageError(f"scan {self.scan_id!r}: station_true, station_prob and station_pred must have the "
                             f"same shape, got {self.station_true.shape}, {self.station_prob.shape}")
        for name in ("n_true", "n_pred"):
            v = getattr(self, name)
            if v is None or int(v) not in range(N_CLASSES):
                raise UsageError(f"scan {self.scan_id!r}: {name} must be 0..3, got {v!r}")
            setattr(self, name, int(v))

    def predicted_positive(self, threshold: float = 0.5) -> np.ndarray:
        return self.station_pred if self.station_pred is not None else self.station_prob >= threshold


StageFn = Callable[[str, np.ndarray], int]


def aggregate_per_patient(scans: Sequence[ScanPrediction], threshold: float = 0.5,
                          stage_fn: StageFn | None = None) -> list[ScanPrediction]:
    """One entry per patient (in order of first appearance) from the scans of each patient.

    Reference labels must agree between a patient's scans (an unknown station label takes the known one).
    Station probability = mean over the scans; station decision = ``mean prob >= threshold``, or a majority vote
    of ``station_pred`` (ties positive) when the scans carry hard decisions. N-stage = ``stage_fn(patient_id,
    station decisions)`` when given (e.g. the rule set with the patient's tumour side), else the argmax of the
    mean ``n_prob`` when every scan has one, else the most frequent predicted stage (ties: the higher stage).
    """
    groups: dict[str, list[ScanPrediction]] = {}
    for s in scans:
        groups.setdefault(s.patient_id, []).append(s)
    out = []
    for pid, items in groups.items():
        if len(items) == 1 and stage_fn is None:
            out.append(items[0])
            continue
        truth = np.stack([s.station_true for s in items])
        known = truth != UNKNOWN
        pos = np.any(known & (truth == 1), axis=0)
        neg = np.any(known & (truth == 0), axis=0)
        if np.any(pos & neg):
            raise UsageError(f"patient {pid!r}: scans disagree on the label of station index "
                             f"{np.flatnonzero(pos & neg).tolist()}")
        st_true = np.where(pos, 1, np.where(neg, 0, UNKNOWN))
        n_true = {s.n_true for s in items}
        if len(n_true) != 1:
            raise UsageError(f"patient {pid!r}: scans have different reference N-stages {sorted(n_true)}")
        prob = np.nanmean(np.stack([s.station_prob for s in items]), axis=0)
        if all(s.station_pred is not None for s in items):
            votes = np.stack([s.station_pred for s in items]).mean(axis=0)
            st_pred = votes >= 0.5
        else:
            st_pred = prob >= threshold
        n_prob = None
        if stage_fn is not None:
            n_pred = int(stage_fn(pid, st_pred))
        elif all(s.n_prob is not None for s in items):
            n_prob = np.mean(np.stack([s.n_prob for s in items]), axis=0)
            n_pred = int(np.argmax(n_prob))
        else:
            counts = np.bincount([s.n_pred for s in items], minlength=N_CLASSES)
            n_pred = int(np.flatnonzero(counts == counts.max())[-1])
        folds = {s.fold for s in items}
        out.append(ScanPrediction(pid, "+".join(s.scan_id for s in items), st_true, prob, n_true.pop(), n_pred,
                                  station_pred=st_pred, n_prob=n_prob,
                                  fold=folds.pop() if len(folds) == 1 else None,
                                  n_score=float(np.mean([s.n_score for s in items]))))
    return out


# --- evaluation of a set of predictions -------------------------------------------------------------------------


@dataclass
class Interval:
    """A bootstrap percentile interval around the point estimate."""

    estimate: float
    low: float
    high: float
    level: float
    n_valid: int  # bootstrap replicates in which the metric was defined

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class Evaluation:
    """Metrics of one method on one set of test scans, at one level (per scan or per patient)."""

    level: str
    n_scans: int
    n_patients: int
    station: StationMetrics
    stage: StageMetrics
    ci: dict[str, Interval] = field(default_factory=dict)  # "station.auc", "stage.qwk", ...
    bootstrap: dict[str, Any] = field(default_factory=dict)
    n_auc: float = float("nan")  # ROC AUC of N+ against N0 from the scans' n_score

    def values(self) -> dict[str, float]:
        """Flat {"station.accuracy": ..., "stage.qwk": ..., "stage.n_auc": ...} of the headline metrics."""
        out = {f"station.{k}": getattr(self.station, k) for k in STATION_METRICS}
        out.update({f"stage.{k}": getattr(self.stage, k) for k in STAGE_METRICS})
        out["stage.n_auc"] = self.n_auc
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level, "n_scans": self.n_scans, "n_patients": self.n_patients,
            "station": self.station.to_dict(), "stage": {**self.stage.to_dict(), "n_auc": _clean(self.n_auc)},
            "ci": {k: v.to_dict() for k, v in self.ci.items()}, "bootstrap": _clean(self.bootstrap),
        }


def _arrays(scans: Sequence[ScanPrediction], threshold: float) -> dict[str, np.ndarray]:
    if not scans:
        raise UsageError("no test scans to evaluate")
    pids = [s.patient_id for s in scans]
    uniq = list(dict.fromkeys(pids))
    pindex = {p: i for i, p in enumerate(uniq)}
    scan_patient = np.array([pindex[p] for p in pids])
    st_true = np.concatenate([s.station_true for s in scans])
    st_prob = np.concatenate([s.station_prob for s in scans])
    st_pred = np.concatenate([s.predicted_positive(threshold) for s in scans]).astype(bool)
    st_patient = np.concatenate([np.full(s.station_true.size, pindex[s.patient_id]) for s in scans])
    known = st_true != UNKNOWN
    return {
        "n_patients": np.array(len(uniq)),
        "scan_patient": scan_patient,
        "n_true": np.array([s.n_true for s in scans]),
        "n_pred": np.array([s.n_pred for s in scans]),
        "n_score": np.array([s.n_score for s in scans], dtype=float),
        "st_true": st_true[known].astype(bool),
        "st_prob": st_prob[known],
        "st_pred": st_pred[known],
        "st_patient": st_patient[known],
    }


def evaluate_scans(
    scans: Sequence[ScanPrediction],
    level: str = "patient",
    threshold: float = 0.5,
    stage_fn: StageFn | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> Evaluation:
    """Metrics of a method's test scans per scan or per patient, with patient-level bootstrap CIs.

    ``n_boot`` = 0 skips the bootstrap. ``stage_fn`` is used by the per-patient aggregation only.
    """
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    n_scans = len(scans)
    if level == "patient":
        scans = aggregate_per_patient(scans, threshold=threshold, stage_fn=stage_fn)
    a = _arrays(scans, threshold)
    has_prob = not np.any(np.isnan(a["st_prob"]))
    if not has_prob:
        log.warning("%d station(s) with a known label have no probability; station AUC is left undefined",
                    int(np.isnan(a["st_prob"]).sum()))
    st = station_metrics(a["st_true"].astype(int), a["st_prob"] if has_prob else None, a["st_pred"])
    sg = stage_metrics(a["n_true"], a["n_pred"])
    ev = Evaluation(level=level, n_scans=n_scans, n_patients=int(a["n_patients"]), station=st, stage=sg,
                    n_auc=float(roc_auc(a["n_true"] > 0, a["n_score"])))
    if n_boot > 0:
        ev.ci, ev.bootstrap = _bootstrap(a, ev, n_boot=n_boot, seed=seed, ci_level=ci_level, with_auc=has_prob)
    return ev


def _bootstrap(a: dict[str, np.ndarray], ev: Evaluation, n_boot: int, seed: int, ci_level: float,
               with_auc: bool, chunk: int = 250) -> tuple[dict[str, Interval], dict[str, Any]]:
    if not 0.0 < ci_level < 1.0:
        raise UsageError(f"ci_level must be in (0, 1), got {ci_level}")
    n_pat = int(a["n_patients"])
    rng = np.random.default_rng(seed)
    # per-patient sufficient statistics: station counts and a flattened stage confusion matrix
    t, p, sp = a["st_true"], a["st_pred"], a["st_patient"]
    counts_pp = np.stack([np.bincount(sp, weights=(m).astype(float), minlength=n_pat)
                          for m in (t & p, ~t & p, ~t & ~p, t & ~p)], axis=1)  # (P, 4): tp fp tn fn
    cell = a["n_true"] * N_CLASSES + a["n_pred"]
    conf_pp = np.zeros((n_pat, N_CLASSES * N_CLASSES))
    np.add.at(conf_pp, (a["scan_patient"], cell), 1.0)
    draws = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=n_boot).astype(float)  # (B, P)
    c = draws @ counts_pp
    values: dict[str, np.ndarray] = {}
    for k, v in binary_from_counts(c[:, 0], c[:, 1], c[:, 2], c[:, 3]).items():
        values[f"station.{k}"] = v
    if with_auc:
        aucs = [roc_auc(t, a["st_prob"], draws[i:i + chunk][:, sp]) for i in range(0, n_boot, chunk)]
        values["station.auc"] = np.concatenate(aucs)
    n_pos, scan_draws = a["n_true"] > 0, draws[:, a["scan_patient"]]
    values["stage.n_auc"] = np.concatenate([roc_auc(n_pos, a["n_score"], scan_draws[i:i + chunk])
                                            for i in range(0, n_boot, chunk)])
    sm = stage_from_confusion((draws @ conf_pp).reshape(n_boot, N_CLASSES, N_CLASSES))
    for k in STAGE_METRICS:
        values[f"stage.{k}"] = sm[k]
    point = ev.values()
    alpha = (1.0 - ci_level) / 2.0
    ci = {}
    for k, v in values.items():
        ok = v[~np.isnan(v)]
        lo, hi = (np.quantile(ok, [alpha, 1.0 - alpha]) if ok.size else (np.nan, np.nan))
        ci[k] = Interval(float(point[k]), float(lo), float(hi), ci_level, int(ok.size))
    info = {"n_boot": n_boot, "seed": seed, "unit": "patient", "method": "percentile"}
    return ci, info


# --- folds ------------------------------------------------------------------------------------------------------


@dataclass
class MeanSD:
    """Mean and sample standard deviation (ddof = 1) over the folds where a metric is defined."""

    mean: float
    sd: float
    n: int

    def format(self, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        sd = "n/a" if np.isnan(self.sd) else f"{self.sd:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {sd}"

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def mean_sd(values: Iterable[float]) -> MeanSD:
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return MeanSD(float("nan"), float("nan"), 0)
    return MeanSD(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size))


def summarize_folds(per_fold: Sequence[Evaluation] | Sequence[Mapping[str, float]]) -> dict[str, MeanSD]:
    """Mean +- sd over folds of every headline metric ("station.accuracy", ..., "stage.qwk")."""
    rows = [e.values() if isinstance(e, Evaluation) else dict(e) for e in per_fold]
    if not rows:
        raise UsageError("no folds to summarise")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: mean_sd(r.get(k, float("nan")) for r in rows) for k in keys}


@dataclass
class MethodEvaluation:
    """A method's evaluation over all folds, per level: each fold, mean +- sd over folds, all folds pooled."""

    method: str
    per_fold: dict[str, list[Evaluation]]  # level -> one Evaluation per fold (fold order)
    summary: dict[str, dict[str, MeanSD]]  # level -> metric -> mean +- sd over folds
    pooled: dict[str, Evaluation]  # level -> all test scans of all folds (with bootstrap CIs)
    folds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "folds": self.folds,
            "per_fold": {lv: [e.to_dict() for e in evs] for lv, evs in self.per_fold.items()},
            "summary": {lv: {k: v.to_dict() for k, v in s.items()} for lv, s in self.summary.items()},
            "pooled": {lv: e.to_dict() for lv, e in self.pooled.items()},
        }


def evaluate_method(
    method: str,
    scans: Sequence[ScanPrediction],
    levels: Sequence[str] = LEVELS,
    threshold: float = 0.5,
    stage_fn: StageFn | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> MethodEvaluation:
    """Evaluate a method's test predictions from all folds (``ScanPrediction.fold`` must be set).

    Per fold the metrics come without bootstrap; the pooled evaluation over all folds carries the bootstrap CIs.
    """
    missing = [s.scan_id for s in scans if s.fold is None]
    if missing:
        raise UsageError(f"method {method!r}: scans without a fold: {missing[:5]}")
    folds = sorted({int(s.fold) for s in scans})
    per_fold: dict[str, list[Evaluation]] = {}
    summary: dict[str, dict[str, MeanSD]] = {}
    pooled: dict[str, Evaluation] = {}
    for lv in levels:
        per_fold[lv] = [evaluate_scans([s for s in scans if s.fold == k], level=lv, threshold=threshold,
                                       stage_fn=stage_fn, n_boot=0) for k in folds]
        summary[lv] = summarize_folds(per_fold[lv])
        pooled[lv] = evaluate_scans(scans, level=lv, threshold=threshold, stage_fn=stage_fn, n_boot=n_boot,
                                    seed=seed, ci_level=ci_level)
    return MethodEvaluation(method, per_fold, summary, pooled, folds)


#: The paper's table columns (Tables 4-6) followed by the extra metrics, as (key, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("station.accuracy", "LNS Acc"), ("station.balanced_accuracy", "LNS BalAcc"),
    ("station.sensitivity", "LNS Sens"), ("station.specificity", "LNS Spec"), ("station.auc", "LNS AUC"),
    ("stage.accuracy", "N Acc"), ("stage.macro_sensitivity", "N Sens"), ("stage.macro_specificity", "N Spec"),
    ("stage.qwk", "N QWK"), ("stage.severe_error_rate", "N err>=2"), ("stage.n_auc", "N+ AUC"),
)


def markdown_table(results: Sequence[MethodEvaluation], level: str = "patient", digits: int = 2,
                   columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    """Methods as rows, metrics as columns, mean ± sd over folds (the layout of the paper's Tables 4-6)."""
    head = "| method | " + " | ".join(h for _, h in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [head, rule]
    for r in results:
        if level not in r.summary:
            raise UsageError(f"method {r.method!r} was not evaluated at level {level!r}")
        cells = [r.summary[level][k].format(digits) if k in r.summary[level] else "n/a" for k, _ in columns]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibration_summary(scans: Sequence[ScanPrediction]) -> dict[str, Any]:
    """Calibration of a method's station probabilities over all its test scans (known labels, present stations):
    expected calibration error (10 bins), Brier score and the reliability curve."""
    from ..classifier.calibration import brier_score, expected_calibration_error, reliability_curve

    if not scans:
        return {"n": 0, "ece": float("nan"), "brier": float("nan")}
    y = np.concatenate([s.station_true for s in scans])
    p = np.concatenate([s.station_prob for s in scans]).astype(float)
    curve = reliability_curve(p, y)
    return {"n": int(np.sum((y != UNKNOWN) & ~np.isnan(p))), "ece": expected_calibration_error(p, y),
            "brier": brier_score(p, y), "curve": {k: v.tolist() for k, v in curve.items()}}
