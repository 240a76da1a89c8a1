"""Benchmark of station mapping: a full-size phantom patient and a 5-atlas phantom set (different seeds).

``--method atlas`` (default) reports wall time per stage and peak memory, the quality figures (anatomy Dice per
structure, station Dice per station against the phantom's true stations, node-to-station assignment accuracy, every
3-of-N atlas subset against all N) and, for reference, one atlas-patient pair registered with SimpleITK's
FastSymmetricForcesDemons at the same resolution and iteration count as the deformable stage.

``--method network`` times the station network on the same patient from the CT alone (model load, first and warm
mapping) with the same quality figures; ``--method both`` runs both and adds their per-station agreement (Dice).
Timings are given with the anatomy excluded (the atlas registration with the anatomy given) and included (plus a
TotalSegmentator run when it is installed, ``--totalsegmentator``); the network needs no anatomy, so both are its
mapping time.

``--cohort COHORT.csv`` evaluates the methods on every row of a phantom cohort instead (rows need ct_path,
anatomy_path for the atlases, stations_path and the truth_path of the phantom's truth.json): per method the
node-to-station assignment accuracy (pooled over the cohort's nodes) and the Dice of every station against the true
map on the CT grid (mean per station over the cases, and the mean over the stations), and the time per case.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "station mapping on a full-size phantom with a 5-atlas phantom set: time per stage, memory, quality"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=4242, help="phantom patient seed (never an atlas seed)")
    parser.add_argument("--atlas-seed", type=int, default=None, help="atlas set seed (default: the bundled set's)")
    parser.add_argument("--atlases", default=None, help="existing atlas set folder (default: generate or reuse)")
    parser.add_argument("--n-atlases", type=int, default=5)
    parser.add_argument("--size", default="full", help="phantom size (full | small)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK demons reference")
    parser.add_argument("--work", default=None, help="folder for generated data (default: a temporary folder)")
    parser.add_argument("--method", default="atlas", choices=("atlas", "network", "both"),
                        help="atlas registration (default), the station network from the CT alone, or both")
    parser.add_argument("--station-model", default=None, metavar="CHECKPOINT",
                        help="station network (default: the bundled one)")
    parser.add_argument("--cohort", default=None, metavar="COHORT.csv",
                        help="evaluate on every row of a phantom cohort (quality and time per case) instead")
    parser.add_argument("--totalsegmentator", action="store_true",
                        help="time a TotalSegmentator run for the 'anatomy included' figure of the atlases")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(args: argparse.Namespace) -> dict:
    method = getattr(args, "method", "atlas")
    if getattr(args, "cohort", None):
        return run_cohort(args)
    network = _network_section(args) if method in ("network", "both") else None
    if method == "network":
        return network
    out = run_atlas(args)
    out["method"] = method
    out["anatomy_included"] = _anatomy_included(args, out["mapping_wall_s"])
    if network is not None:
        out["network"] = network
        from ..stationnet.method import station_agreement

        dice = station_agreement(args._atlas_mapping, args._network_mapping)
        out["agreement_dice"] = {k: round(v, 4) for k, v in dice.items() if v is not None}
    return out


def run_atlas(args: argparse.Namespace) -> dict:
    """The atlas registration benchmark (see the module docstring)."""
    from ..errors import LNSError
    from ..io.files import peak_memory_mb
    from ..mapping.atlas import load_atlas_set
    from ..mapping.registration import RegistrationConfig
    from ..mapping.station_mapping import map_stations
    from ..paths import DEMO_ATLAS_SEED as DEFAULT_ATLAS_SEED

    try:
        from ..phantom import generate_atlas_set, generate_patient
    except ImportError as exc:
        raise LNSError(f"the mapping benchmark needs the phantom generator ({exc})") from None

    threads = args.threads or _cores()
    atlas_seed = DEFAULT_ATLAS_SEED if args.atlas_seed is None else args.atlas_seed
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lns-bench-mapping-"))
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    atlas_dir = Path(args.atlases) if args.atlases else work / f"atlases-seed{atlas_seed}-{args.size}-{args.n_atlases}"
    if not (atlas_dir / "manifest.json").is_file():
        atlas_dir = Path(generate_atlas_set(atlas_dir, atlases=args.n_atlases, seed=atlas_seed, size=args.size))
    stages["generate_atlas_set"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    patient = generate_patient(args.seed, size=args.size)
    stages["generate_patient"] = time.perf_counter() - t0

    aset = load_atlas_set(atlas_dir, allow_missing_stations=True)
    for atlas in aset.atlases:  # read from disk outside the timed mapping
        atlas.anatomy(), atlas.stations()
    cfg = RegistrationConfig(threads=threads)

    # first call: includes the one-off atlas preparation (cached in the atlas set); second call: a warm mapping
    t0 = time.perf_counter()
    map_stations(patient.ct, patient.anatomy, aset, device=args.device, config=cfg)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = map_stations(patient.ct, patient.anatomy, aset, device=args.device, config=cfg, keep_warped=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    dice = map_stations(patient.ct, patient.anatomy, aset, device=args.device, config=cfg,
                        evaluate_anatomy=True).anatomy_dice
    stages["anatomy_dice_run"] = time.perf_counter() - t0

    quality = _quality(m, patient)
    subsets = _subsets(m, patient)
    args._atlas_mapping = m
    out = {
        "data": {"patient_seed": args.seed, "atlas_seed": atlas_seed, "atlases": len(aset), "size": args.size,
                 "ct_size": list(patient.ct.GetSize()), "ct_spacing": [round(s, 3) for s in patient.ct.GetSpacing()],
                 "output_grid": list(m.geometry.shape)},
        "threads": threads,
        "mapping_wall_s": round(warm, 3),
        "mapping_cold_wall_s": round(cold, 3),
        "stages_s": {k: round(v, 3) for k, v in m.timings.items()},
        "data_stages_s": {k: round(v, 3) for k, v in stages.items()},
        "device": args.device,
        "config": {"levels_mm": list(cfg.levels_mm), "iterations": list(cfg.iterations),
                   "iterations_run": m.registration.iterations, "affine_mm": cfg.affine_mm,
                   "affine_iterations": cfg.affine_iterations, "step": cfg.step, "fluid_sigma": cfg.fluid_sigma,
                   "smooth_sigma": cfg.smooth_sigma, "field_factor": cfg.field_factor,
                   "crop_mm": [round(float(v), 1) for v in m.registration.box.size]},
        "anatomy_dice": dice,
        **quality,
        "three_of_n": subsets,
        "flags": {k: v for k, v in m.flags.items() if v != "ok"},
        "agreement": {k: round(v, 3) for k, v in m.agreement.items() if np.isfinite(v)},
    }
    if not args.no_demons:
        out["demons_reference"] = _demons_reference(m, aset, patient, cfg)
    out["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return out


def _truth_crop(m, stations_img) -> np.ndarray:
    import SimpleITK as sitk

    ref = m.geometry.image(np.zeros(m.geometry.shape[::-1], np.uint8))
    return sitk.GetArrayFromImage(sitk.Resample(stations_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def _nodes(truth: dict) -> list[tuple[str, np.ndarray]]:
    from ..staging.stations import parse_station

    out = []
    stations = truth.get("stations", {})
    for name, info in stations.items():
        for node in info.get("nodes", []):
            out.append((parse_station(name).name, np.asarray(node["centre_mm"], float)))
    return out


def _quality(m, patient) -> dict:
    import SimpleITK as sitk

    from ..mapping.weightmap import assign_points
    from ..staging.stations import STATION_NAMES

    truth = _truth_crop(m, patient.stations)
    full = sitk.GetArrayViewFromImage(patient.stations)
    per = {}
    for lab, name in enumerate(STATION_NAMES, 1):
        t, f = truth == lab, m.labels == lab
        if t.any() or f.any():
            per[name] = round(float(2 * (t & f).sum() / (t.sum() + f.sum())), 4)
    nodes = _nodes(patient.truth)
    assigned = assign_points(np.array([c for _, c in nodes]), m.weight_maps) if nodes else []
    correct = sum(a == s for a, (s, _) in zip(assigned, nodes, strict=True))
    return {
        "station_dice": per,
        "station_dice_mean": round(float(np.mean(list(per.values()))), 4) if per else None,
        "station_voxels_in_crop": round(float((truth > 0).sum() / max(1, (full > 0).sum())), 4),
        "node_assignment": {"nodes": len(nodes), "correct": int(correct),
                            "accuracy": round(correct / len(nodes), 4) if nodes else None,
                            "unassigned": int(sum(a is None for a in assigned)),
                            "errors": [(s, a) for a, (s, _) in zip(assigned, nodes, strict=True) if a != s][:20]},
    }


def _subsets(m, patient) -> dict:
    """Every 3-atlas subset fused from the same registrations (each atlas is registered independently)."""
    from ..mapping.fusion import fuse
    from ..mapping.weightmap import assign_points, station_weight_maps

    n = m.warped.shape[0]
    if n < 4:
        return {}
    nodes = _nodes(patient.truth)
    pts = np.array([c for _, c in nodes])
    order = np.argsort([m.atlas_loss[a] for a in m.atlas_ids], kind="stable")
    accs = {}
    for combo in itertools.combinations(range(n), 3):
        ranking = [list(combo).index(int(i)) for i in order if i in combo]  # positions within the subset
        fused = fuse(m.warped[list(combo)], ranking)
        maps = station_weight_maps(fused.labels, m.geometry, fused.votes, 1.0 / fused.n_atlases)
        got = assign_points(pts, maps) if len(pts) else []
        accs["+".join(m.atlas_ids[i] for i in combo)] = (
            round(sum(a == s for a, (s, _) in zip(got, nodes, strict=True)) / len(nodes), 4) if nodes else None)
    vals = [v for v in accs.values() if v is not None]
    return {"node_accuracy_per_subset": accs, "min": min(vals) if vals else None,
            "mean": round(float(np.mean(vals)), 4) if vals else None, "max": max(vals) if vals else None}


def _demons_reference(m, aset, patient, cfg) -> dict:
    """One pair with SimpleITK FastSymmetricForcesDemons on the finest level grid, same iteration count."""
    import SimpleITK as sitk

    res = m.registration
    grid = res.box.grid(cfg.levels_mm[-1])
    ref = grid.image(np.zeros(grid.shape[::-1], np.float32))
    fixed_lab = sitk.Resample(patient.anatomy, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    # moving: atlas 0 anatomy brought onto the same grid by our affine (demons does only the deformable part)
    atlas = aset.atlases[0]
    pts = grid.points().reshape(-1, 3)
    to_norm = np.linalg.inv(res.box.norm_to_world())
    pn = pts @ to_norm[:3, :3].T + to_norm[:3, 3]
    q = pn @ res.affine[0][:3, :3].T + res.affine[0][:3, 3]
    anat = atlas.anatomy()
    to_index = np.linalg.inv(np.array(anat.GetDirection()).reshape(3, 3) @ np.diag(anat.GetSpacing()))
    idx = np.rint((q - np.array(anat.GetOrigin())) @ to_index.T).astype(int)
    arr = sitk.GetArrayViewFromImage(anat)
    inside = ((idx >= 0) & (idx < np.array(anat.GetSize()))).all(1)
    mov = np.zeros(len(q), np.float32)
    mov[inside] = arr[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    # one scalar image per side: the structure channels folded into intensities (reference timing only)
    lut = np.zeros(256, np.float32)
    for k, s in enumerate(cfg.structures, 1):
        lut[list(s.ids)] = k / len(cfg.structures)
    fixed = sitk.GetImageFromArray(lut[np.minimum(sitk.GetArrayFromImage(fixed_lab), 255)].astype(np.float32))
    fixed.CopyInformation(ref)
    moving = sitk.GetImageFromArray(lut[np.minimum(mov.astype(int), 255)].reshape(grid.shape[::-1]))
    moving.CopyInformation(ref)
    iterations = int(sum(cfg.iterations))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.threads or 1)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(1.5)
    t0 = time.perf_counter()
    demons.Execute(fixed, moving)
    pair = time.perf_counter() - t0
    ours_batch = res.timings["deformable"]
    return {"grid": list(grid.shape), "spacing_mm": [round(float(s), 2) for s in grid.spacing],
            "iterations": iterations, "demons_pair_s": round(pair, 3),
            "ours_deformable_batch_s": round(ours_batch, 3), "atlases_in_batch": res.n_atlases,
            "ours_per_atlas_s": round(ours_batch / res.n_atlases, 3),
            "ratio_demons_pair_to_ours_per_atlas": round(pair / (ours_batch / res.n_atlases), 2)}


# -- the station network ---------------------------------------------------------------------------------------------


def _anatomy_included(args: argparse.Namespace, mapping_s: float) -> dict:
    """The atlas mapping with the anatomy step: a TotalSegmentator run when asked for and installed."""
    out: dict = {"mapping_s": round(mapping_s, 3), "anatomy_s": None}
    if not getattr(args, "totalsegmentator", False):
        out["note"] = "anatomy given (phantom); pass --totalsegmentator to time a TotalSegmentator run"
        return out
    import SimpleITK as sitk

    from ..anatomy.totalsegmentator import run_totalsegmentator
    from ..errors import LNSError
    from ..phantom import generate_patient

    patient = generate_patient(args.seed, size=args.size)
    with tempfile.TemporaryDirectory(prefix="lns-bench-ts-") as tmp:
        ct_path = Path(tmp) / "ct.nii.gz"
        sitk.WriteImage(patient.ct, str(ct_path))
        t0 = time.perf_counter()
        try:
            run_totalsegmentator(ct_path, Path(tmp) / "anatomy.nii.gz", device=args.device)
        except LNSError as exc:
            out["note"] = f"TotalSegmentator did not run: {exc}"
            return out
        out["anatomy_s"] = round(time.perf_counter() - t0, 3)
    out["total_s"] = round(out["anatomy_s"] + mapping_s, 3)
    return out


def _network_section(args: argparse.Namespace) -> dict:
    """Station network on the benchmark patient, from the CT alone: model load, first and warm mapping, quality."""
    from ..errors import LNSError
    from ..io.files import peak_memory_mb
    from ..runtime import torch_threads
    from ..stationnet.infer import map_stations_network
    from ..stationnet.model import load_station_model

    try:
        from ..phantom import generate_patient
    except ImportError as exc:
        raise LNSError(f"the mapping benchmark needs the phantom generator ({exc})") from None
    threads = args.threads or _cores()
    patient = generate_patient(args.seed, size=args.size)
    with torch_threads(threads):
        t0 = time.perf_counter()
        model = load_station_model(args.station_model, args.device)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        map_stations_network(patient.ct, model, args.device)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = map_stations_network(patient.ct, model, args.device)
        warm = time.perf_counter() - t0
    out = {"method": "network", "data": {"patient_seed": args.seed, "size": args.size,
                                         "ct_size": list(patient.ct.GetSize()), "output_grid": list(m.geometry.shape)},
           "threads": threads, "device": args.device, "model": m.model,
           "model_load_s": round(load_s, 3), "mapping_wall_s": round(warm, 3), "mapping_cold_wall_s": round(cold, 3),
           "anatomy_excluded_s": round(warm, 3), "anatomy_included_s": round(warm, 3),
           "note": "the network maps from the CT alone: no anatomy step", "stages_s":
           {k: round(v, 3) for k, v in m.timings.items()}, **_quality(m, patient)}
    out["peak_memory_mb"] = round(peak_memory_mb(), 1)
    if args.method == "both":
        args._network_mapping = m
    return out


# -- a phantom cohort ------------------------------------------------------------------------------------------------


def _on_ct(mapping, ct) -> np.ndarray:
    """The mapping's labels on the whole CT grid (0 outside its crop)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.Resample(mapping.label_image(), ct, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def case_quality(mapping, ct, truth_stations, nodes: list[tuple[str, np.ndarray]]) -> dict:
    """Station Dice against the true map on the whole CT grid and node-to-station assignment of one case."""
    import SimpleITK as sitk

    from ..mapping.weightmap import assign_points
    from ..staging.stations import STATION_NAMES

    pred = _on_ct(mapping, ct)
    truth = sitk.GetArrayViewFromImage(truth_stations)
    dice = {}
    for lab, name in enumerate(STATION_NAMES, 1):
        t, f = truth == lab, pred == lab
        if t.any():
            dice[name] = float(2 * (t & f).sum() / (t.sum() + f.sum()))
    got = assign_points(np.array([c for _, c in nodes]), mapping.weight_maps) if nodes else []
    errors = [(s, a) for a, (s, _) in zip(got, nodes, strict=True) if a != s]
    return {"dice": dice, "nodes": len(nodes), "correct": len(nodes) - len(errors),
            "unassigned": int(sum(a is None for a in got)), "errors": errors}


