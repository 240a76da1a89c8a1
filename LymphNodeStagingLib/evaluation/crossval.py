"""Cross-validated evaluation of the methods on a cohort: training per fold, test predictions, metrics, tests, report.

Methods: ``ts1`` (station classifier; N-stage from the rules), ``ts2`` and ``ts3`` (staging head; warm-started from
the TS1 model of the same fold, TS3 with the station classifier frozen), ``threshold`` (SUVmax in the fused station
map, t chosen on the fold's training and validation patients) and ``lesion`` (lesion-mask overlap, the cohort's
lesion_path). Ablations, each a method of its own: ``centroid`` (TS1 trained on fixed centroid patches instead of
centres drawn from the weight map), ``no-pseudo`` (TS2 without the pseudo-label loss), ``rules`` (TS1's station
decisions staged with the other rule set), ``atlases=K`` (TS1 on station maps from the first K atlases) and the
station-classifier variants ``mil-max``, ``mil-noisy-or``, ``mil-attention`` (multiple-instance learning over K
patches per station, K = ``mil_instances``), ``hybrid`` (SUVmax, SUVpeak and volume enter the final layer) and
``batchnorm`` (batch instead of instance normalisation, so that the network keeps absolute SUV levels); variants
combine with ``+``, e.g. ``mil-attention+hybrid``. A multiple-instance TS1 trains on batch_size // K bags, so
that every method sees the same number of patches per step. ``model`` options (the same keys) apply to every learned
method, the variants on top.

Layout of the output folder::

    split.json, split.csv          the patient-level split (written once, reused by every later run)
    folds/fold<k>/<method>/        checkpoints of the trained methods and predictions.json (test patients)
    report.md, report.json         the tables (methods x metrics, mean +- sd over folds), CIs and tests
    figures/                       confusion matrices per method and a summary chart

Every step is resumable: a finished training or prediction file of the same settings is reused, so an interrupted
run continues where it stopped and a second method added later trains only what is new. Stations absent from a
scan's fused map count as predicted negative (score 0) for every method, so that the methods are compared on the
same stations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io.files import write_json
from ..runtime import Progress, ProgressCallback, parse_device, progress_part, reporter
from ..staging.rules import DEFAULT_RULES, UNKNOWN, available_rule_sets, load_rules, parse_n_stage
from ..staging.stations import NUM_STATIONS
from .node_methods import NODE_SUVMAX, SHORT_AXIS_MM

log = logging.getLogger(__name__)

BASE_METHODS: tuple[str, ...] = ("ts1", "ts2", "ts3", "threshold", "lesion", "nodes-mil", "fusion", "short-axis",
                                  "node-suvmax", "node-combined")
#: Methods that need the PET (left out of a CT-only run) and those that read the detected nodes.
PET_METHODS: tuple[str, ...] = ("threshold", "lesion", "node-suvmax", "node-combined")
NODE_KINDS: tuple[str, ...] = ("nodes-mil", "fusion", "node-rule")
MODALITIES: tuple[str, ...] = ("petct", "ct")
ABLATIONS: tuple[str, ...] = ("centroid", "no-pseudo", "rules", "atlases=K", "mil-max", "mil-noisy-or",
                              "mil-attention", "hybrid", "batchnorm")
#: Station-classifier variants (ModelConfig options), combinable with "+".
VARIANTS: dict[str, dict] = {"mil-max": {"pooling": "max"}, "mil-noisy-or": {"pooling": "noisy_or"},
                             "mil-attention": {"pooling": "attention"}, "hybrid": {"hybrid": True},
                             "batchnorm": {"norm": "batch"}}
PREDICTIONS_VERSION = 3


@dataclass
class EvaluationConfig:
    """What to evaluate and how to train. Training defaults follow the paper; shorten them for quick runs."""

    folds: int = 5
    seed: int = 0
    val_fraction: float = 0.25
    methods: tuple[str, ...] = ("ts1", "threshold")
    ablations: tuple[str, ...] = ()
    reference: str = "labels"  # "labels" (the cohort's) or "truth" (true_n_stage / true_positive_stations columns)
    rules: str = DEFAULT_RULES
    epochs: int = 150
    ts23_epochs: int | None = None  # TS2/TS3 epochs (None: epochs)
    batch_size: int | None = None
    max_steps_per_epoch: int | None = None
    ts23_batch_size: int | None = None  # TS2/TS3: patients per batch (None: batch_size, else the default)
    ts23_max_steps: int | None = None  # TS2/TS3 steps per epoch (None: max_steps_per_epoch)
    augment: bool = True
    lr: float = 5e-4
    small: bool = False
    patch_spacing: float | None = None
    device: str = "cpu"
    pet_is_suv: bool | str | None = None
    n_boot: int = 1000
    n_permutations: int = 10000
    suv_thresholds: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5)
    overlap_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    model: dict = field(default_factory=dict)  # ModelConfig options of every learned method (instances, ...)
    mil_instances: int = 4  # K of the mil-* variants
    modalities: tuple[str, ...] = ("petct",)  # "petct" and/or "ct" (CT-only: learned methods without the PET)
    node_model: str | None = None  # node segmentation checkpoint of the node methods (None: the bundled one)
    node_epochs: int = 20
    node_patch_spacing: float = 2.0  # mm; node patches are 32 mm cubes
    node_pos_weight: float = 10.0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.ablations = tuple(self.ablations)
        self.modalities = tuple(self.modalities)
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise UsageError(f"--modality must be petct, ct or both, got {','.join(self.modalities)!r}")
        if self.reference not in ("labels", "truth"):
            raise UsageError(f"reference must be 'labels' or 'truth', got {self.reference!r}")
        for m in self.methods:
            if m not in BASE_METHODS:
                raise UsageError(f"--strategy {m!r} is not one of {', '.join(BASE_METHODS)}")
        for a in self.ablations:
            if a not in ("centroid", "no-pseudo", "rules") and not _atlas_count(a):
                variant_options(a, self.mil_instances)
        from ..classifier.model import ModelConfig

        ModelConfig(**self.model)  # unknown keys or values: a usage error now, not after the first fold
        self.device = parse_device(self.device).torch

    def training_dict(self) -> dict:
        keys = ("epochs", "ts23_epochs", "batch_size", "max_steps_per_epoch", "ts23_batch_size", "ts23_max_steps",
                "augment", "lr", "small", "patch_spacing", "seed", "model")
        return {k: getattr(self, k) for k in keys}

    def node_training_dict(self) -> dict:
        return {"node_epochs": self.node_epochs, "node_patch_spacing": self.node_patch_spacing,
                "node_pos_weight": self.node_pos_weight, "seed": self.seed, "node_model": self.node_model}


def variant_options(ablation: str, instances: int = 4) -> dict:
    """ModelConfig options of a station-classifier variant such as ``mil-attention+hybrid``."""
    options: dict = {}
    for part in ablation.split("+"):
        if part not in VARIANTS:
            raise UsageError(f"--ablation {ablation!r}: {part!r} is not one of {', '.join(ABLATIONS)} "
                             "(K a number >= 1; variants combine with '+')")
        options.update(VARIANTS[part])
        if part.startswith("mil-"):
            options["instances"] = int(instances)
    return options


def _atlas_count(ablation: str) -> int | None:
    if ablation.startswith("atlases="):
        try:
            k = int(ablation.split("=", 1)[1])
        except ValueError:
            return None
        return k if k >= 1 else None
    return None


#: Methods whose station score is not a probability (SUVmax, lesion overlap, node rules): no calibration metrics.
SCORE_KINDS = ("threshold", "lesion", "node-rule")


@dataclass
class MethodSpec:
    """One row of the report: how its predictions are made."""

    name: str
    kind: str  # ts1 | ts2 | ts3 | threshold | lesion | restage | nodes-mil | fusion | node-rule
    sampling: str = "weight_map"
    pseudo_loss: bool = True
    rules: str = DEFAULT_RULES
    atlases: int | None = None  # first K atlases of the set (None: all)
    depends_on: str | None = None  # the method whose model (init) or predictions (restage) it uses
    model: dict = field(default_factory=dict)  # ModelConfig options on top of the run's
    modality: str = "petct"  # "ct": trained and predicted without the PET
    node_rule: str | None = None  # kind node-rule: short-axis | node-suvmax | node-combined
    fusion_of: tuple[str, str] | None = None  # kind fusion: (station CNN method, node classifier method)

    def key(self, config: EvaluationConfig) -> dict:
        d = asdict(self)
        if self.kind in ("ts1", "ts2", "ts3", "fusion"):
            d["training"] = config.training_dict()
        if self.kind in ("nodes-mil", "fusion", "node-rule"):
            d["nodes"] = config.node_training_dict()
        if self.kind == "threshold":
            d["candidates"] = list(config.suv_thresholds)
        elif self.kind == "lesion":
            d["candidates"] = list(config.overlap_thresholds)
        return d


def method_specs(config: EvaluationConfig) -> list[MethodSpec]:
    """The methods of a run in report order (dependencies first): requested methods per modality, then ablations.

    In a CT-only run (modality "ct") the learned methods are named with "-ct" (ts1-ct, nodes-mil-ct, fusion-ct) and
    the methods that need the PET are left out; ``short-axis`` reads the CT in either modality and appears once."""
    rules = config.rules
    specs: dict[str, MethodSpec] = {}
    for modality in config.modalities:
        suffix = "" if modality == "petct" else "-ct"
        ct_only = {"in_channels": 1, "hybrid": False} if modality == "ct" else {}
        methods = [m for m in config.methods if modality == "petct" or m not in PET_METHODS]
        ts1 = f"ts1{suffix}"
        needs_ts1 = any(m in ("ts1", "ts2", "ts3", "fusion") for m in methods)
        if needs_ts1:
            specs[ts1] = MethodSpec(ts1, "ts1", rules=rules, model=dict(ct_only), modality=modality)
        if "fusion" in methods and "nodes-mil" not in methods:
            methods.insert(methods.index("fusion"), "nodes-mil")
        for m in methods:
            name = f"{m}{suffix}"
            if m in ("ts2", "ts3"):
                specs[name] = MethodSpec(name, m, rules=rules, depends_on=ts1, model=dict(ct_only), modality=modality)
            elif m in ("threshold", "lesion"):
                specs[m] = MethodSpec(m, m, rules=rules)
            elif m == "nodes-mil":
                specs[name] = MethodSpec(name, "nodes-mil", rules=rules, modality=modality)
            elif m == "fusion":
                specs[name] = MethodSpec(name, "fusion", rules=rules, modality=modality,
                                         fusion_of=(ts1, f"nodes-mil{suffix}"))
            elif m == "short-axis":
                specs[m] = MethodSpec(m, "node-rule", rules=rules, modality="ct", node_rule=m)
            elif m in ("node-suvmax", "node-combined"):
                specs[m] = MethodSpec(m, "node-rule", rules=rules, node_rule=m)
    for a in config.ablations:
        if a in ("no-pseudo", "rules") and "ts1" not in specs:
            specs["ts1"] = MethodSpec("ts1", "ts1", rules=rules)
        if a == "centroid":
            specs["ts1-centroid"] = MethodSpec("ts1-centroid", "ts1", sampling="centroid", rules=rules)
        elif a == "no-pseudo":
            specs["ts2-no-pseudo"] = MethodSpec("ts2-no-pseudo", "ts2", pseudo_loss=False, rules=rules,
                                                depends_on="ts1")
        elif a == "rules":
            other = next(r for r in available_rule_sets() if r != rules)
            specs[f"ts1-{other}"] = MethodSpec(f"ts1-{other}", "restage", rules=other, depends_on="ts1")
        elif not _atlas_count(a):
            specs[f"ts1-{a}"] = MethodSpec(f"ts1-{a}", "ts1", rules=rules,
                                           model=variant_options(a, config.mil_instances))
        else:
            k = _atlas_count(a)
            specs[f"ts1-atlases{k}"] = MethodSpec(f"ts1-atlases{k}", "ts1", rules=rules, atlases=k)
    return list(specs.values())


# ----------------------------------------------------------------------------------------------------------------
# Cases


@dataclass
class EvalCase:
    """A scan ready for every method: the training sample, reference labels and the baseline features."""

    row: object  # cohort.CohortRow
    sample: object  # training.CaseSample (cohort labels, used for training)
    ref_labels: np.ndarray  # (17,) reference station labels (1/0/-1)
    ref_n: int  # reference N-stage (0..3, -1 unknown)
    suv_max: np.ndarray  # (17,) SUVmax per station, NaN where absent (also column 0 of sample.features)
    lesions: object | None  # baselines.LesionOverlap, None without a lesion mask
    nodes: object | None = None  # training.node_cases.NodeEvalData: the detected nodes (node methods only)

    @property
    def patient_id(self) -> str:
        return self.row.patient_id

    @property
    def scan_id(self) -> str:
        return self.row.scan_id


def reference_labels(row, reference: str) -> tuple[np.ndarray, int]:
    """Station labels (17,) and N-stage of a row: the cohort's labels, or its truth columns (phantom cohorts)."""
    if reference == "labels":
        return row.station_labels(), (row.n_stage if row.n_stage is not None else UNKNOWN)
    n_text = row.extra.get("true_n_stage", "").strip()
    if not n_text:
        raise UsageError(f"line {row.line} ({row.scan_id}): --reference truth needs the columns true_n_stage "
                         "and true_positive_stations (written by `lnstaging phantom`)")
    from ..staging.stations import parse_station_list

    labels = np.zeros(NUM_STATIONS, dtype=np.int64)
    for st in parse_station_list(row.extra.get("true_positive_stations", "")):
        labels[st.index] = 1
    return labels, parse_n_stage(n_text)


