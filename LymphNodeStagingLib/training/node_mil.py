"""Training of the node classifier from station labels (multiple-instance learning, after Shevtsov et al.).

Bags: the detected nodes of one station. A benign station (label 0) pushes every one of its nodes towards benign
(binary cross-entropy). A malignant station (label 1) contributes only while every one of its nodes is predicted
benign (probability < 0.5), and then only through its most suspicious node (cross-entropy of the largest logit
towards malignant, weighted by ``pos_weight``). Patients whose stations are unknown but whose N-stage is known use the
group pseudo-labels of the rule set (N0: every group benign; N1: group 1 malignant; ...): a group is one bag of the
nodes of its stations for the patient's tumour side. Stations without a detected node carry no loss; their
probability is the learned prior (``nodes.malignancy.learn_prior``).

All nodes of a patient go through the network in one batch; a step takes ``patients_per_step`` patients. The best
epoch is chosen by the station AUC of the pooled node probabilities on the validation patients, on which the
calibration of the pooled probabilities and the threshold are then fitted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..classifier.calibration import fit_calibration
from ..classifier.checkpoint import load_checkpoint, save_checkpoint
from ..classifier.metrics import roc_auc, tune_threshold
from ..errors import ModelError, UsageError
from ..io.files import write_json
from ..nodes.malignancy import (
    NODE_CLASSIFIER_KIND,
    NodeClassifier,
    NodeClassifierConfig,
    learn_prior,
    pooled_station_scores,
    predict_nodes,
    station_scores,
)
from ..runtime import Progress, ProgressCallback, parse_device, torch_threads
from ..staging.rules import DEFAULT_RULES, UNKNOWN, load_rules, pseudo_labels
from ..staging.stations import NUM_STATIONS

log = logging.getLogger(__name__)


@dataclass
class NodeBagCase:
    """The detected nodes of one scan with the scan's labels: what node training and evaluation need."""

    patient_id: str
    patches: np.ndarray  # (N, 3, S, S, S) CT, mask, PET (float16 or float32)
    node_station: np.ndarray  # (N,) station index 0..16, -1 outside every station
    present: np.ndarray  # (17,) bool: stations of the station map
    station_labels: np.ndarray  # (17,) 1 / 0 / -1
    n_stage: int = UNKNOWN
    side: str = "R"

    @property
    def n_nodes(self) -> int:
        return int(len(self.node_station))

    def has_node(self) -> np.ndarray:
        """(17,) bool: the station holds at least one detected node."""
        out = np.zeros(NUM_STATIONS, dtype=bool)
        st = self.node_station[self.node_station >= 0]
        out[st] = True
        return out


@dataclass
class Bag:
    nodes: np.ndarray  # indices into the case's nodes
    label: int  # 1 malignant, 0 benign


def case_bags(case: NodeBagCase, rules: str = DEFAULT_RULES) -> list[Bag]:
    """Station bags of the known station labels; without any, group bags from the N-stage's pseudo-labels."""
    bags = []
    st = np.asarray(case.node_station)
    labels = np.asarray(case.station_labels)
    for s in np.flatnonzero(labels >= 0):
        idx = np.flatnonzero(st == s)
        if idx.size:
            bags.append(Bag(idx, int(labels[s])))
    if bags or (labels >= 0).any() or case.n_stage == UNKNOWN:
        return bags
    masks = load_rules(rules).group_masks(case.side)  # (3, 17)
    for g, target in enumerate(pseudo_labels(case.n_stage)):
        if target == UNKNOWN:
            continue
        idx = np.flatnonzero(np.isin(st, np.flatnonzero(masks[g])))
        if idx.size:
            bags.append(Bag(idx, int(target)))
    return bags