def _summary(rows: list[dict], seconds: list[float]) -> dict:
    from ..staging.stations import STATION_NAMES

    n = sum(r["nodes"] for r in rows)
    correct = sum(r["correct"] for r in rows)
    per_station = {}
    for name in STATION_NAMES:
        vals = [r["dice"][name] for r in rows if name in r["dice"]]
        if vals:
            per_station[name] = round(float(np.mean(vals)), 4)
    confusions: dict[str, int] = {}
    for r in rows:
        for s, a in r["errors"]:
            key = f"{s}->{a}"
            confusions[key] = confusions.get(key, 0) + 1
    return {"node_assignment": {"nodes": n, "correct": correct, "accuracy": round(correct / n, 4) if n else None,
                                "unassigned": sum(r["unassigned"] for r in rows),
                                "per_case_mean": round(float(np.mean([r["correct"] / r["nodes"] for r in rows
                                                                      if r["nodes"]])), 4)},
            "station_dice_mean": round(float(np.mean(list(per_station.values()))), 4) if per_station else None,
            "station_dice": per_station,
            "errors": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:15]),
            "seconds_per_case": {"mean": round(float(np.mean(seconds)), 3), "max": round(float(np.max(seconds)), 3)}}


def run_cohort(args: argparse.Namespace) -> dict:
    """Quality and time per case of the chosen method(s) on every row of a phantom cohort."""
    import json

    import SimpleITK as sitk

    from ..anatomy.vocabulary import load_anatomy
    from ..cohort.table import read_cohort
    from ..errors import InputError
    from ..io.images import load_ct
    from ..mapping.atlas import resolve_atlas_set
    from ..mapping.registration import RegistrationConfig
    from ..runtime import torch_threads
    from ..stationnet.method import map_case, station_agreement
    from ..stationnet.model import load_station_model

    methods = {"atlas": ["atlas"], "network": ["network"], "both": ["atlas", "network"]}[args.method]
    threads = args.threads or _cores()
    cohort = Path(args.cohort)
    rows = read_cohort(cohort).require_valid().usable_rows()
    for row in rows:
        if row.stations_path is None or not row.extra.get("truth_path"):
            raise InputError(f"--cohort {cohort}, line {row.line}: the evaluation needs stations_path and truth_path "
                             "(a phantom cohort)")
        if "atlas" in methods and row.anatomy_path is None:
            raise InputError(f"--cohort {cohort}, line {row.line}: --method {args.method} needs anatomy_path")
    model = load_station_model(args.station_model, args.device) if "network" in methods else None
    atlas_set = resolve_atlas_set(args.atlases) if "atlas" in methods else None
    cfg = RegistrationConfig(threads=threads)
    per: dict[str, list[dict]] = {m: [] for m in methods}
    secs: dict[str, list[float]] = {m: [] for m in methods}
    agreement: list[dict] = []
    cases = []
    with torch_threads(threads):
        for row in rows:
            truth_path = Path(row.extra["truth_path"])
            truth_path = truth_path if truth_path.is_absolute() else cohort.parent / truth_path
            nodes = _nodes(json.loads(truth_path.read_text(encoding="utf-8")))
            t0 = time.perf_counter()
            ct, _, _ = load_ct(row.ct_path)
            load_s = time.perf_counter() - t0
            truth = sitk.ReadImage(str(row.stations_path))
            maps = {}
            for m in methods:
                t0 = time.perf_counter()
                anatomy = load_anatomy(row.anatomy_path, reference=ct) if m == "atlas" else None
                run_ = map_case(ct, m, anatomy=anatomy, atlas_set=atlas_set, station_model=model,
                                device=args.device, config=cfg)
                secs[m].append(time.perf_counter() - t0 + load_s)
                maps[m] = run_.mapping
                q = case_quality(run_.mapping, ct, truth, nodes)
                per[m].append(q)
            row_out = {"case": row.scan_id, "nodes": len(nodes),
                       **{f"{m}_accuracy": round(per[m][-1]["correct"] / max(1, len(nodes)), 4) for m in methods},
                       **{f"{m}_dice_mean": round(float(np.mean(list(per[m][-1]["dice"].values()))), 4)
                          for m in methods}}
            if len(methods) == 2:
                agreement.append(station_agreement(maps["atlas"], maps["network"]))
            cases.append(row_out)
    out = {"method": args.method, "cohort": str(cohort), "cases": len(rows), "threads": threads,
           "timing_note": "seconds per case: CT read + (anatomy read, registration with the anatomy given) for the "
                          "atlases; CT read + station network from the CT alone for the network",
           **{m: _summary(per[m], secs[m]) for m in methods}, "per_case": cases}
    if model is not None:
        out["station_model"] = model.info()
    if agreement:
        out["agreement_dice"] = {name: round(float(np.mean([a[name] for a in agreement if a[name] is not None])), 4)
                                 for name in agreement[0] if any(a[name] is not None for a in agreement)}
    return out
