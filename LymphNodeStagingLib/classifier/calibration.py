"""Calibration of station probabilities: a probability shown as 0.9 should come true about 9 times in 10.

A :class:`Calibration` maps the network's probability p to a calibrated one. It is fitted on the validation
patients of a training run (never on the training patients) and stored in the checkpoint's manifest, and every
probability the product shows (table, overlay colours, legend, JSON, Slicer) is the calibrated one.

Methods, chosen by :func:`fit_calibration` with ``method="auto"`` from the number of known station labels of the
rarer class (``m``):

- ``temperature`` (m < 20): p' = sigmoid(logit(p) / T), one parameter; keeps the ranking and the 0.5 point.
- ``platt`` (20 <= m < 100): p' = sigmoid(a * logit(p) + b), two parameters.
- ``isotonic`` (m >= 100): a non-decreasing step function fitted by pool-adjacent-violators, linearly
  interpolated between the fitted points and clipped to [0.001, 0.999].
- ``identity``: nothing to fit (one class only among the labels).

Metrics: expected calibration error (ECE) with 10 equal-width bins, weighted by the share of stations in a bin,
and the Brier score (mean squared error of the probability).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelError, UsageError

METHODS = ("identity", "temperature", "platt", "isotonic")
ECE_BINS = 10
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(np.asarray(z, dtype=np.float64))


@dataclass
class Calibration:
    """A fitted map from network probabilities to calibrated probabilities, with what it was fitted on."""

    method: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0  # stations with a known label used for the fit
    n_positive: int = 0
    ece_before: float = float("nan")  # on the fitting data
    ece_after: float = float("nan")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"calibration method {self.method!r}: expected one of {', '.join(METHODS)}")

    def apply(self, probs: Any) -> np.ndarray:
        """Calibrated probabilities (NaN stays NaN: an absent station)."""
        p = np.asarray(probs, dtype=np.float64)
        nan = np.isnan(p)
        q = np.where(nan, 0.5, p)
        if self.method == "temperature":
            out = _sigmoid(_logit(q) / float(self.params["t"]))
        elif self.method == "platt":
            out = _sigmoid(float(self.params["a"]) * _logit(q) + float(self.params["b"]))
        elif self.method == "isotonic":
            x, y = np.asarray(self.params["x"], float), np.asarray(self.params["y"], float)
            out = np.clip(np.interp(q, x, y), 0.001, 0.999)
        else:
            out = q
        return np.where(nan, np.nan, out)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ece_before", "ece_after"):
            d[k] = None if not math.isfinite(d[k]) else round(float(d[k]), 6)
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> Calibration:
        """A calibration from a checkpoint manifest; a ModelError naming ``where`` when it is malformed."""
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            raise ModelError(f"{where}: expected a calibration with a method among {', '.join(METHODS)}, got {data!r}")
        params = data.get("params") or {}
        need = {"temperature": ("t",), "platt": ("a", "b"), "isotonic": ("x", "y")}.get(data["method"], ())
        missing = [k for k in need if k not in params]
        if missing:
            raise ModelError(f"{where}: the {data['method']} calibration lacks {', '.join(missing)}")
        if data["method"] == "temperature" and not float(params["t"]) > 0:
            raise ModelError(f"{where}: temperature must be positive, got {params['t']}")
        if data["method"] == "isotonic":
            x, y = np.asarray(params["x"], float), np.asarray(params["y"], float)
            if x.size < 2 or x.shape != y.shape or np.any(np.diff(x) < 0) or np.any(np.diff(y) < -1e-12):
                raise ModelError(f"{where}: the isotonic calibration needs increasing x and non-decreasing y")
        return cls(method=data["method"], params=dict(params), n=int(data.get("n", 0)),
                   n_positive=int(data.get("n_positive", 0)),
                   ece_before=float("nan") if data.get("ece_before") is None else float(data["ece_before"]),
                   ece_after=float("nan") if data.get("ece_after") is None else float(data["ece_after"]))


IDENTITY = Calibration()


# ------------------------------------------------------------------------------------------------ metrics


def _known(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise UsageError(f"probabilities and labels must have the same length, got {p.size} and {y.size}")
    keep = (y != -1) & ~np.isnan(p)
    return p[keep], y[keep].astype(np.float64)


def reliability_curve(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of predicted probability: count, mean predicted probability, observed frequency."""
    p, y = _known(probs, labels)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / count
        freq = np.bincount(idx, weights=y, minlength=bins) / count
    return {"edges": np.linspace(0.0, 1.0, bins + 1), "count": count, "mean_predicted": mean_p, "observed": freq}


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (share of stations in the bin) x |mean predicted - observed frequency|."""
    c = reliability_curve(probs, labels, bins)
    n = c["count"].sum()
    if n == 0:
        return float("nan")
    ok = c["count"] > 0
    return float(np.sum(c["count"][ok] / n * np.abs(c["mean_predicted"][ok] - c["observed"][ok])))


def brier_score(probs: Any, labels: Any) -> float:
    """Mean squared difference between the probability and the label (0 best, 0.25 for a constant 0.5)."""
    p, y = _known(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


# ------------------------------------------------------------------------------------------------ fitting


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """T > 0 minimising the log loss of sigmoid(z / T) (golden-section search on log T)."""
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2

    def f(u: float) -> float:
        return _nll(_sigmoid(z / math.exp(u)), y)

    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if f(c) < f(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return math.exp((a + b) / 2)


def _fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Logistic regression of y on z: a, b minimising the log loss of sigmoid(a z + b) (L-BFGS)."""
    from scipy.optimize import minimize
    from scipy.special import log_expit

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        u = w[0] * z + w[1]
        value = -np.mean(y * log_expit(u) + (1 - y) * log_expit(-u))
        r = _sigmoid(u) - y
        return float(value), np.array([np.mean(r * z), np.mean(r)])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Pool-adjacent-violators on the probabilities sorted ascending; returns the block means as (x, y) knots."""
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    means, weights, xs = [], [], []
    for pi, yi in zip(ps, ys, strict=True):
        means.append(float(yi))
        weights.append(1.0)
        xs.append([float(pi), float(pi)])
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, x2 = means.pop(), weights.pop(), xs.pop()
            m1, w1 = means[-1], weights[-1]
            means[-1] = (m1 * w1 + m2 * w2) / (w1 + w2)
            weights[-1] = w1 + w2
            xs[-1][1] = x2[1]
    kx, ky = [], []
    for (x0, x1), m in zip(xs, means, strict=True):
        for xv in ((x0,) if x0 == x1 else (x0, x1)):
            if kx and xv <= kx[-1]:
                ky[-1] = max(ky[-1], m)
                continue
            kx.append(xv)
            ky.append(m)
    if len(kx) < 2:
        kx, ky = [0.0, 1.0], [ky[0], ky[0]]
    return kx, ky


def fit_calibration(probs: Any, labels: Any, method: str = "auto") -> Calibration:
    """Fit a calibration on the validation stations' probabilities and labels (-1 = unknown, left out)."""
    p, y = _known(probs, labels)
    n_pos = int(y.sum())
    m = min(n_pos, int(y.size) - n_pos)
    if method == "auto":
        method = "identity" if m == 0 else "temperature" if m < 20 else "platt" if m < 100 else "isotonic"
    if method not in METHODS:
        raise UsageError(f"calibration method {method!r}: expected auto or one of {', '.join(METHODS)}")
    if m == 0 and method != "identity":
        raise UsageError("calibration needs validation stations of both classes; the labels hold only one")
    z = _logit(p)
    if method == "temperature":
        params: dict[str, Any] = {"t": _fit_temperature(z, y)}
    elif method == "platt":
        a, b = _fit_platt(z, y)
        params = {"a": a, "b": b}
    elif method == "isotonic":
        kx, ky = _fit_isotonic(p, y)
        params = {"x": kx, "y": ky}
    else:
        params = {}
    cal = Calibration(method, params, int(y.size), n_pos)
    cal.ece_before = expected_calibration_error(p, y)
    cal.ece_after = expected_calibration_error(cal.apply(p), y)
    return cal


def calibration_of(manifest: dict, where: str = "checkpoint") -> Calibration:
    """The calibration a checkpoint manifest carries (identity for a model trained before calibration existed).

    A manifest that says ``"calibrated": true`` must carry a valid calibration; otherwise it is refused."""
    data = manifest.get("calibration")
    if data is None:
        if manifest.get("calibrated"):
            raise ModelError(f"{where}: the manifest says the model is calibrated but holds no calibration")
        return IDENTITY
    return Calibration.from_dict(data, f"{where}: calibration")