def mil_loss(logits: torch.Tensor, bags: Sequence[Bag], pos_weight: float = 1.0) -> torch.Tensor:
    """The multiple-instance loss of one patient's nodes (see the module docstring); the mean over its terms (every
    node of a benign bag is a term, every malignant bag is one). 0 (with a gradient path) when nothing applies."""
    terms, weights = [], []
    bce = nn.functional.binary_cross_entropy_with_logits
    for bag in bags:
        z = logits[torch.as_tensor(bag.nodes, dtype=torch.long, device=logits.device)]
        if bag.label == 0:
            terms.append(bce(z, torch.zeros_like(z), reduction="sum"))
            weights.append(float(len(z)))
        elif bool((z < 0).all()):  # every node predicted benign: push the most suspicious one up
            top = z.max()
            terms.append(pos_weight * bce(top, torch.ones_like(top)))
            weights.append(1.0)
        else:
            weights.append(1.0)
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).sum() / max(sum(weights), 1.0)


@dataclass
class NodeTrainConfig:
    """How the node classifier is trained."""

    epochs: int = 20
    patients_per_step: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    pos_weight: float = 10.0  # weight of a malignant bag's term (the paper: x100 on real data)
    pooling: str = "max"  # station pooling of the node probabilities
    augment: bool = True  # random flips and 90-degree in-plane rotations of the node patches, CT noise
    seed: int = 0
    device: str = "cpu"
    rules: str = DEFAULT_RULES
    threads: int | None = None  # torch threads while training (None: unchanged)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "threads"}


@dataclass
class NodeTrainingResult:
    checkpoint: Path
    best_epoch: int
    epochs_run: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = np.array(x, dtype=np.float32)
    for axis in (2, 3, 4):
        if rng.random() < 0.5:
            x = np.flip(x, axis=axis)
    k = int(rng.integers(4))
    x = np.rot90(x, k, axes=(3, 4))
    x = np.ascontiguousarray(x)
    x[:, 0] += rng.normal(0.0, 0.03, x[:, 0].shape).astype(np.float32)
    return x


def _station_predictions(network: NodeClassifier, cases: Sequence[NodeBagCase], pooling: str) -> tuple[
        np.ndarray, np.ndarray, list[np.ndarray]]:
    """Pooled (uncalibrated) station scores (P, 17, NaN without nodes), labels (P, 17), node probabilities."""
    pooled, labels, node_p = [], [], []
    for c in cases:
        p = predict_nodes(network, c.patches)
        node_p.append(p)
        pooled.append(pooled_station_scores(p, c.node_station, pooling))
        labels.append(np.where(c.present, c.station_labels, UNKNOWN))
    return np.array(pooled).reshape(-1, NUM_STATIONS), np.array(labels).reshape(-1, NUM_STATIONS), node_p


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    use = ~np.isnan(scores) & (labels >= 0)
    return float(roc_auc(labels[use] == 1, scores[use])) if use.any() else float("nan")


