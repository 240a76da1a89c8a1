"""Lymph node detection metrics on (z, y, x) arrays: component matching, FROC, average recall, object, voxel and
per-slice Dice, overall and by short-axis size bin, per scan and pooled over scans.

Component matching (Shevtsov et al.): truth components are the instance ids of a truth instance map (0 = background;
a binary mask, i.e. a bool array or one holding only 0 and 1, is split into 26-connected components); predicted
components are the 26-connected components of ``prob >= threshold``, each with a self score = its maximum probability.
Every component gets a hit-Dice (its best Dice with a component of the other side) and every truth component a
hit-score (the self score of its best predicted component; best = highest Dice, ties: higher score, then lower
component number). At score level ``l``:

- FP = predicted components with self score > ``l`` and hit-Dice == 0 (a piece that touches a truth node is no FP);
- TP = truth components with hit-score > ``l`` and hit-Dice > 0; FN = the other truth components.

Both only grow as ``l`` falls, so the FROC curve is monotone by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError, UsageError
from .instances import CONNECTIVITY_26, measure_label_axes

#: Short-axis size bins in mm, [low, high).
SIZE_BINS: dict[str, tuple[float, float]] = {
    "<5mm": (0.0, 5.0),
    "5-10mm": (5.0, 10.0),
    ">=10mm": (10.0, math.inf),
    ">=5mm": (5.0, math.inf),
}
_TOL = 1e-9


@dataclass
class ScanMatch:
    """Matched components of one scan (arrays by component, in component-number order)."""

    truth_ids: np.ndarray  # instance id of every truth component (label number for a binary mask)
    truth_voxels: np.ndarray
    truth_hit_dice: np.ndarray
    truth_hit_score: np.ndarray  # -inf where the component touches no prediction
    pred_score: np.ndarray  # self score: max probability in the component
    pred_voxels: np.ndarray
    pred_hit_dice: np.ndarray
    threshold: float  # the base threshold that made the predicted components

    @property
    def n_truth(self) -> int:
        return int(self.truth_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_score.size)

    def counts(self, level: float, select: np.ndarray | None = None) -> tuple[int, int, int]:
        """(TP, FP, FN) at score level ``level`` (strict ``>``, see the module docstring); ``select`` (bool, one per
        truth component) restricts TP/FN to those truth components, FP always counts every false positive."""
        fp = int(np.count_nonzero((self.pred_score > level) & (self.pred_hit_dice == 0)))
        hit = (self.truth_hit_dice > 0) & (self.truth_hit_score > level)
        total = self.n_truth
        if select is not None:
            hit, total = hit[select], int(np.count_nonzero(select))
        tp = int(np.count_nonzero(hit))
        return tp, fp, total - tp

    def object_dice(self, select: np.ndarray | None = None) -> float:
        """Mean over (selected) truth components of the Dice with their best predicted component (0 if none); NaN
        without truth components."""
        dice = self.truth_hit_dice if select is None else self.truth_hit_dice[select]
        return float(dice.mean()) if dice.size else math.nan


@dataclass
class FrocCurve:
    """FROC curve pooled over scans. Point i counts the predicted components with self score >= thresholds[i] (the
    rule "score > l" for any l in [thresholds[i + 1], thresholds[i])); thresholds fall, FP and sensitivity rise."""

    thresholds: np.ndarray
    fp_per_scan: np.ndarray
    sensitivity: np.ndarray  # TP / truth components (NaN when there are none)
    n_truth: int
    n_scans: int

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary (NaN as None)."""
        return {"thresholds": _floats(self.thresholds), "fp_per_scan": _floats(self.fp_per_scan),
                "sensitivity": _floats(self.sensitivity), "n_truth": self.n_truth, "n_scans": self.n_scans}


