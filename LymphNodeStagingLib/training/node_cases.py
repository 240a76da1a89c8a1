"""The detected nodes of a cohort's scans for node training and evaluation: each scan's nodes are detected once with
the node model inside the fused station map, measured, given their station, and cut into patches
(``nodes.malignancy.node_patches``); the result is cached in a folder (one .npz per scan and setting).

Node truth (for the node-level AUC of an evaluation only, never for a prediction or for training): a detected node is
malignant when the truth node it overlaps most is malignant in the phantom's truth file (``truth_path``); a detection
that overlaps no truth node is benign.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..staging.stations import NUM_STATIONS

NODES_CACHE_VERSION = 1


@dataclass
class NodeEvalData:
    """The detected nodes of one scan for every node method."""

    bag: object  # training.node_mil.NodeBagCase (patches CT, mask, PET)
    short_axis_mm: np.ndarray  # (N,)
    suv_max: np.ndarray  # (N,) NaN without a PET
    truth: np.ndarray | None  # (N,) 1 malignant / 0 benign (detections against the node truth); None without truth

    def station_max(self, values: np.ndarray) -> np.ndarray:
        """(17,) the largest value of each station's nodes; 0 for a station without a node."""
        out = np.zeros(NUM_STATIONS)
        st = self.bag.node_station
        for s in np.unique(st[st >= 0]):
            out[s] = float(np.nanmax(np.where(np.isnan(values[st == s]), 0.0, values[st == s])))
        return out

    def node_scores_of(self, station_score: np.ndarray) -> np.ndarray:
        """(N,) a station-level method's score for every node: its station's score (0 outside every station)."""
        st = self.bag.node_station
        return np.where(st >= 0, np.asarray(station_score, float)[np.clip(st, 0, None)], 0.0)


def _truth_of_row(row, cohort_dir: Path) -> tuple[object, dict[int, bool]] | None:
    """The truth node instance map and {node id: malignant} of a phantom row; None when the row has no truth."""
    text = (row.extra.get("truth_path") or "").strip()
    if row.nodes_path is None or not text:
        return None
    path = Path(text) if Path(text).is_absolute() else cohort_dir / text
    if not path.is_file():
        return None
    truth = json.loads(path.read_text())
    malignant = {}
    for st in (truth.get("stations") or {}).values():
        for n in st.get("nodes", []):
            malignant[int(n["id"])] = bool(n.get("malignant", False))
    from ..nodes.data import read_node_map

    return read_node_map(row.nodes_path), malignant


