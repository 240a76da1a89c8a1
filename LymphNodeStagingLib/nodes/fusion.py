"""Fusion of the station CNN with the node evidence: a small logistic model fitted on the validation patients.

Inputs per station: the logit of the station CNN's calibrated probability, the logit of the node classifier's
station probability (the prior where the station has no detected node), whether a node was detected, and the
measurements of its nodes that a reader weighs: log(1 + largest short axis / 10 mm) and, with a PET,
log(1 + largest node SUVmax / 2.5) (0 without a node). The model is a logistic regression with a weak L2 penalty
(Newton iterations), so its output is a calibrated probability on the data it was fitted on. A node's fused
probability is the same model with the node's own probability and measurements in place of the station's. When
the validation stations hold one class only, nothing can be fitted: the fusion is then the mean of the two logits
(``fitted`` false).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError, UsageError

BASE_FEATURES = ("station_cnn_logit", "node_logit", "has_node")
MEASUREMENTS = ("log_short_axis", "log_node_suvmax")
#: Reference values of the measurements (the clinic's cut-offs map to log 2).
SHORT_AXIS_REF_MM, SUVMAX_REF = 10.0, 2.5
_EPS = 1e-4


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(q / (1.0 - q))


def fusion_features(station_prob, node_prob, has_node, short_axis=None, suv_max=None) -> tuple[np.ndarray, tuple]:
    """(n, k) inputs of the fusion and their names; the measurements only where given."""
    cols = [_logit(np.ravel(station_prob)), _logit(np.ravel(node_prob)), np.ravel(has_node).astype(float)]
    names = list(BASE_FEATURES)
    for values, ref, name in ((short_axis, SHORT_AXIS_REF_MM, MEASUREMENTS[0]), (suv_max, SUVMAX_REF, MEASUREMENTS[1])):
        if values is not None:
            v = np.nan_to_num(np.ravel(np.asarray(values, float)), nan=0.0).clip(min=0.0)
            cols.append(np.log1p(v / ref))
            names.append(name)
    return np.stack(cols, axis=-1), tuple(names)


@dataclass
class FusionModel:
    """Logistic fusion: p = sigmoid(w . features + b)."""

    weights: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])
    bias: float = 0.0
    features: tuple[str, ...] = BASE_FEATURES
    n: int = 0
    n_positive: int = 0
    fitted: bool = True

    def predict(self, station_prob, node_prob, has_node, short_axis=None, suv_max=None) -> np.ndarray:
        """Fused probabilities (the shape of ``station_prob``); the measurements this model was fitted with are
        required."""
        sp = np.asarray(station_prob, float)
        x, names = fusion_features(sp, node_prob, has_node, short_axis if MEASUREMENTS[0] in self.features else None,
                                   suv_max if MEASUREMENTS[1] in self.features else None)
        if names != tuple(self.features):
            raise UsageError(f"this fusion reads {', '.join(self.features)}; given {', '.join(names)}")
        z = x @ np.asarray(self.weights, float) + float(self.bias)
        return (1.0 / (1.0 + np.exp(-z))).reshape(sp.shape)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "weights": [float(w) for w in self.weights],
                "bias": float(self.bias), "n": self.n, "n_positive": self.n_positive, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, data: dict, where: str = "fusion") -> FusionModel:
        try:
            names = tuple(data.get("features", BASE_FEATURES))
            w = [float(v) for v in data["weights"]]
            if names[:3] != BASE_FEATURES or set(names[3:]) - set(MEASUREMENTS) or len(w) != len(names) \
                    or not np.all(np.isfinite(w)):
                raise ValueError("features and weights do not match")
            return cls(w, float(data["bias"]), names, int(data.get("n", 0)), int(data.get("n_positive", 0)),
                       bool(data.get("fitted", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: not a valid fusion model ({exc})") from None


def fit_fusion(station_prob, node_prob, has_node, labels, short_axis=None, suv_max=None, l2: float = 0.1,
               iterations: int = 50) -> FusionModel:
    """Fit the fusion on stations with a known label (1 / 0; -1 is left out)."""
    y = np.ravel(labels)
    known = y >= 0
    x, names = fusion_features(station_prob, node_prob, has_node, short_axis, suv_max)
    x, y = x[known], y[known].astype(float)
    if y.size == 0 or y.min() == y.max():
        weights = [0.5, 0.5] + [0.0] * (len(names) - 2)
        return FusionModel(weights, 0.0, names, int(y.size), int(y.sum()), fitted=False)
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    beta = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a @ beta)))
        grad = a.T @ (p - y) + penalty * beta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return FusionModel(beta[:-1].tolist(), float(beta[-1]), names, int(y.size), int(y.sum()))