def prepare_cases(rows: Sequence, atlas_set, cache_dir: Path | None, config: EvaluationConfig, need_lesions: bool,
                  progress: ProgressCallback | None = None, nodes: tuple | None = None) -> list[EvalCase]:
    """Images, cached station maps, samplers and baseline features of every row; with ``nodes`` = (node model,
    node cache folder, cohort folder) also the detected nodes (``training.node_cases.prepare_node_data``)."""
    from ..training.cases import prepare_case
    from ..training.loops import CaseSample
    from .baselines import lesion_overlap

    out = []
    for i, row in enumerate(rows):
        if progress:
            progress(Progress(i, max(len(rows), 1), f"preparing {row.scan_id} ({i + 1}/{len(rows)})"))
        prep = prepare_case(row, atlas_set, cache_dir, device=config.device, pet_is_suv=config.pet_is_suv)
        labels = row.station_labels()
        features = prep.station_features()
        sample = CaseSample(patient_id=row.patient_id, ct=prep.ct, pet=prep.pet, sampler=prep.sampler,
                            side=row.tumour_side, n_stage=row.n_stage if row.n_stage is not None else UNKNOWN,
                            station_labels=labels, study=row.study, features=features)
        lesions = None
        if need_lesions:
            if row.lesion_path is None:
                raise UsageError(f"line {row.line} ({row.scan_id}): the lesion baseline needs lesion_path")
            import SimpleITK as sitk

            from ..io.images import read_image_file

            lesions = lesion_overlap(read_image_file(row.lesion_path, sitk.sitkUInt8), prep.station_map)
        ref_labels, ref_n = reference_labels(row, config.reference)
        node_data = None
        if nodes is not None:
            from ..training.node_cases import prepare_node_data

            node_data = prepare_node_data(row, prep, nodes[0], nodes[1], nodes[2],
                                          patch_spacing=config.node_patch_spacing, device=config.device)
        out.append(EvalCase(row, sample.cropped(), ref_labels, ref_n, features[:, 0].astype(float), lesions,
                            node_data))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Predictions