def _match_truth(instances, nodes, truth_map, malignant: dict[int, bool]) -> np.ndarray:
    import SimpleITK as sitk

    det = sitk.GetArrayViewFromImage(instances)
    ref = sitk.GetArrayFromImage(sitk.Resample(truth_map, instances, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    out = np.zeros(len(nodes), dtype=np.int64)
    for i, n in enumerate(nodes):
        hit = ref[det == n.id]
        hit = hit[hit > 0]
        if hit.size:
            top = int(np.bincount(hit.astype(np.int64)).argmax())
            out[i] = int(malignant.get(top, False))
    return out


def prepare_node_data(row, prep, node_model, cache_dir: Path, cohort_dir: Path, patch_mm: float = 32.0,
                      patch_spacing: float = 2.0, device: str = "cpu") -> NodeEvalData:
    """Detect, measure and cut the nodes of one prepared scan (``training.cases.PreparedCase``); cached."""
    import SimpleITK as sitk

    from ..nodes.infer import detect_nodes
    from ..nodes.malignancy import node_patches, station_index_of
    from ..staging.rules import UNKNOWN
    from ..training.node_mil import NodeBagCase

    key = hashlib.sha256(json.dumps([NODES_CACHE_VERSION, sitk.Hash(prep.ct), sitk.Hash(prep.station_map),
                                     sitk.Hash(prep.pet), node_model.manifest.get("weights_sha256"), patch_mm,
                                     patch_spacing, row.extra.get("truth_path", "")]).encode()).hexdigest()[:20]
    file = cache_dir / f"{row.scan_id}-{key}.npz"
    labels = np.where(prep.sampler.present, row.station_labels(), UNKNOWN)
    n_stage = row.n_stage if row.n_stage is not None else UNKNOWN
    if file.is_file():
        d = np.load(file)
        truth = d["truth"] if d["has_truth"] else None
        bag = NodeBagCase(row.patient_id, d["patches"], d["station"], prep.sampler.present, labels, n_stage,
                          row.tumour_side)
        return NodeEvalData(bag, d["short_axis"], d["suv_max"], truth)
    det = detect_nodes(prep.ct, node_model, pet=prep.pet, stations=prep.station_map, device=device)
    nodes = det.nodes
    patches = node_patches(prep.ct, det.instances, nodes, prep.pet, patch_mm, patch_spacing).astype(np.float16)
    station = station_index_of(nodes)
    short = np.array([n.short_axis_mm for n in nodes], dtype=float)
    suv = np.array([np.nan if n.suv_max is None else n.suv_max for n in nodes], dtype=float)
    t = _truth_of_row(row, cohort_dir)
    truth = None if t is None else _match_truth(det.instances, nodes, *t)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    np.savez(tmp, patches=patches, station=station, short_axis=short, suv_max=suv,
             truth=np.zeros(0) if truth is None else truth, has_truth=truth is not None)
    tmp.replace(file)
    bag = NodeBagCase(row.patient_id, patches, station, prep.sampler.present, labels, n_stage, row.tumour_side)
    return NodeEvalData(bag, short, suv, truth)


def node_cases_from_cohort(rows, atlas_set, node_model, nodes_dir: Path, cohort_dir: Path,
                           cache_dir: Path | None = None, patch_spacing: float = 2.0, device: str = "cpu",
                           pet_is_suv=None, progress=None) -> list[NodeEvalData]:
    """The detected nodes of every row (station maps from the shared store, nodes cached in ``nodes_dir``)."""
    from ..runtime import Progress
    from .cases import prepare_case

    out = []
    for i, row in enumerate(rows):
        if progress:
            progress(Progress(i, max(len(rows), 1), f"nodes of {row.scan_id} ({i + 1}/{len(rows)})"))
        prep = prepare_case(row, atlas_set, cache_dir, device=device, pet_is_suv=pet_is_suv)
        out.append(prepare_node_data(row, prep, node_model, nodes_dir, cohort_dir, patch_spacing=patch_spacing,
                                     device=device))
    return out


def train_node_classifier_from_cohort(cohort_csv: str | Path, out_dir: str | Path, *, node_model=None,
                                      modality: str = "petct", epochs: int = 20, pos_weight: float = 10.0,
                                      patch_spacing: float = 2.0, pooling: str = "max", lr: float = 1e-3,
                                      seed: int = 0, val_fraction: float = 0.2, atlases=None,
                                      cache_dir: str | Path | None = None, pet_is_suv=None, device: str = "cpu",
                                      rules: str | None = None, progress=None):
    """Train the node classifier on a cohort CSV from its station labels (``training.node_mil``); returns the
    NodeTrainingResult. Validation rows as ``lnstaging train`` chooses them; nodes cached in ``OUT/nodes``."""
    from ..cohort.table import read_cohort
    from ..errors import LNSError, UsageError
    from ..io.files import check_output
    from ..mapping.atlas import resolve_atlas_set
    from ..nodes.malignancy import NodeClassifierConfig
    from ..preflight.parameters import check_node_model, check_rules
    from ..runtime import parse_device
    from ..staging.rules import DEFAULT_RULES
    from .from_cohort import split_rows
    from .node_mil import NodeTrainConfig, train_node_classifier

    dev = parse_device(device).torch
    check_rules(rules, "rules")
    mconfig = NodeClassifierConfig(modality=modality, patch_spacing=patch_spacing)
    tconfig = NodeTrainConfig(epochs=epochs, pos_weight=pos_weight, pooling=pooling, lr=lr, seed=seed, device=dev,
                              rules=rules or DEFAULT_RULES)
    out = check_output(out_dir, folder=True, parameter="out_dir")
    net = check_node_model(node_model, device=dev, parameter="--node-model")
    if net is None:
        raise UsageError("no node model: give --node-model (`lnstaging train-nodes`) to detect the nodes")
    rows = read_cohort(cohort_csv).require_valid().usable_rows()
    train_rows, val_rows = split_rows(rows, val_fraction, seed)
    if not train_rows or not val_rows:
        raise LNSError(f"cohort {cohort_csv}: node classifier training needs training and validation rows")
    atlas_set = resolve_atlas_set(atlases)
    cache = Path(cache_dir) if cache_dir else None
    cohort_dir = Path(cohort_csv).resolve().parent
    kw = dict(cache_dir=cache, patch_spacing=patch_spacing, device=dev, pet_is_suv=pet_is_suv, progress=progress)
    train = node_cases_from_cohort(train_rows, atlas_set, net, Path(out) / "nodes", cohort_dir, **kw)
    val = node_cases_from_cohort(val_rows, atlas_set, net, Path(out) / "nodes", cohort_dir, **kw)
    return train_node_classifier([c.bag for c in train], [c.bag for c in val], out, mconfig, tconfig, progress)