def train_node_classifier(train_cases: Sequence[NodeBagCase], val_cases: Sequence[NodeBagCase], out_dir: str | Path,
                          model_config: NodeClassifierConfig | None = None, config: NodeTrainConfig | None = None,
                          progress: ProgressCallback | None = None) -> NodeTrainingResult:
    """Train, select the best epoch, fit the prior, calibration and threshold; writes ``best.pt`` (+ manifest) and
    ``history.json`` to ``out_dir``. A finished ``best.pt`` of the same settings and data is reused."""
    mconfig = model_config or NodeClassifierConfig()
    tconfig = config or NodeTrainConfig()
    out = Path(out_dir)
    if not train_cases or not val_cases:
        raise UsageError("node classifier training needs training and validation patients")
    if tconfig.epochs < 1 or tconfig.patients_per_step < 1 or not tconfig.lr > 0:
        raise UsageError(f"invalid node training settings: {tconfig.to_dict()}")
    key = _key(train_cases, val_cases, mconfig, tconfig)
    best_path = out / "best.pt"
    if best_path.is_file():
        try:
            man = load_checkpoint(best_path, kinds=(NODE_CLASSIFIER_KIND,)).manifest
            if man.get("data_key") == key:
                return NodeTrainingResult(best_path, int(man.get("epoch", 0)), int(man.get("epochs_run", 0)),
                                          man.get("metrics", {}))
        except (ModelError, OSError):  # an unreadable or foreign old file is retrained
            pass
    t0 = time.perf_counter()
    device = torch.device(parse_device(tconfig.device).torch)
    torch.manual_seed(tconfig.seed)
    network = NodeClassifier(mconfig).to(device)
    opt = torch.optim.AdamW(network.parameters(), lr=tconfig.lr, weight_decay=tconfig.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tconfig.epochs)
    bags = [case_bags(c, tconfig.rules) for c in train_cases]
    usable = [i for i, b in enumerate(bags) if b]
    if not usable:
        raise UsageError("no training patient has a detected node in a station with a known label")
    c_in = mconfig.in_channels
    rng = np.random.default_rng(tconfig.seed)
    history, best = [], (-np.inf, 0, None)
    with torch_threads(tconfig.threads):
        for epoch in range(1, tconfig.epochs + 1):
            network.train()
            order = rng.permutation(usable)
            losses = []
            for s in range(0, len(order), tconfig.patients_per_step):
                opt.zero_grad()
                total = torch.zeros((), device=device)
                for i in order[s:s + tconfig.patients_per_step]:
                    x = train_cases[i].patches[:, :c_in]
                    x = _augment(x, rng) if tconfig.augment else np.asarray(x, np.float32)
                    logits = network(torch.from_numpy(x).to(device))
                    total = total + mil_loss(logits, bags[i], tconfig.pos_weight)
                total = total / len(order[s:s + tconfig.patients_per_step])
                total.backward()
                opt.step()
                losses.append(float(total.detach()))
            sched.step()
            pooled, labels, _ = _station_predictions(network, val_cases, tconfig.pooling)
            auc = _auc(pooled, labels)
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_station_auc": auc})
            if progress:
                progress(Progress(epoch, tconfig.epochs, f"node classifier epoch {epoch}/{tconfig.epochs}: loss "
                                  f"{np.mean(losses):.3f}, validation station AUC {auc:.3f}"))
            score = auc if np.isfinite(auc) else -np.inf
            if score > best[0] or best[2] is None:
                best = (score, epoch, {k: v.detach().clone() for k, v in network.state_dict().items()})
    network.load_state_dict(best[2])
    # prior from the training patients, calibration and threshold from the validation patients
    train_has = np.array([c.has_node() for c in train_cases])
    train_lab = np.array([np.where(c.present, c.station_labels, UNKNOWN) for c in train_cases])
    prior = learn_prior(train_has, train_lab)
    pooled, labels, node_p = _station_predictions(network, val_cases, tconfig.pooling)
    use = ~np.isnan(pooled)
    calibration = fit_calibration(pooled[use], labels[use])
    probs = np.array([station_scores(p, c.node_station, c.present, prior, calibration, tconfig.pooling)
                      for p, c in zip(node_p, val_cases, strict=True)])
    threshold, val_ba = tune_threshold(labels.ravel(), probs.ravel())
    metrics = {"val_station_auc": best[0], "val_balanced_accuracy": val_ba,
               "val_station_auc_with_prior": _auc(probs, labels)}
    manifest = {"kind": NODE_CLASSIFIER_KIND, "model_config": mconfig.to_dict(), "epoch": best[1],
                "epochs_run": tconfig.epochs, "training": tconfig.to_dict(), "data_key": key,
                "calibrated": True, "calibration": calibration.to_dict(), "prior": prior.tolist(),
                "pooling": tconfig.pooling, "threshold": threshold, "metrics": metrics,
                "data": {"train_patients": len(train_cases), "val_patients": len(val_cases),
                         "train_nodes": int(sum(c.n_nodes for c in train_cases))}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "history.json", history)
    save_checkpoint(best_path, network.cpu(), manifest)
    return NodeTrainingResult(best_path, best[1], tconfig.epochs, metrics, time.perf_counter() - t0)


def _key(train_cases, val_cases, mconfig: NodeClassifierConfig, tconfig: NodeTrainConfig) -> str:
    import hashlib

    def digest(cases):
        h = hashlib.sha256()
        for c in cases:
            h.update(json.dumps([c.patient_id, c.station_labels.tolist(), int(c.n_stage), c.side,
                                 c.node_station.tolist()]).encode())
            h.update(np.ascontiguousarray(c.patches).tobytes()[:4096])  # with the ids, labels and stations above
        return h.hexdigest()

    blob = json.dumps([digest(train_cases), digest(val_cases), mconfig.to_dict(), tconfig.to_dict()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