@dataclass
class FoldPredictions:
    """A method's predictions on the test scans of one fold (reference labels are attached at evaluation)."""

    method: str
    fold: int
    scan_ids: list[str]
    station_score: np.ndarray  # (S, 17): probability (or SUVmax / overlap for the baselines); 0 where absent
    station_pred: np.ndarray  # (S, 17) bool
    n_pred: np.ndarray  # (S,)
    n_prob: np.ndarray | None  # (S, 4) for TS2/TS3
    params: dict = field(default_factory=dict)  # chosen threshold / cut-off, training summary
    seconds: float = 0.0
    node_score: list[np.ndarray] | None = None  # per scan, a score for every detected node (node methods' runs)

    def to_dict(self) -> dict:
        return {"method": self.method, "fold": self.fold, "scan_ids": self.scan_ids,
                "station_score": self.station_score.tolist(), "station_pred": self.station_pred.astype(int).tolist(),
                "n_pred": self.n_pred.astype(int).tolist(),
                "n_prob": None if self.n_prob is None else self.n_prob.tolist(), "params": self.params,
                "seconds": self.seconds,
                "node_score": None if self.node_score is None else [np.asarray(a, float).tolist()
                                                                    for a in self.node_score]}

    @classmethod
    def from_dict(cls, d: dict) -> FoldPredictions:
        ns = d.get("node_score")
        return cls(d["method"], int(d["fold"]), list(d["scan_ids"]), np.asarray(d["station_score"], float),
                   np.asarray(d["station_pred"], bool), np.asarray(d["n_pred"], int),
                   None if d["n_prob"] is None else np.asarray(d["n_prob"], float), d.get("params", {}),
                   float(d.get("seconds", 0.0)), None if ns is None else [np.asarray(a, float) for a in ns])


