"""Metrics of decisions, and the one threshold search: used by training (validation, the operating threshold)
and by the evaluation (the SUVmax and lesion-overlap baselines, station and N-stage metrics).

Balanced accuracy is the mean recall over the classes PRESENT in the reference (scikit-learn's
``balanced_accuracy_score``), for two classes (stations: the mean of sensitivity and specificity) and for four (the
N-stage: macro sensitivity). A class absent from the reference is left out, never counted as 1.0; with no reference
at all the value is NaN. A rate whose denominator is zero is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (without a warning) where every value is NaN."""
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    return _div(np.where(ok, x, 0.0).sum(axis=axis), ok.sum(axis=axis))


def mean_recall(confusion: Any) -> np.ndarray:
    """Mean recall over the classes present in the reference, from confusion matrices (..., K, K) with the
    reference in rows; NaN where no class is present. The balanced accuracy of the module docstring."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=-1)
    recall = _div(np.diagonal(cm, axis1=-2, axis2=-1), rows)
    return _nanmean(np.where(rows > 0, recall, np.nan))


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Balanced accuracy of integer labels (any number of classes); NaN for an empty reference."""
    t, p = np.asarray(y_true).astype(np.int64).ravel(), np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise UsageError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    if t.size == 0:
        return float("nan")
    classes, idx = np.unique(np.concatenate([t, p]), return_inverse=True)
    k = classes.size
    cm = np.bincount(idx[: t.size] * k + idx[t.size:], minlength=k * k).reshape(k, k)
    return float(mean_recall(cm))


def binary_from_counts(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity and balanced accuracy from counts (arrays of any equal shape)."""
    tp, fp, tn, fn = (np.asarray(v, dtype=float) for v in (tp, fp, tn, fn))
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    confusion = np.stack([np.stack([tn, fp], axis=-1), np.stack([fn, tp], axis=-1)], axis=-2)
    return {
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": mean_recall(confusion),
    }


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity and specificity of ``prob >= threshold``, and the count."""
    t = np.asarray(y_true).astype(bool).ravel()
    pd = np.asarray(prob, dtype=float).ravel() >= threshold
    m = binary_from_counts(np.sum(t & pd), np.sum(~t & pd), np.sum(~t & ~pd), np.sum(t & ~pd))
    return {**{k: float(v) for k, v in m.items()}, "n": int(t.size)}


def roc_auc(y_true: Any, scores: Any, weights: Any | None = None) -> np.ndarray | float:
    """ROC AUC of ``scores`` for binary ``y_true`` (ties count one half); NaN when a class is missing.

    ``weights`` (optional) of shape (N,) or (B, N) weights every sample (a bootstrap's draw counts); with (B, N)
    the result has shape (B,).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise UsageError(f"y_true and scores must be 1-D of the same length, got {y.shape} and {s.shape}")
    if np.any(np.isnan(s)):
        raise UsageError("scores contain NaN; every station with a known label needs a probability")
    w = np.ones((1, y.size)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=float))
    uniq, inv = np.unique(s, return_inverse=True)
    u = uniq.size
    wpos = np.zeros((w.shape[0], u))
    wneg = np.zeros((w.shape[0], u))
    for target, mask in ((wpos, y), (wneg, ~y)):
        idx = inv[mask]
        for b in range(w.shape[0]):
            target[b] = np.bincount(idx, weights=w[b, mask], minlength=u)
    neg_below = np.cumsum(wneg, axis=1) - wneg
    num = (wpos * (neg_below + 0.5 * wneg)).sum(axis=1)
    auc = _div(num, wpos.sum(axis=1) * wneg.sum(axis=1))
    return float(auc[0]) if weights is None or np.ndim(weights) == 1 else auc


# --- result types ----------------------------------------------------------------------------------------------


def tune_threshold(y_true: Any, scores: Any, candidates: Sequence[float] | None = None, *, strict: bool = False,
                   prefer: float = 0.5, metric: str = "balanced_accuracy") -> tuple[float, float]:
    """The threshold with the best ``metric`` of the decisions ``score >= t`` (``> t`` when ``strict``).

    ``candidates``: the thresholds to try (e.g. SUV 2.5, 3, ..., 5.5); None tries ``prefer`` and the midpoints
    between the sorted distinct scores. Ties go to the candidate nearest to ``prefer``. Labels -1 (unknown) are
    left out. Rule for an absent class: when the known labels hold only one class (or none), no threshold is
    better than another, and ``(prefer, nan)`` is returned. Returns (threshold, metric value)."""
    if metric not in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        raise UsageError(f"metric must be accuracy, balanced_accuracy, sensitivity or specificity, got {metric!r}")
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise UsageError(f"y_true and scores must have the same length, got {y.size} and {s.size}")
    known = y != -1
    y, s = y[known].astype(bool), s[known]
    if candidates is not None and len(candidates) == 0:
        raise UsageError("tune_threshold: candidates is empty")
    if y.all() or not y.any():
        return float(prefer), float("nan")
    if candidates is None:
        u = np.unique(s)
        cands = np.concatenate([[prefer], (u[1:] + u[:-1]) / 2.0])
    else:
        cands = np.asarray(sorted(float(c) for c in candidates))
    pred = (s[None, :] > cands[:, None]) if strict else (s[None, :] >= cands[:, None])
    tp, fp = (pred & y).sum(axis=1), (pred & ~y).sum(axis=1)
    tn, fn = (~pred & ~y).sum(axis=1), (~pred & y).sum(axis=1)
    values = binary_from_counts(tp, fp, tn, fn)[metric]
    best = np.nanmax(values)
    good = cands[np.isclose(values, best)]
    t = float(good[np.argmin(np.abs(good - prefer))])
    return t, float(best)
