"""The node-based methods of ``lnstaging evaluate``: the node classifier (``nodes-mil``), its fusion with the station
CNN (``fusion``) and the clinic's rules on the detected nodes (``short-axis``: short axis >= 10 mm on CT;
``node-suvmax``: SUVmax >= 2.5; ``node-combined``: either), and the node-level AUC. The detected nodes of every scan
come from ``training.node_cases`` (cached in ``OUT/nodes/``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UsageError
from ..staging.stations import NUM_STATIONS

#: The clinic's cut-offs: short axis >= 10 mm (CT), SUVmax >= 2.5 (PET).
SHORT_AXIS_MM = 10.0
NODE_SUVMAX = 2.5
NODE_RULES = ("short-axis", "node-suvmax", "node-combined")


def predict_node_rule(rule: str, test: Sequence) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], dict]:
    """Station scores, decisions and node scores of a clinic rule (fixed cut-offs, nothing fitted). Scores: the
    largest short axis in mm, the largest SUVmax, or for the combination max(short axis / 10, SUVmax / 2.5)."""
    if rule not in NODE_RULES:
        raise UsageError(f"node rule must be one of {', '.join(NODE_RULES)}, got {rule!r}")
    scores, preds, node_scores = [], [], []
    for c in test:
        nd = c.nodes
        if rule == "short-axis":
            node_s, cut = nd.short_axis_mm, SHORT_AXIS_MM
        elif rule == "node-suvmax":
            node_s, cut = np.nan_to_num(nd.suv_max, nan=0.0), NODE_SUVMAX
        else:
            node_s = np.maximum(nd.short_axis_mm / SHORT_AXIS_MM, np.nan_to_num(nd.suv_max, nan=0.0) / NODE_SUVMAX)
            cut = 1.0
        s = nd.station_max(node_s) * c.sample.present
        scores.append(s)
        preds.append(s >= cut)
        node_scores.append(np.asarray(node_s, float))
    params = {"short-axis": {"short_axis_mm": SHORT_AXIS_MM}, "node-suvmax": {"suv_max": NODE_SUVMAX},
              "node-combined": {"short_axis_mm": SHORT_AXIS_MM, "suv_max": NODE_SUVMAX}}[rule]
    return np.array(scores), np.array(preds), node_scores, params


def node_classifier_predictions(model, cases: Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    """Calibrated station probabilities (S, 17) and calibrated node probabilities of the cases from a loaded
    ``nodes.malignancy.NodeClassifierModel``."""
    probs, node_p = [], []
    for c in cases:
        raw = model.node_probabilities(c.nodes.bag.patches)
        probs.append(model.station_probabilities(raw, c.nodes.bag.node_station, c.sample.present))
        node_p.append(model.calibration.apply(raw) if raw.size else raw)
    return np.array(probs).reshape(-1, NUM_STATIONS), node_p


def node_auc(node_scores: Sequence[np.ndarray], truth: Sequence[np.ndarray | None]) -> tuple[float, int, int]:
    """ROC AUC of detected nodes against their truth (scans without truth left out), with the numbers of malignant
    and benign detections."""
    from ..classifier.metrics import roc_auc

    s = [np.asarray(a, float) for a, t in zip(node_scores, truth, strict=True) if t is not None]
    y = [np.asarray(t) for t in truth if t is not None]
    if not s:
        return float("nan"), 0, 0
    s_all, y_all = np.concatenate(s), np.concatenate(y).astype(bool)
    return float(roc_auc(y_all, np.nan_to_num(s_all, nan=0.0))), int(y_all.sum()), int((~y_all).sum())