def _stage(rules_name: str, decisions: np.ndarray, sides: Sequence[str]) -> np.ndarray:
    return load_rules(rules_name).stage_rows(decisions, sides).astype(int)


def _rule_stage_fn(rules_name: str, sides: dict[str, str]):
    """metrics' stage_fn for methods whose N-stage is the rules applied to the station decisions."""
    rs = load_rules(rules_name)
    return lambda pid, decisions: int(rs.stage_array(decisions, sides[pid]))


def _staged_rows(cohort_csv: str | Path, rules: str) -> list:
    """The valid rows of a cohort that have an N-stage and a tumour side (what every evaluation uses)."""
    from ..cohort.table import read_cohort

    cohort = read_cohort(cohort_csv, rules=rules).require_valid()
    rows = [r for r in cohort.usable_rows() if r.n_stage is not None and r.tumour_side]
    if not rows:
        raise UsageError(f"cohort {cohort_csv}: no row with an N-stage and a tumour side")
    return rows


def _labels_scores(cases: Sequence[EvalCase], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training labels (the cohort's) and scores of the given cases, flattened."""
    return np.stack([c.sample.station_labels for c in cases]).ravel(), scores.ravel()


def predict_threshold(spec: MethodSpec, fit: Sequence[EvalCase], test: Sequence[EvalCase],
                      config: EvaluationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    from ..classifier.metrics import tune_threshold

    fit_scores = np.nan_to_num(np.stack([c.suv_max for c in fit]), nan=0.0)
    t, ba = tune_threshold(*_labels_scores(fit, fit_scores), config.suv_thresholds,
                           prefer=min(config.suv_thresholds))
    score = np.nan_to_num(np.stack([c.suv_max for c in test]), nan=0.0)
    pred = score >= t
    return score, pred, _stage(spec.rules, pred, [c.sample.side for c in test]), {
        "suv_threshold": t, "train_balanced_accuracy": ba}


def predict_lesion(spec: MethodSpec, fit: Sequence[EvalCase], test: Sequence[EvalCase],
                   config: EvaluationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    from ..classifier.metrics import tune_threshold

    fit_scores = np.stack([c.lesions.station_scores() for c in fit])
    o, ba = tune_threshold(*_labels_scores(fit, fit_scores), config.overlap_thresholds,
                           prefer=min(config.overlap_thresholds))
    score = np.stack([c.lesions.station_scores() for c in test])
    pred = score >= o
    return score, pred, _stage(spec.rules, pred, [c.sample.side for c in test]), {
        "overlap_threshold": o, "train_balanced_accuracy": ba}


def _train_method(spec: MethodSpec, fold_dir: Path, train: Sequence[EvalCase], val: Sequence[EvalCase],
                  config: EvaluationConfig, progress: ProgressCallback | None):
    from ..classifier.model import ModelConfig
    from ..training.loops import TrainConfig
    from ..training.loops import train as train_model
    from ..training.losses import LossWeights

    options = {**config.model, **spec.model, "rules": spec.rules}
    mconfig = ModelConfig.small(32, **options) if config.small else ModelConfig(**options)
    from ..training.loops import AugmentConfig

    ts23 = spec.kind in ("ts2", "ts3")
    epochs = config.ts23_epochs if (ts23 and config.ts23_epochs) else config.epochs
    batch = (config.ts23_batch_size or config.batch_size) if ts23 else config.batch_size
    steps = (config.ts23_max_steps or config.max_steps_per_epoch) if ts23 else config.max_steps_per_epoch
    if mconfig.instances > 1 and not ts23:  # bags of K: the same number of patches per step as one-patch TS1
        batch = max(1, (batch or 64) // mconfig.instances)
    tconfig = TrainConfig(epochs=epochs, batch_size=batch, lr=config.lr, seed=config.seed,
                          sampling=spec.sampling, loss=LossWeights() if spec.pseudo_loss else LossWeights(pseudo=0.0),
                          rules=spec.rules, device=config.device, max_steps_per_epoch=steps,
                          patch_spacing=config.patch_spacing, augment=AugmentConfig(enabled=config.augment))
    init = fold_dir / spec.depends_on / "best.pt" if spec.depends_on else None
    return train_model(spec.kind, [c.sample for c in train], [c.sample for c in val], fold_dir / spec.name,
                       mconfig, tconfig, init=init, progress=progress)


def predict_model(checkpoint: Path, test: Sequence[EvalCase], rules_name: str | None = None,
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """Station probabilities, decisions (at the checkpoint's threshold), N-stage and stage probabilities of the
    test cases from a TS1 (N from the rules) or TS2/TS3 checkpoint (N from the head, or from the rules when the
    checkpoint's ``n_stage_from`` says so), with the deterministic patches (bags) of inference."""
    import torch

    from ..classifier.calibration import calibration_of
    from ..classifier.checkpoint import load_model
    from ..classifier.model import StagingModel, predict_stations, station_classifier_of
    from ..training.loops import SIDE_INDEX, case_patches

    model, manifest = load_model(checkpoint, device=device)
    clf = station_classifier_of(model)
    size, spacing = clf.config.patch_size, clf.config.patch_spacing
    if not clf.config.uses_pet:
        test = [dataclasses.replace(c, sample=c.sample.without_pet()) for c in test]
    thr = float(manifest.get("threshold", 0.5))
    probs = np.zeros((len(test), NUM_STATIONS))
    n_prob = np.zeros((len(test), 4)) if isinstance(model, StagingModel) else None
    for i, c in enumerate(test):
        present = c.sample.present
        idx = np.flatnonzero(present)
        if not idx.size:
            continue
        patches = case_patches(c.sample, idx.tolist(), None, size, spacing, instances=clf.config.instances)
        if n_prob is None:
            probs[i, idx] = predict_stations(model, patches, idx, features=c.sample.station_features(idx))
        else:
            full = np.zeros((NUM_STATIONS, *patches.shape[1:]), dtype=np.float32)
            full[idx] = patches
            dev = next(model.parameters()).device
            feats = torch.from_numpy(c.sample.station_features(range(NUM_STATIONS)))[None].to(dev)
            with torch.no_grad():
                out = model(torch.from_numpy(full)[None].to(dev),
                            torch.tensor([SIDE_INDEX[c.sample.side]], device=dev),
                            torch.from_numpy(present)[None].to(dev), feats)
            probs[i, idx] = out.station_probs[0].cpu().numpy()[idx]
            n_prob[i] = torch.softmax(out.n_logits[0], 0).cpu().numpy()
    calibration = calibration_of(manifest, f"checkpoint {checkpoint}")
    probs = calibration.apply(probs)
    pred = probs >= thr
    n_from = "rules" if n_prob is None else manifest.get("n_stage_from", "head")
    if n_from == "rules":
        n_pred = _stage(rules_name or manifest.get("rules") or DEFAULT_RULES, pred, [c.sample.side for c in test])
        n_prob = None
    else:
        n_pred = n_prob.argmax(axis=1)
    return probs, pred, n_pred, n_prob, {"threshold": thr, "epoch": manifest.get("epoch"), "n_stage_from": n_from,
                                         "validation": manifest.get("metrics", {}), "calibration": calibration.method}


def _train_nodes_mil(spec: MethodSpec, fold_dir: Path, train: Sequence[EvalCase], val: Sequence[EvalCase],
                     config: EvaluationConfig, progress: ProgressCallback | None):
    from ..nodes.malignancy import NodeClassifierConfig
    from ..training.node_mil import NodeTrainConfig, train_node_classifier

    mconfig = NodeClassifierConfig(modality=spec.modality, patch_spacing=config.node_patch_spacing)
    tconfig = NodeTrainConfig(epochs=config.node_epochs, pos_weight=config.node_pos_weight, seed=config.seed,
                              device=config.device, rules=spec.rules)
    return train_node_classifier([c.nodes.bag for c in train], [c.nodes.bag for c in val], fold_dir / spec.name,
                                 mconfig, tconfig, progress)


def _thresholds(val: Sequence[EvalCase], val_scores: np.ndarray, rules: str) -> dict:
    """The operating thresholds of a probability method, both tuned on the validation patients: ``threshold`` for
    the N-stage (the rules applied to the station decisions, as TS1's checkpoint threshold) and ``station_threshold``
    for the station balanced accuracy (reported beside, see ``station_operating_points``)."""
    from ..classifier.metrics import tune_threshold
    from ..training.loops import tune_stage_threshold

    scores = np.nan_to_num(np.asarray(val_scores, float), nan=0.0)
    stage_t, _ = tune_stage_threshold([c.sample for c in val], scores, load_rules(rules))
    labels = np.array([np.where(c.sample.present, c.sample.station_labels, UNKNOWN) for c in val])
    return {"threshold": stage_t, "station_threshold": tune_threshold(labels.ravel(), scores.ravel())[0]}


def predict_nodes_mil(spec: MethodSpec, fold_dir: Path, cases: dict[str, Sequence[EvalCase]], config: EvaluationConfig,
                      progress: ProgressCallback | None) -> tuple:
    from ..nodes.malignancy import load_node_classifier
    from .node_methods import node_classifier_predictions

    result = _train_nodes_mil(spec, fold_dir, cases["train"], cases["validation"], config, progress)
    test, val = cases["test"], cases["validation"]
    model = load_node_classifier(result.checkpoint, config.device)
    probs, node_p = node_classifier_predictions(model, test)
    thresholds = _thresholds(val, node_classifier_predictions(model, val)[0], spec.rules)
    pred = probs >= thresholds["threshold"]
    params = {**thresholds, "calibration": model.calibration.method, "pooling": model.pooling,
              "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "validation": result.metrics}
    return probs, pred, _stage(spec.rules, pred, [c.sample.side for c in test]), node_p, params


def predict_fusion(spec: MethodSpec, fold_dir: Path, cases: dict[str, Sequence[EvalCase]], config: EvaluationConfig,
                   done: dict[str, FoldPredictions]) -> tuple:
    """The logistic fusion of the station CNN, the node classifier and the nodes' measurements (largest short axis;
    largest node SUVmax with the PET) of the same fold, fitted on the validation patients' predictions."""
    from ..nodes.fusion import fit_fusion
    from ..nodes.malignancy import load_node_classifier
    from .node_methods import node_classifier_predictions

    pet = spec.modality == "petct"

    def measurements(group: Sequence[EvalCase]) -> dict:
        return {"short_axis": np.array([c.nodes.station_max(c.nodes.short_axis_mm) for c in group]),
                "suv_max": np.array([c.nodes.station_max(c.nodes.suv_max) for c in group]) if pet else None}

    cnn, nod = spec.fusion_of
    val, test = cases["validation"], cases["test"]
    p_cnn_val = predict_model(fold_dir / cnn / "best.pt", val, spec.rules, config.device)[0]
    p_nod_val = node_classifier_predictions(load_node_classifier(fold_dir / nod / "best.pt", config.device), val)[0]
    has_val = np.array([c.nodes.bag.has_node() for c in val])
    labels = np.array([np.where(c.sample.present, c.sample.station_labels, UNKNOWN) for c in val])
    measured_val = measurements(val)
    fusion = fit_fusion(p_cnn_val, p_nod_val, has_val, labels, **measured_val)
    present_val = np.array([c.sample.present for c in val])
    fused_val = fusion.predict(p_cnn_val, p_nod_val, has_val, **measured_val) * present_val
    thresholds = _thresholds(val, fused_val, spec.rules)
    present = np.array([c.sample.present for c in test])
    has = np.array([c.nodes.bag.has_node() for c in test])
    p_cnn, p_nod = done[cnn].station_score, done[nod].station_score
    fused = fusion.predict(p_cnn, p_nod, has, **measurements(test)) * present
    pred = (fused >= thresholds["threshold"]) & present
    node_scores = []
    for i, c in enumerate(test):  # a node: its station's CNN probability, its own probability and measurements
        st = c.nodes.bag.node_station
        own = np.asarray(done[nod].node_score[i], float)
        cnn_of_node = np.where(st >= 0, p_cnn[i][np.clip(st, 0, None)], 0.0)
        node_scores.append(fusion.predict(cnn_of_node, own, np.ones(len(own)), c.nodes.short_axis_mm,
                                          c.nodes.suv_max if pet else None) if len(own) else own)
    return fused, pred, _stage(spec.rules, pred, [c.sample.side for c in test]), node_scores, {
        "fusion": fusion.to_dict(), **thresholds}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fold_method(spec: MethodSpec, fold: int, fold_dir: Path, cases: dict[str, Sequence[EvalCase]],
                    config: EvaluationConfig, split_fp: str, done: dict[str, FoldPredictions],
                    progress: ProgressCallback | None = None) -> FoldPredictions:
    """Train (if needed) and predict one method on one fold; reuses predictions.json of the same settings."""
    pred_file = fold_dir / spec.name / "predictions.json"
    key = _digest({"spec": spec.key(config), "split": split_fp, "fold": fold, "version": PREDICTIONS_VERSION,
                   "test": [c.scan_id for c in cases["test"]]})
    if pred_file.is_file():
        data = json.loads(pred_file.read_text())
        if data.get("key") == key:
            return FoldPredictions.from_dict(data)
    t0 = time.perf_counter()
    test = cases["test"]
    n_prob, node_score = None, None
    if spec.kind == "threshold":
        score, pred, n_pred, params = predict_threshold(spec, [*cases["train"], *cases["validation"]], test, config)
        params["station_threshold"] = params["suv_threshold"]
    elif spec.kind == "lesion":
        score, pred, n_pred, params = predict_lesion(spec, [*cases["train"], *cases["validation"]], test, config)
    elif spec.kind == "restage":
        base = done[spec.depends_on]
        score, pred = base.station_score, base.station_pred
        n_pred = _stage(spec.rules, pred, [c.sample.side for c in test])
        params = {"restaged_from": spec.depends_on, **base.params}
    elif spec.kind == "node-rule":
        from .node_methods import predict_node_rule

        score, pred, node_score, params = predict_node_rule(spec.node_rule, test)
        params["station_threshold"] = {"short-axis": SHORT_AXIS_MM, "node-suvmax": NODE_SUVMAX}.get(spec.node_rule, 1.0)
        n_pred = _stage(spec.rules, pred, [c.sample.side for c in test])
    elif spec.kind == "nodes-mil":
        score, pred, n_pred, node_score, params = predict_nodes_mil(spec, fold_dir, cases, config, progress)
    elif spec.kind == "fusion":
        score, pred, n_pred, node_score, params = predict_fusion(spec, fold_dir, cases, config, done)
    else:
        result = _train_method(spec, fold_dir, cases["train"], cases["validation"], config, progress)
        score, pred, n_pred, n_prob, params = predict_model(result.checkpoint, test, spec.rules, config.device)
        val_scores = predict_model(result.checkpoint, cases["validation"], spec.rules, config.device)[0]
        params.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch,
                      station_threshold=_thresholds(cases["validation"], val_scores, spec.rules)["station_threshold"])
    if node_score is None and test and all(c.nodes is not None for c in test):
        node_score = [c.nodes.node_scores_of(score[i]) for i, c in enumerate(test)]  # a station method's nodes
    fp = FoldPredictions(spec.name, fold, [c.scan_id for c in test], score, pred, n_pred, n_prob, params,
                         round(time.perf_counter() - t0, 2), node_score)
    write_json(pred_file, {"key": key, **fp.to_dict()})
    return fp


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class EvaluationRun:
    """What ``run_evaluation`` returns: per-method results, comparisons, the files written."""

    out_dir: Path
    methods: list[str]
    results: dict  # method -> metrics.MethodEvaluation
    comparisons: list  # stat_tests.Comparison
    predictions: dict[str, list[FoldPredictions]]
    files: dict[str, Path]
    seconds: float
    n_patients: int
    n_scans: int
    calibration: dict = field(default_factory=dict)  # method -> metrics.calibration_summary (probability methods)
    node_level: dict = field(default_factory=dict)  # method -> node-level AUC against the node truth (node runs)
    station_points: dict = field(default_factory=dict)  # method -> station_operating_points

    def to_frame(self, level: str = "patient"):
        """Methods x metrics (mean and sd over the folds) at ``level`` ("patient" or "scan") as a pandas DataFrame:
        the numbers of the report's main table."""
        import pandas as pd

        rows = {}
        for m, r in self.results.items():
            row = {}
            for k, v in r.summary[level].items():
                d = v.to_dict()
                row[f"{k}_mean"], row[f"{k}_sd"] = d.get("mean"), d.get("sd")
            rows[m] = row
        return pd.DataFrame.from_dict(rows, orient="index")

    def to_dict(self) -> dict:
        return {"out": str(self.out_dir), "methods": self.methods, "patients": self.n_patients,
                "scans": self.n_scans, "seconds": round(self.seconds, 1),
                "summary": {m: {k: v.to_dict() for k, v in r.summary["patient"].items()}
                            for m, r in self.results.items()},
                "comparisons": [c.to_dict() for c in self.comparisons],
                "calibration": {m: {k: v for k, v in c.items() if k != "curve"} for m, c in self.calibration.items()},
                "node_level": self.node_level, "station_operating_points": self.station_points,
                "files": {k: str(v) for k, v in self.files.items()}}


def station_operating_points(predictions: dict[str, list[FoldPredictions]],
                             cases_by_scan: dict[str, EvalCase]) -> dict:
    """Per method with a ``station_threshold`` (tuned for the station balanced accuracy; the clinic's cut-offs for the
    node rules): the test stations' balanced accuracy at that threshold, all folds pooled and mean +- sd over folds.
    The main table's decisions use each method's operating threshold (for the learned methods the one tuned for the
    N-stage); this is the station-level operating point beside it."""
    from ..classifier.metrics import balanced_accuracy
    from .metrics import mean_sd

    out = {}
    for method, folds in predictions.items():
        if not folds or any(fp.params.get("station_threshold") is None for fp in folds):
            continue
        ys, ps, per_fold = [], [], []
        for fp in folds:
            y = np.stack([cases_by_scan[sid].ref_labels for sid in fp.scan_ids])
            known = y != UNKNOWN
            pred = np.asarray(fp.station_score, float) >= float(fp.params["station_threshold"])
            per_fold.append(balanced_accuracy(y[known], pred[known]))
            ys.append(y[known])
            ps.append(pred[known])
        out[method] = {"balanced_accuracy": balanced_accuracy(np.concatenate(ys), np.concatenate(ps)),
                       "folds": mean_sd(per_fold).to_dict(),
                       "thresholds": [float(fp.params["station_threshold"]) for fp in folds]}
    return out


def node_level(predictions: dict[str, list[FoldPredictions]], cases_by_scan: dict[str, EvalCase]) -> dict:
    """Per method: ROC AUC of the detected nodes' scores against the node truth, all folds pooled and mean +- sd
    over folds (scans without node truth left out)."""
    from .metrics import mean_sd
    from .node_methods import node_auc

    out = {}
    for method, folds in predictions.items():
        if any(fp.node_score is None for fp in folds):
            continue
        scores, truth, per_fold = [], [], []
        for fp in folds:
            t = [cases_by_scan[sid].nodes.truth for sid in fp.scan_ids]
            per_fold.append(node_auc(fp.node_score, t)[0])
            scores += list(fp.node_score)
            truth += t
        auc, n_mal, n_ben = node_auc(scores, truth)
        if n_mal + n_ben == 0:
            continue
        out[method] = {"auc": auc, "folds": mean_sd(per_fold).to_dict(), "malignant_nodes": n_mal,
                       "benign_nodes": n_ben}
    return out


def scan_predictions(preds: Sequence[FoldPredictions], cases_by_scan: dict[str, EvalCase]) -> list:
    """metrics.ScanPrediction for every test scan of every fold (reference labels attached)."""
    from .metrics import ScanPrediction

    out = []
    for fp in preds:
        for i, sid in enumerate(fp.scan_ids):
            c = cases_by_scan[sid]
            if c.ref_n == UNKNOWN:
                continue
            out.append(ScanPrediction(c.patient_id, sid, c.ref_labels, fp.station_score[i], c.ref_n,
                                      int(fp.n_pred[i]), station_pred=fp.station_pred[i],
                                      n_prob=None if fp.n_prob is None else fp.n_prob[i], fold=fp.fold))
    return out


def run_evaluation(cohort_csv: str | Path, out_dir: str | Path, config: EvaluationConfig | None = None, *,
                   atlases=None, cache_dir: str | Path | None = None,
                   progress: ProgressCallback | None = None) -> EvaluationRun:
    """Cross-validate the configured methods on a cohort and write the report (see the module docstring)."""
    from ..cohort.splits import load_or_make_split, patients_from_rows
    from ..io.files import check_output
    from ..mapping.atlas import resolve_atlas_set
    from .metrics import calibration_summary, evaluate_method
    from .stat_tests import compare_methods

    t_start = time.perf_counter()
    config = config or EvaluationConfig()
    out_dir = check_output(out_dir, folder=True, parameter="out_dir")
    report = reporter(progress)
    rows = _staged_rows(cohort_csv, config.rules)
    specs = method_specs(config)
    if not specs:
        raise UsageError("nothing to evaluate: give --strategy and/or --ablation")
    split = load_or_make_split(out_dir / "split.json", patients_from_rows(rows), n_folds=config.folds,
                               seed=config.seed, val_fraction=config.val_fraction)
    split_fp = split.fingerprint

    atlas_set = resolve_atlas_set(atlases)
    cache = Path(cache_dir) if cache_dir else None
    need_lesions = any(s.kind == "lesion" for s in specs)
    nodes = None
    if any(s.kind in NODE_KINDS for s in specs):
        from ..preflight.parameters import check_node_model

        node_model = check_node_model(config.node_model, device=config.device, parameter="--node-model")
        if node_model is None:
            raise UsageError("the node methods need a node model: give --node-model (`lnstaging train-nodes`)")
        nodes = (node_model, out_dir / "nodes", Path(cohort_csv).resolve().parent)
    report(0.0, f"preparing {len(rows)} scans")
    case_sets: dict[int | None, list[EvalCase]] = {
        None: prepare_cases(rows, atlas_set, cache, config, need_lesions,
                            progress_part(progress, 0.0, 0.1), nodes=nodes)}
    for k in sorted({s.atlases for s in specs if s.atlases}):
        if k > len(atlas_set):
            raise UsageError(f"--ablation atlases={k}: the atlas set has only {len(atlas_set)} atlases")
        sub = atlas_set.subset([a.id for a in atlas_set.atlases[:k]])
        case_sets[k] = prepare_cases(rows, sub, cache, config, False,
                                     progress_part(progress, 0.0, 0.1))
    cases_by_scan = {c.scan_id: c for c in case_sets[None]}

    predictions: dict[str, list[FoldPredictions]] = {s.name: [] for s in specs}
    n_steps = config.folds * len(specs)
    step = 0
    for k in range(config.folds):
        fold = split.fold(k)
        fold_ids = {role: set(fold.ids(role)) for role in ("train", "validation", "test")}
        fold_dir = out_dir / "folds" / f"fold{k}"
        done: dict[str, FoldPredictions] = {}
        for spec in specs:
            frac0 = 0.1 + 0.85 * step / n_steps
            report(frac0, f"fold {k + 1}/{config.folds}: {spec.name}")
            pool = case_sets[spec.atlases]
            roles = {role: [c for c in pool if c.patient_id in ids] for role, ids in fold_ids.items()}

            sub_progress = progress_part(progress, frac0, frac0 + 0.85 / n_steps)

            fp = run_fold_method(spec, k, fold_dir, roles, config, split_fp, done, sub_progress)
            done[spec.name] = fp
            predictions[spec.name].append(fp)
            step += 1

    report(0.96, "metrics and tests")
    sides = {c.patient_id: c.sample.side for c in case_sets[None]}
    results, scans_of = {}, {}
    for spec in specs:
        scans = scan_predictions(predictions[spec.name], cases_by_scan)
        scans_of[spec.name] = scans
        by_rules = spec.kind in ("ts1", "threshold", "lesion", "restage", *NODE_KINDS) or all(
            fp.params.get("n_stage_from") == "rules" for fp in predictions[spec.name])
        stage_fn = _rule_stage_fn(spec.rules, sides) if by_rules else None
        results[spec.name] = evaluate_method(spec.name, scans, stage_fn=stage_fn, n_boot=config.n_boot,
                                             seed=config.seed)
    comparisons = []
    bases = [b for b in ("ts1", "threshold") if b in results] or [specs[0].name]
    for base in bases:  # every method against TS1 and against the SUVmax threshold
        for spec in specs:
            if spec.name in bases[:bases.index(base) + 1]:
                continue
            comparisons.append(compare_methods(scans_of[base], scans_of[spec.name], base, spec.name,
                                               level="patient", n_permutations=config.n_permutations,
                                               seed=config.seed, n_boot=config.n_boot))
    calibration = {s.name: calibration_summary(scans_of[s.name]) for s in specs if s.kind not in SCORE_KINDS}
    run = EvaluationRun(out_dir, [s.name for s in specs], results, comparisons, predictions, {},
                        time.perf_counter() - t_start, len({r.patient_id for r in rows}), len(rows), calibration,
                        node_level(predictions, cases_by_scan) if nodes is not None else {},
                        station_operating_points(predictions, cases_by_scan))
    from .report import write_report

    run.files = write_report(run, config, split, cohort_csv)
    report(1.0, f"report: {run.files['report']}")
    return run


def evaluate_model(cohort_csv: str | Path, model: str | Path, out_dir: str | Path,
                   config: EvaluationConfig | None = None, *, atlases=None, cache_dir: str | Path | None = None,
                   progress: ProgressCallback | None = None) -> EvaluationRun:
    """Test a trained model (e.g. the bundled one) on a whole cohort: every scan is a test scan (one 'fold')."""
    from ..io.files import check_output
    from ..mapping.atlas import resolve_atlas_set
    from ..preflight.parameters import check_model
    from .metrics import calibration_summary, evaluate_method

    t_start = time.perf_counter()
    config = config or EvaluationConfig(folds=1)
    out_dir = check_output(out_dir, folder=True, parameter="out_dir")
    check_model(model, parameter="model")  # loaded and verified before any scan is prepared
    report = reporter(progress)
    rows = _staged_rows(cohort_csv, config.rules)
    atlas_set = resolve_atlas_set(atlases)
    cache = Path(cache_dir) if cache_dir else None
    cases = prepare_cases(rows, atlas_set, cache, config, False, progress_part(progress, 0.0, 0.8))
    report(0.85, "classifying")
    score, pred, n_pred, n_prob, params = predict_model(Path(model), cases, config.rules, config.device)
    name = Path(model).name
    fp = FoldPredictions(name, 0, [c.scan_id for c in cases], score, pred, n_pred, n_prob, params)
    scans = scan_predictions([fp], {c.scan_id: c for c in cases})
    sides = {c.patient_id: c.sample.side for c in cases}
    stage_fn = None if n_prob is not None else _rule_stage_fn(config.rules, sides)
    results = {name: evaluate_method(name, scans, stage_fn=stage_fn, n_boot=config.n_boot, seed=config.seed)}
    run = EvaluationRun(out_dir, [name], results, [], {name: [fp]}, {}, time.perf_counter() - t_start,
                        len({r.patient_id for r in rows}), len(rows), {name: calibration_summary(scans)})
    from .report import write_report

    run.files = write_report(run, config, None, cohort_csv, model=Path(model))
    return run