@dataclass
class DetectionMetrics:
    """Metrics of one group of truth components (all, or one size bin)."""

    name: str
    n_truth: int
    n_scans_with_truth: int
    average_recall: float
    fp_per_scan_at_80_recall: float  # inf when 80 % recall is never reached
    object_dice: float
    voxel_dice: float
    slice_dice: float
    froc: FrocCurve

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary (NaN and inf as None)."""
        out: dict[str, object] = {"name": self.name, "n_truth": self.n_truth,
                                  "n_scans_with_truth": self.n_scans_with_truth}
        for key in ("average_recall", "fp_per_scan_at_80_recall", "object_dice", "voxel_dice", "slice_dice"):
            out[key] = _float(getattr(self, key))
        out["froc"] = self.froc.to_dict()
        return out


@dataclass
class DetectionReport:
    """``evaluate_detection``'s result: overall metrics, metrics by short-axis bin (SIZE_BINS) and per-scan values."""

    threshold: float
    n_scans: int
    overall: DetectionMetrics
    bins: dict[str, DetectionMetrics]
    voxel_dice_per_scan: list[float] = field(default_factory=list)
    slice_dice_per_scan: list[float] = field(default_factory=list)
    object_dice_per_scan: list[float] = field(default_factory=list)  # NaN where the scan has no truth component

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary (NaN and inf as None)."""
        return {"threshold": self.threshold, "n_scans": self.n_scans, "overall": self.overall.to_dict(),
                "bins": {k: v.to_dict() for k, v in self.bins.items()},
                "voxel_dice_per_scan": _floats(self.voxel_dice_per_scan),
                "slice_dice_per_scan": _floats(self.slice_dice_per_scan),
                "object_dice_per_scan": _floats(self.object_dice_per_scan)}


def _float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _floats(values: Sequence[float] | np.ndarray) -> list[float | None]:
    return [_float(v) for v in np.asarray(values, dtype=float).ravel()]


# --- input checks -------------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float, np.integer, np.floating)) or not 0.0 < float(threshold) <= 1.0:
        raise UsageError(f"threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


def _check_prob(prob: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    p = np.asarray(prob)
    if p.ndim != 3:
        raise InputError(f"{name} must be a 3D (z, y, x) probability array, got shape {p.shape}")
    if shape is not None and p.shape != shape:
        raise InputError(f"{name} has shape {p.shape}; expected the shape of the truth map, {shape}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer) or p.dtype == bool):
        raise InputError(f"{name} must be a numeric array, got dtype {p.dtype}")
    if np.issubdtype(p.dtype, np.floating) and not np.isfinite(p).all():
        raise InputError(f"{name} contains NaN or infinite values; expected probabilities in 0..1")
    return p if np.issubdtype(p.dtype, np.floating) else p.astype(np.float64)


def _truth_labels(truth: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive labels 1..n of the truth components and their ids (instance ids, or component numbers of a binary
    mask)."""
    t = np.asarray(truth)
    if t.ndim != 3:
        raise InputError(f"{name} must be a 3D (z, y, x) instance map or binary mask, got shape {t.shape}")
    if t.dtype == bool:
        binary = True
    else:
        if np.issubdtype(t.dtype, np.floating):
            if not np.isfinite(t).all() or not np.array_equal(t, np.round(t)):
                raise InputError(f"{name} must hold integer instance ids (0 = background), got non-integer values")
        elif not np.issubdtype(t.dtype, np.integer):
            raise InputError(f"{name} must be an integer instance map or binary mask, got dtype {t.dtype}")
        if t.size and t.min() < 0:
            raise InputError(f"{name} must hold instance ids >= 0 (0 = background), got {t.min()}")
        binary = t.size == 0 or t.max() <= 1
    if binary:
        labels, n = ndimage.label(t != 0, structure=CONNECTIVITY_26)
        return labels, np.arange(1, n + 1)
    t = t.astype(np.int64, copy=False)
    present = np.nonzero(np.bincount(t.ravel()))[0]
    ids = present[present > 0]
    lut = np.zeros(int(t.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1)
    return lut[t], ids


# --- matching -----------------------------------------------------------------------------------------------------


def _match(truth_lab: np.ndarray, truth_ids: np.ndarray, pred_lab: np.ndarray, n_pred: int, prob: np.ndarray,
           threshold: float) -> tuple[ScanMatch, np.ndarray, np.ndarray]:
    """ScanMatch and the overlapping (truth index, pred index) pairs (0-based)."""
    n_truth = truth_ids.size
    t_vox = np.bincount(truth_lab.ravel(), minlength=n_truth + 1)[1:].astype(np.int64)
    p_vox = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:].astype(np.int64)
    score = (np.asarray(ndimage.maximum(prob, pred_lab, np.arange(1, n_pred + 1)), dtype=float).reshape(-1)
             if n_pred else np.zeros(0))
    both = (truth_lab > 0) & (pred_lab > 0)
    codes = truth_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both]
    pairs, inter = np.unique(codes, return_counts=True)
    g, p = pairs // (n_pred + 1) - 1, pairs % (n_pred + 1) - 1
    dice = 2.0 * inter / (t_vox[g] + p_vox[p]) if pairs.size else np.zeros(0)
    t_dice, t_score = np.zeros(n_truth), np.full(n_truth, -np.inf)
    p_dice = np.zeros(n_pred)
    if pairs.size:
        order = np.lexsort((p, -score[p], -dice, g))  # by truth, then best Dice, higher score, lower number
        first = order[np.unique(g[order], return_index=True)[1]]
        t_dice[g[first]], t_score[g[first]] = dice[first], score[p[first]]
        np.maximum.at(p_dice, p, dice)
    match = ScanMatch(truth_ids=np.asarray(truth_ids, dtype=np.int64), truth_voxels=t_vox, truth_hit_dice=t_dice,
                      truth_hit_score=t_score, pred_score=score, pred_voxels=p_vox, pred_hit_dice=p_dice,
                      threshold=threshold)
    return match, g, p


