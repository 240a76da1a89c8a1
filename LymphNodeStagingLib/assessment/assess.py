"""Assessment of one PET/CT (or of a CT alone, with a CT-only model): load, anatomy, station mapping, patches,
classifier, SUV figures, lymph nodes (with a node model), staging, reports.

``assess_case`` is the one function behind ``lnstaging assess``, the Slicer module's Apply and the cohort runs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import Cancelled
from ..io.files import write_image
from ..mapping.crop import check_pet_covers, mediastinal_crop
from ..paths import BUNDLED_MODELS, DEMO_CT_MODEL, DEMO_MODEL
from ..preflight.case import check_case
from ..preflight.memory import check_memory, estimate_memory
from ..preflight.parameters import (
    check_device,
    check_model,
    check_node_classifier,
    check_node_model,
    check_out,
    check_rules,
    check_threshold,
    check_tta,
    model_modality,
)
from ..runtime import Device, ProgressCallback, progress_part, reporter
from ..staging.result import (
    CT_ONLY_MODEL_NOTE,
    CT_ONLY_NOTE,
    MODALITY_CT,
    MODALITY_PETCT,
    CaseResult,
    make_case_result,
)
from ..staging.rules import DEFAULT_RULES, parse_side
from ..staging.stations import STATIONS
from ..suv.statistics import station_feature_array, station_suv_stats, station_volume_stats

log = logging.getLogger(__name__)

#: File names that say nothing about the case; the folder name is used instead.
GENERIC_NAMES = {"ct", "image", "img", "volume", "ct_image", "dicom", "series"}


@dataclass
class Assessment:
    """Everything one assessment produced."""

    result: CaseResult
    station_map: sitk.Image  # fused station labels 1..17 on (a crop of) the CT grid
    ct: sitk.Image  # HU
    pet: sitk.Image | None  # SUV; None: a CT assessed without PET
    mapping: Any = None  # mapping.StationMapping
    inputs_from_dicom: bool = False
    dicom_sources: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    node_detection: Any = None  # nodes.infer.NodeDetection (instance map on the CT grid) when a node model ran


def assess_case(
    ct: str | Path | sitk.Image,
    pet: str | Path | sitk.Image | None = None,
    side: str | None = None,
    *,
    anatomy: str | Path | sitk.Image | None = None,
    model: str | Path | None = None,
    node_model: str | Path | None = None,
    node_classifier: str | Path | None = None,
    atlases=None,
    rules: str = DEFAULT_RULES,
    device: str | Device = "cpu",
    pet_is_suv: bool | str | None = None,
    suv_mode: str = "qiba",
    threshold: float | None = None,
    tta: int = 0,
    seed: int = 0,
    case_id: str | None = None,
    out_dir: str | Path | None = None,
    station_mapping=None,
    method: str = "atlas",
    station_model: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Assessment:
    """Assess one PET/CT. ``ct``/``pet`` are files, DICOM folders or SimpleITK images (PET images are SUV).

    ``pet`` None: the CT alone (``result.modality`` "ct"): no SUV figures (station volumes still), no PET checks, a
    CT-only ``model`` (None: the bundled CT-only demo model; a model that reads the PET is a UsageError before the
    anatomy and the mapping). ``side``: the tumour side, R or L (required).

    ``anatomy``: precomputed label map (file, folder of masks or image); None runs TotalSegmentator.
    ``model``: checkpoint (None: the bundled demo model). ``node_model``: node model checkpoint (None: the bundled
    node model when there is one, else no node detection); with one, the lymph nodes are found in the mediastinal crop
    of the station map and measured (``result.nodes``, ``nodes.nii.gz``). ``node_classifier``: node classifier
    checkpoint (None: the bundled one for the case's modality, when there is one); with nodes found, every node gets
    its malignancy probability and every station its probability from its nodes and its most suspicious node.
    ``atlases``: atlas set folder or a loaded
    ``AtlasSet`` (reused between cases, it keeps its prepared registration data; None: ``$LNSTAGING_ATLASES`` or the
    synthetic demo set, see ``mapping.atlas.resolve_atlas_set``). ``station_mapping``: a mapping computed before (skips
    registration). ``method``: how the stations are mapped, "atlas" (registration guided by the anatomy), "network"
    (the station network from the CT alone; no anatomy, no TotalSegmentator) or "both" (the atlas map is used, the
    per-station Dice between the two maps goes into ``result.atlases["agreement_dice"]``); ``station_model``: the
    station network checkpoint (None: the bundled one). With ``out_dir`` the result JSON, CSV, station map, mapping
    files, the node instance map and the PNG overview are written there.
    """
    # 0. options and the output folder, before any file is read
    side = parse_side(side, "side")
    dev = check_device(device, "device")
    threshold = check_threshold(threshold, "threshold")
    check_rules(rules, "rules")
    tta = check_tta(tta, "tta")
    check_out(out_dir, "out_dir")
    from ..stationnet.method import check_method, needs_anatomy, needs_network

    method = check_method(method, "method")
    atlas_method = needs_anatomy(method) and station_mapping is None
    report = reporter(progress)
    timings: dict[str, float] = {}

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled("assessment cancelled")

    # 1. images: every input read to its end and checked (grid, values, memory estimate) before any heavy step
    t0 = time.perf_counter()
    report(0.0, "loading and checking images")
    checked = check_case(ct, pet, anatomy=anatomy, pet_is_suv=pet_is_suv, suv_mode=suv_mode, atlases=atlases,
                         mapping=atlas_method, read_anatomy=anatomy is not None and atlas_method)
    ct_img, pet_img, suv_info = checked.ct, checked.pet, checked.suv
    from_dicom, sources = checked.from_dicom, checked.dicom_sources
    timings["load"] = time.perf_counter() - t0
    check_cancel()

    # 2. the model, loaded and verified before the anatomy and the station mapping
    t0 = time.perf_counter()
    net, manifest, model_path = check_model(model, device=dev, parameter="model", pet=pet_img is not None)
    thr = float(threshold if threshold is not None else manifest.get("threshold", 0.5))
    timings["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    node_net = check_node_model(node_model, device=dev, parameter="node_model")  # None: no node model to run
    node_clf = None
    if node_net is not None:
        node_clf = check_node_classifier(node_classifier, has_pet=pet_img is not None, device=dev,
                                         parameter="node_classifier")
        timings["node_model"] = time.perf_counter() - t0
    station_net = None
    if needs_network(method) and station_mapping is None:
        from ..stationnet.model import check_station_model

        t0 = time.perf_counter()
        station_net = check_station_model(station_model, dev.torch, "station_model")
        timings["station_model"] = time.perf_counter() - t0
    check_cancel()

    # 3. anatomy and station mapping
    mapping_run = None
    if station_mapping is None and method == "network":
        from ..stationnet.method import map_case

        t0 = time.perf_counter()
        report(0.1, "station network")
        mapping_run = map_case(ct_img, "network", station_model=station_net, device=dev.torch,
                               progress=progress_part(progress, 0.1, 0.7), what="CT")
        station_mapping = mapping_run.mapping
        timings["mapping"] = time.perf_counter() - t0
        atlas_info = {"method": "network", "station_network": dict(station_mapping.model)}
        if pet_img is not None:  # the PET must cover the stations the network found
            check_pet_covers(pet_img, mediastinal_crop(stations=station_mapping.label_image(), margin_mm=0.0))
    elif station_mapping is None:
        t0 = time.perf_counter()
        report(0.1, "anatomy")
        anat_img = checked.anatomy if checked.anatomy is not None else _anatomy(anatomy, ct, ct_img, dev)
        timings["anatomy"] = time.perf_counter() - t0
        if pet_img is not None:
            check_pet_covers(pet_img, mediastinal_crop(anat_img, clip_to=ct_img))
        check_cancel()
        from ..mapping.atlas import resolve_atlas_set
        from ..mapping.station_mapping import map_stations

        t0 = time.perf_counter()
        atlas_set = resolve_atlas_set(atlases)
        if checked.anatomy is None:  # a TotalSegmentator label map: the estimate again with its registration box
            check_memory(estimate_memory(ct_img, pet_img, anatomy=anat_img, atlases=atlas_set),
                         f"CT {ct if not isinstance(ct, sitk.Image) else 'image'}")
        station_mapping = map_stations(ct_img, anat_img, atlas_set, device=dev.torch,
                                       progress=progress_part(progress, 0.2, 0.7))
        timings["mapping"] = time.perf_counter() - t0
        atlas_info = {"name": atlas_set.name, "atlases": station_mapping.atlas_ids, "path": str(atlas_set.root),
                      "method": method}
        if method == "both":
            from ..stationnet.method import map_case

            t0 = time.perf_counter()
            mapping_run = map_case(ct_img, "both", station_model=station_net, device=dev.torch,
                                   atlas_mapping=station_mapping, what="CT")
            timings["mapping_network"] = time.perf_counter() - t0
            atlas_info.update(station_network=dict(mapping_run.network.model), **mapping_run.to_dict())
    else:
        atlas_info = {"atlases": list(getattr(station_mapping, "atlas_ids", []))}
    check_cancel()
    station_map = station_mapping.label_image()
    if "mapping" not in timings and pet_img is not None:  # a mapping given by the caller: the PET must cover it
        check_pet_covers(pet_img, mediastinal_crop(stations=station_map, margin_mm=0.0))

    # 4. classifier
    t0 = time.perf_counter()
    report(0.75, "classifying stations")
    from ..classifier.calibration import calibration_of
    from ..classifier.checkpoint import file_sha256
    from ..classifier.patches import StationSampler
    from ..classifier.predict import predict_case

    t1 = time.perf_counter()
    # reported, and the inputs of a hybrid classifier; a CT alone: the volumes only
    stats = station_suv_stats(pet_img, station_map) if pet_img is not None else station_volume_stats(station_map)
    timings["suv_stats"] = time.perf_counter() - t1
    sampler = StationSampler.from_sparse_maps(station_mapping.weight_maps)
    calibration = calibration_of(manifest, f"model {model_path}")
    pred = predict_case(net, ct_img, pet_img, sampler, threshold=thr, tta=tta, seed=seed, calibration=calibration,
                        features=station_feature_array(stats))
    timings["classification"] = time.perf_counter() - t0 - timings["suv_stats"]
    check_cancel()

    # 4b. lymph nodes, in the mediastinal crop of the station map (each node gets its station and its SUV figures)
    detection = None
    if node_net is not None:
        t0 = time.perf_counter()
        report(0.85, "finding lymph nodes")
        from ..nodes.infer import detect_nodes

        detection = detect_nodes(ct_img, node_net, pet=pet_img, stations=station_map, device=dev.torch)
        timings["nodes"] = time.perf_counter() - t0
        check_cancel()
    node_probs = None
    if detection is not None and node_clf is not None:
        t0 = time.perf_counter()
        node_probs = classify_nodes(node_clf, ct_img, pet_img, detection, pred.present)
        timings["node_classifier"] = time.perf_counter() - t0

    # 5. the result
    probs = {st.name: (float(pred.probabilities[st.index]) if pred.present[st.index] else None) for st in STATIONS}
    agreement = {k: (None if v is None or not np.isfinite(v) else float(v))
                 for k, v in station_mapping.agreement.items()}
    centres = {st.name: tuple(float(c) for c in pred.centres_mm[st.index]) for st in STATIONS
               if pred.present[st.index]}
    result = make_case_result(
        case_id or _case_id(ct), side, probs, threshold=thr, rules=rules,
        suv_max={k: v.get("suv_max") for k, v in stats.items()},
        suv_peak={k: v.get("suv_peak") for k, v in stats.items()},
        volume_ml={k: v["volume_ml"] for k, v in stats.items()},
        agreement=agreement, centre_mm=centres,
    )
    for st in result.stations:
        flag = station_mapping.flags.get(st.name) or "ok"
        st.flags.extend(f"mapping:{f}" for f in flag.split(",") if f and f != "ok")
        if not st.present:
            result.warnings.append(f"station {st.name} was not found by the station mapping")
    result.warnings.extend(getattr(station_mapping, "warnings", []))
    model_sha = file_sha256(model_path)
    # a copy or a renamed demo model too
    demo_model = model_sha in {BUNDLED_MODELS.get(m.name) for m in (DEMO_MODEL, DEMO_CT_MODEL)}
    synthetic = getattr(station_mapping, "atlas_set", {}).get("synthetic", getattr(atlases, "synthetic", None))
    if getattr(station_mapping, "method", "atlas") == "network":  # the bundled network learnt from phantoms
        synthetic = True if station_mapping.model.get("bundled") else None
    result.set_provenance(synthetic, demo_model)
    result.model = {"path": str(model_path), "sha256": model_sha,
                    "kind": manifest.get("kind"), "strategy": manifest.get("strategy"),
                    "threshold": thr, "tta": tta, "calibration": calibration.method,
                    "calibrated": calibration.method != "identity", "modality": model_modality(net)}
    result.atlases = {**atlas_info, "synthetic": synthetic}
    result.atlases.pop("timings_s", None)
    result.inputs = {"ct": str(ct) if not isinstance(ct, sitk.Image) else "<image>",
                     "pet": None if pet is None else (str(pet) if not isinstance(pet, sitk.Image) else "<image>"),
                     "anatomy": str(anatomy) if isinstance(anatomy, (str, Path)) else
                     ("<image>" if anatomy is not None else
                      ("not used (station network)" if method == "network" else "TotalSegmentator"))}
    result.suv = suv_info
    result.modality = MODALITY_PETCT if pet_img is not None else MODALITY_CT
    if pet_img is None:
        result.warnings.append(CT_ONLY_NOTE)
    elif result.model["modality"] == MODALITY_CT:
        result.warnings.append(CT_ONLY_MODEL_NOTE)
    if detection is not None:
        result.nodes = [n.to_dict() for n in detection.nodes]
        result.model["node_model"] = detection.model
        result.warnings.extend(detection.warnings)
        if node_probs is not None:
            for rec, p in zip(result.nodes, node_probs.nodes, strict=True):
                rec["probability"] = float(p)
            for st in result.stations:
                if st.present:
                    st.node_probability = float(node_probs.stations[st.label - 1])
            result.model["node_classifier"] = node_clf.info()
        result = result.restage()  # the explanation names the deciding stations' most suspicious nodes
    result.version = __version__
    timings.update({f"mapping.{k}": v for k, v in getattr(station_mapping, "timings", {}).items()})
    result.timings_s = {k: round(float(v), 4) for k, v in timings.items()}

    out = Assessment(result=result, station_map=station_map, ct=ct_img, pet=pet_img, mapping=station_mapping,
                     inputs_from_dicom=from_dicom, dicom_sources=sources, node_detection=detection)
    if out_dir is not None:
        report(0.9, "writing outputs")
        out.files = write_outputs(out, out_dir)
    report(1.0, f"done: {result.n_stage}")
    return out


@dataclass
class NodeProbabilities:
    """The node classifier's output for one case: calibrated probability per node (id order) and per station."""

    nodes: np.ndarray  # (N,)
    stations: np.ndarray  # (17,) from the nodes; the prior where a present station has none; 0 absent


def classify_nodes(classifier, ct: sitk.Image, pet: sitk.Image | None, detection, present: np.ndarray
                   ) -> NodeProbabilities:
    """Every detected node's malignancy probability and the stations' probabilities from their nodes."""
    from ..nodes.malignancy import node_patches, station_index_of

    cfg = classifier.config
    patches = node_patches(ct, detection.instances, detection.nodes, pet if cfg.modality == "petct" else None,
                           cfg.patch_mm, cfg.patch_spacing)
    raw = classifier.node_probabilities(patches)
    stations = classifier.station_probabilities(raw, station_index_of(detection.nodes), present)
    return NodeProbabilities(classifier.calibration.apply(raw) if raw.size else raw, stations)


def _case_id(ct) -> str:
    if isinstance(ct, sitk.Image):
        return "case"
    path = Path(ct)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.lower() in GENERIC_NAMES and path.parent.name:
        return path.parent.name  # e.g. PH0001/ct.nii.gz -> PH0001
    return name


def _anatomy(anatomy, ct, ct_img: sitk.Image, device: Device) -> sitk.Image:
    from ..anatomy.totalsegmentator import run_totalsegmentator
    from ..anatomy.vocabulary import load_anatomy

    if isinstance(anatomy, sitk.Image):
        return anatomy
    if anatomy is not None:
        return load_anatomy(anatomy, reference=ct_img)
    with tempfile.TemporaryDirectory(prefix="lns-anatomy-") as tmp:
        ct_path = Path(ct) if isinstance(ct, (str, Path)) and Path(ct).is_file() else None
        if ct_path is None:
            ct_path = Path(tmp) / "ct.nii.gz"
            sitk.WriteImage(ct_img, str(ct_path))
        seg = run_totalsegmentator(ct_path, Path(tmp) / "anatomy.nii.gz", device=device.totalsegmentator)
        return load_anatomy(seg, reference=ct_img)


def write_outputs(assessment: Assessment, out_dir: str | Path) -> dict[str, Path]:
    """Write result.json, result.csv, stations.nii.gz, the mapping files, nodes.nii.gz (with a node model: instance
    ids 1..n on the CT grid, the ids of ``result.nodes``) and overview.png (each atomically)."""
    from .overview import write_overview

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "result_json": assessment.result.write_json(out / "result.json"),
        "result_csv": assessment.result.write_csv(out / "result.csv"),
        "stations": write_image(assessment.station_map, out / "stations.nii.gz"),
    }
    if assessment.mapping is not None and hasattr(assessment.mapping, "vote_fraction_image"):
        files["vote_fractions"] = write_image(assessment.mapping.vote_fraction_image(), out / "vote_fractions.nii.gz")
    node_map = None
    if assessment.node_detection is not None:
        node_map = sitk.Cast(assessment.node_detection.instances, sitk.sitkUInt16)
        files["nodes"] = write_image(node_map, out / "nodes.nii.gz")
    files["overview"] = write_overview(assessment.ct, assessment.pet, assessment.station_map, assessment.result,
                                       out / "overview.png", node_map=node_map)
    return files
