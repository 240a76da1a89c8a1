"""Benchmark of one case assessment: a full-size phantom, anatomy given, 5 atlases; station mapping, patches,
classification, SUV figures and staging, with the time of each step and the peak memory.

The weights are the bundled model when there is one; otherwise a randomly initialised reference network is saved
and used (the speed does not depend on the weights)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

HELP = "one full-size case (anatomy given, 5 atlases): wall time per step and peak memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=4242, help="phantom patient seed")
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--atlases", help="atlas set folder (default: the bundled synthetic set)")
    parser.add_argument("--model", help="checkpoint (default: bundled model, else a random reference network)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=2, help="assessments timed after loading (default 2)")


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..assessment.assess import assess_case
    from ..classifier.checkpoint import save_checkpoint
    from ..classifier.model import ModelConfig, build_model
    from ..io.files import peak_memory_mb
    from ..mapping.atlas import load_atlas_set
    from ..paths import demo_model_path
    from ..phantom import build_demo_atlas_set, generate_patient

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lns-bench-case-") as tmp:
        t0 = time.perf_counter()
        patient = generate_patient(args.seed, args.size)
        t_phantom = time.perf_counter() - t0
        model = args.model or (demo_model_path() if demo_model_path().is_file() else None)
        weights = "given" if args.model else ("bundled" if model else "random reference network")
        if model is None:
            cfg = ModelConfig()
            torch.manual_seed(0)
            model = save_checkpoint(Path(tmp) / "random.pt", build_model("station", cfg),
                                    {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
        t0 = time.perf_counter()
        atlas_path = args.atlases or build_demo_atlas_set()
        atlas_set = load_atlas_set(atlas_path)
        t_atlas_load = time.perf_counter() - t0
        runs = []
        result = None
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            res = assess_case(patient.ct, patient.pet, patient.truth["tumour_side"], anatomy=patient.anatomy,
                              model=model, atlases=atlas_set, device=args.device, case_id=patient.patient_id)
            runs.append({"total_s": round(time.perf_counter() - t0, 3), **res.result.timings_s})
            result = res.result
        best = min(runs, key=lambda r: r["total_s"])
        return {
            "case": {"size": args.size, "seed": args.seed, "ct_size": list(patient.ct.GetSize()),
                     "pet_size": list(patient.pet.GetSize()), "atlases": len(atlas_set), "weights": weights,
                     "device": args.device, "torch_threads": torch.get_num_threads()},
            "phantom_generation_s": round(t_phantom, 3),
            "atlas_set_load_s": round(t_atlas_load, 3),
            "first_run": runs[0],
            "best_run": best,
            "total_s_best": best["total_s"],
            "n_stage": result.n_stage if result else None,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "paper_s_same_steps": 698.0,
        }
