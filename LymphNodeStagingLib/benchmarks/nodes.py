"""Benchmark of node detection on one phantom case: crop, network, instances (with station and SUV), per step.

With ``--model`` the given node checkpoint is timed. Without one, an untrained network of the published size
(``--arch``, ``--width``) is timed: the network's speed does not depend on its weights, but an untrained network's
probability map says nothing about nodes, so the instance step is then timed on the phantom's true node map instead.
The first run (cold: lazy initialisation of torch's kernels) and the following warm runs are reported apart.
"""

from __future__ import annotations

import argparse
import os
import time

HELP = "node detection on one phantom case (station map given): seconds per step, cold and warm, peak memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=4242, help="phantom patient seed")
    parser.add_argument("--size", default="full", choices=["small", "full"], help="phantom size (default full)")
    parser.add_argument("--model", help="node checkpoint (default: an untrained network, see --arch)")
    parser.add_argument("--arch", default="snet", choices=["snet", "unet3d"], help="untrained network (no --model)")
    parser.add_argument("--width", type=float, default=1.0, help="channel scale of the untrained network")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="warm runs after the cold one (default 3)")


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from ..io.files import peak_memory_mb
    from ..nodes.infer import detect_nodes, instances_in_crop, segment
    from ..nodes.model import NodeModel, NodeModelConfig, build_node_network, load_node_model
    from ..phantom import generate_patient
    from ..runtime import limit_threads

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    limit_threads(int(threads or 1))
    t0 = time.perf_counter()
    patient = generate_patient(args.seed, args.size)
    t_phantom = time.perf_counter() - t0
    if args.model:
        model = load_node_model(args.model, device=args.device)
        weights = "given"
    else:
        config = NodeModelConfig.sized(args.arch, args.width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = build_node_network(config)
        model = NodeModel(network.to(args.device).eval(), config)
        weights = "untrained (network timing only; instances timed on the true node map)"

    runs = []
    for _ in range(1 + max(0, args.repeat)):
        t0 = time.perf_counter()
        if args.model:
            det = detect_nodes(patient.ct, model, pet=patient.pet, stations=patient.stations, device=args.device)
            seconds, grid, n_nodes = det.seconds, det.grid, len(det.nodes)
        else:
            seg = segment(patient.ct, model, stations=patient.stations, device=args.device)
            t1 = time.perf_counter()
            truth = sitk.Cast(patient.nodes > 0, sitk.sitkFloat32)
            _, nodes = instances_in_crop(truth, patient.ct, seg.crop, pet=patient.pet, stations=patient.stations)
            seconds = {**seg.seconds, "instances": time.perf_counter() - t1}
            grid, n_nodes = seg.grid, len(nodes)
        runs.append({"total_s": time.perf_counter() - t0, **seconds})
    warm = runs[1:] or runs

    def mean(key: str, items: list[dict]) -> float:
        return round(float(np.mean([r[key] for r in items])), 3)

    keys = [k for k in runs[0] if k != "total_s"]
    return {
        "data": {"patient_seed": args.seed, "size": args.size, "ct_size": list(patient.ct.GetSize()),
                 "ct_spacing": [round(s, 3) for s in patient.ct.GetSpacing()], "crop": "station map",
                 "working_grid": grid},
        "model": {"arch": model.arch, "weights": weights, "path": args.model,
                  "parameters": int(sum(p.numel() for p in model.network.parameters())),
                  "working_spacing_mm": list(model.data.spacing), "inference": model.inference.to_dict()},
        "threads": int(threads or 1), "device": args.device,
        "seconds_per_case_warm": mean("total_s", warm),
        "seconds_per_case_cold": round(runs[0]["total_s"], 3),
        "steps_warm_s": {k: mean(k, warm) for k in keys},
        "steps_cold_s": {k: round(runs[0][k], 3) for k in keys},
        "nodes_found": n_nodes,
        "phantom_s": round(t_phantom, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