def match_components(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> ScanMatch:
    """Match the truth components of one scan against the components of ``prob >= threshold``."""
    threshold = _check_threshold(threshold)
    truth_lab, ids = _truth_labels(truth, "truth")
    p = _check_prob(prob, "prob", truth_lab.shape)
    pred_lab, n_pred = ndimage.label(p >= threshold, structure=CONNECTIVITY_26)
    return _match(truth_lab, ids, pred_lab, n_pred, p, threshold)[0]


# --- FROC ---------------------------------------------------------------------------------------------------------


def froc(scans: Sequence[ScanMatch], select: Sequence[np.ndarray] | None = None) -> FrocCurve:
    """FROC curve pooled over scans at every distinct self score: sensitivity = TP / truth components against mean FP
    per scan. ``select`` (one bool array per scan, one value per truth component) restricts the truth components
    (sensitivity); FP counts every false positive of every scan."""
    if not scans:
        raise InputError("scans is empty; expected at least one ScanMatch")
    if select is not None and len(select) != len(scans):
        raise InputError(f"select has {len(select)} entries; expected one per scan ({len(scans)})")
    sel = [np.ones(s.n_truth, bool) if select is None else np.asarray(select[i], bool) for i, s in enumerate(scans)]
    for i, (s, m) in enumerate(zip(scans, sel, strict=True)):
        if m.shape != (s.n_truth,):
            raise InputError(f"select[{i}] has shape {m.shape}; expected ({s.n_truth},), one per truth component")
    all_scores = np.concatenate([s.pred_score for s in scans])
    fp_scores = np.sort(np.concatenate([s.pred_score[s.pred_hit_dice == 0] for s in scans]))
    tp_scores = np.sort(np.concatenate([s.truth_hit_score[(s.truth_hit_dice > 0) & m]
                                        for s, m in zip(scans, sel, strict=True)]))
    n_truth = int(sum(int(m.sum()) for m in sel))
    thresholds = np.unique(all_scores)[::-1]
    fp = fp_scores.size - np.searchsorted(fp_scores, thresholds, side="left")
    tp = tp_scores.size - np.searchsorted(tp_scores, thresholds, side="left")
    sens = tp / n_truth if n_truth else np.full(thresholds.size, np.nan)
    return FrocCurve(thresholds=thresholds, fp_per_scan=fp / len(scans), sensitivity=np.asarray(sens, dtype=float),
                     n_truth=n_truth, n_scans=len(scans))


def average_recall(curve: FrocCurve, max_fp: float = 5.0, step: float = 0.01) -> float:
    """Recall averaged over the FP-per-scan values x = 0, step, 2 step, ..., max_fp (501 values by default).

    Recall at x = the highest sensitivity among the curve's points with FP per scan <= x (1e-9 tolerance), 0 when no
    point qualifies; beyond the curve's last point the recall stays at its sensitivity. NaN without truth components.
    """
    if not (math.isfinite(max_fp) and max_fp >= 0):
        raise UsageError(f"max_fp must be a finite number >= 0, got {max_fp!r}")
    if not (math.isfinite(step) and step > 0):
        raise UsageError(f"step must be > 0, got {step!r}")
    if curve.n_truth == 0:
        return math.nan
    xs = np.arange(int(math.floor(max_fp / step + _TOL)) + 1) * step
    if curve.fp_per_scan.size == 0:
        return 0.0
    order = np.argsort(curve.fp_per_scan, kind="stable")
    fps = curve.fp_per_scan[order]
    best = np.maximum.accumulate(curve.sensitivity[order])
    k = np.searchsorted(fps, xs + _TOL, side="right") - 1
    recall = np.where(k >= 0, best[np.maximum(k, 0)], 0.0)
    return float(recall.mean())


def fp_at_recall(curve: FrocCurve, recall: float = 0.8) -> float:
    """The smallest FP per scan at which the curve reaches ``recall`` (inf if never; NaN without truth components)."""
    if not (math.isfinite(recall) and 0.0 < recall <= 1.0):
        raise UsageError(f"recall must be in (0, 1], got {recall!r}")
    if curve.n_truth == 0:
        return math.nan
    ok = curve.sensitivity >= recall - _TOL
    return float(curve.fp_per_scan[ok].min()) if ok.any() else math.inf


def object_dice(scans: Sequence[ScanMatch], select: Sequence[np.ndarray] | None = None) -> float:
    """Mean over scans of ``ScanMatch.object_dice`` (predicted components at the base threshold); scans without
    (selected) truth components are skipped; NaN when no scan has any."""
    values = [s.object_dice(None if select is None else np.asarray(select[i], bool)) for i, s in enumerate(scans)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


# --- voxel and slice Dice -----------------------------------------------------------------------------------------


def _dice(inter: float, a: float, b: float) -> float:
    return 2.0 * inter / (a + b) if a + b > 0 else math.nan


def _slice_dices(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    inter = np.count_nonzero(t & p, axis=(1, 2))
    total = np.count_nonzero(t, axis=(1, 2)) + np.count_nonzero(p, axis=(1, 2))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def _masks(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(truth), np.asarray(pred)
    if t.ndim != 3 or p.shape != t.shape:
        raise InputError(f"truth and pred must be 3D (z, y, x) arrays of one shape, got {t.shape} and {p.shape}")
    for a, name in ((t, "truth"), (p, "pred")):
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise InputError(f"{name} contains NaN or infinite values; expected a label or binary mask")
    return t != 0, p != 0


def voxel_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Voxel Dice of two (z, y, x) masks (non-zero = foreground); NaN when both are empty."""
    t, p = _masks(truth, pred)
    return _dice(np.count_nonzero(t & p), np.count_nonzero(t), np.count_nonzero(p))


def slice_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """S-Net's per-slice Dice: the mean over axial slices (axis 0) of the 2D Dice, an axial slice with empty truth and
    empty prediction counting as 1. The many empty slices inflate it; report it only beside object-level metrics."""
    t, p = _masks(truth, pred)
    return float(_slice_dices(t, p).mean()) if t.shape[0] else math.nan


# --- evaluation ---------------------------------------------------------------------------------------------------


def _spacings(spacings: Sequence[float] | Sequence[Sequence[float]], n: int) -> list[tuple[float, float, float]]:
    values = list(spacings)
    if len(values) == 3 and all(np.ndim(v) == 0 for v in values):
        values = [values] * n
    if len(values) != n:
        raise InputError(f"spacings has {len(values)} entries; expected one (x, y, z) spacing per scan ({n}) or one "
                         "for all")
    out = []
    for i, s in enumerate(values):
        try:
            v = tuple(float(x) for x in s)
        except (TypeError, ValueError) as exc:
            raise InputError(f"spacings[{i}] must be (x, y, z) in mm, got {s!r}") from exc
        if len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v):
            raise InputError(f"spacings[{i}] must be three positive finite spacings (x, y, z) in mm, got {s!r}")
        out.append(v)
    return out


def evaluate_detection(truth_maps: Sequence[np.ndarray], prob_maps: Sequence[np.ndarray],
                       spacings: Sequence[float] | Sequence[Sequence[float]], threshold: float = 0.5,
                       short_axes_mm: Sequence[Mapping[int, float]] | None = None) -> DetectionReport:
    """Detection metrics of node probability maps against truth instance maps (or binary masks), all (z, y, x).

    ``spacings``: (x, y, z) mm per scan (SimpleITK's GetSpacing order) or one for all. ``threshold`` makes the predicted
    components (FROC base threshold) and the masks of object, voxel and slice Dice. Short axes of the truth components
    come from ``short_axes_mm`` (per scan, by truth instance id; for a binary mask by 26-connected component number in
    scipy.ndimage.label order) or are measured (``measure_label_axes``: largest axial slice).

    Metrics per group (overall and SIZE_BINS): average recall (0..5 FP per scan), FP per scan at 80 % recall, object
    Dice (scans without truth components of the group skipped), voxel Dice pooled over scans and per-slice Dice pooled
    over all axial slices of all scans. In a size bin, sensitivity, recall and object Dice use only the bin's truth
    components while FP counts every false positive; the voxel and slice Dice of a bin compare the bin's truth
    components with the predicted components that touch them plus every false positive (predicted components that
    touch only truth of other bins are left out).
    """
    threshold = _check_threshold(threshold)
    if len(truth_maps) != len(prob_maps) or not truth_maps:
        raise InputError(f"truth_maps and prob_maps must be non-empty and of one length, got {len(truth_maps)} and "
                         f"{len(prob_maps)}")
    n_scans = len(truth_maps)
    spacing = _spacings(spacings, n_scans)
    if short_axes_mm is not None and len(short_axes_mm) != n_scans:
        raise InputError(f"short_axes_mm has {len(short_axes_mm)} entries; expected one per scan ({n_scans})")
    groups = ["all", *SIZE_BINS]
    scans: list[ScanMatch] = []
    selects: dict[str, list[np.ndarray]] = {k: [] for k in groups}
    voxel = {k: np.zeros(3) for k in groups}  # intersection, truth, prediction
    slices: dict[str, list[np.ndarray]] = {k: [] for k in groups}
    voxel_per_scan, slice_per_scan = [], []
    for i, (truth, prob) in enumerate(zip(truth_maps, prob_maps, strict=True)):
        truth_lab, ids = _truth_labels(truth, f"truth_maps[{i}]")
        p = _check_prob(prob, f"prob_maps[{i}]", truth_lab.shape)
        pred_lab, n_pred = ndimage.label(p >= threshold, structure=CONNECTIVITY_26)
        match, g, q = _match(truth_lab, ids, pred_lab, n_pred, p, threshold)
        scans.append(match)
        if short_axes_mm is not None:
            given = short_axes_mm[i]
            missing = [int(k) for k in ids if int(k) not in given]
            if missing:
                raise InputError(f"short_axes_mm[{i}] has no short axis for truth component id(s) {missing[:10]}")
            short = np.array([float(given[int(k)]) for k in ids])
            if not np.isfinite(short).all():
                raise InputError(f"short_axes_mm[{i}] contains NaN or infinite values")
        else:
            axes = measure_label_axes(truth_lab, spacing[i])
            short = np.array([axes[k][0] for k in range(1, ids.size + 1)])
        t_all, p_all = truth_lab > 0, pred_lab > 0
        for name in groups:
            if name == "all":
                sel = np.ones(ids.size, bool)
                t_mask, p_mask = t_all, p_all
            else:
                lo, hi = SIZE_BINS[name]
                sel = (short >= lo) & (short < hi)
                keep = match.pred_hit_dice == 0
                keep[q[sel[g]]] = True
                t_mask = np.concatenate([[False], sel])[truth_lab]
                p_mask = np.concatenate([[False], keep])[pred_lab]
            selects[name].append(sel)
            counts = np.array([np.count_nonzero(t_mask & p_mask), np.count_nonzero(t_mask), np.count_nonzero(p_mask)])
            voxel[name] += counts
            per_slice = _slice_dices(t_mask, p_mask)
            slices[name].append(per_slice)
            if name == "all":
                voxel_per_scan.append(_dice(*counts))
                slice_per_scan.append(float(per_slice.mean()) if per_slice.size else math.nan)

    def metrics(name: str) -> DetectionMetrics:
        sel = selects[name]
        curve = froc(scans, sel)
        all_slices = np.concatenate(slices[name])
        return DetectionMetrics(
            name=name, n_truth=curve.n_truth, n_scans_with_truth=sum(int(m.any()) for m in sel),
            average_recall=average_recall(curve), fp_per_scan_at_80_recall=fp_at_recall(curve, 0.8),
            object_dice=object_dice(scans, sel), voxel_dice=_dice(*voxel[name]),
            slice_dice=float(all_slices.mean()) if all_slices.size else math.nan, froc=curve)

    return DetectionReport(threshold=threshold, n_scans=n_scans, overall=metrics("all"),
                           bins={k: metrics(k) for k in SIZE_BINS}, voxel_dice_per_scan=voxel_per_scan,
                           slice_dice_per_scan=slice_per_scan,
                           object_dice_per_scan=[s.object_dice() for s in scans])
