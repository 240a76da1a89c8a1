"""Benchmark of cohort runs: cases per hour of the whole job (suv, anatomy, stations, assess) with 1 and 2 local
workers on full-size phantoms (anatomy given).

Each worker count runs the same phantom cohort into a fresh output folder, so nothing is reused. The per-step
seconds come from the case manifests (``case.json``); the peak memory of each worker process is the largest
``run.peak_memory_mb`` of the cases it ran, and the largest over all worker processes is also read from
``resource.getrusage(RUSAGE_CHILDREN)``. The load average of the machine before and after each run shows how much
other work shared the CPU.

The classifier is the bundled model when there is one (or ``--model``); otherwise a randomly initialised network of
the default configuration is saved and used, which has the speed of a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import UsageError
from ..io.files import peak_memory_mb

HELP = "cases per hour of lnstaging batch (all steps incl. assess) with 1 and 2 workers on full-size phantoms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=4, help="phantom patients (default 4)")
    parser.add_argument("--size", default="full", choices=("small", "full"), help="phantom size (default full)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker (default: the machine's cores divided by the worker count)")
    parser.add_argument("--steps", default=None, help="steps (default all: suv,anatomy,stations,assess)")
    parser.add_argument("--model", default=None,
                        help="classifier checkpoint (default: the bundled model, else a random network)")
    parser.add_argument("--atlases", default=None, help="atlas set (default: the bundled synthetic set)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the phantom cohort")
    parser.add_argument("--keep", default=None, help="keep the cohort and outputs in this folder")


def _model(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """(checkpoint path, where its weights come from)."""
    from ..paths import demo_model_path

    if args.model:
        return str(args.model), "given"
    if demo_model_path().is_file():
        return str(demo_model_path()), "bundled"
    import torch

    from ..classifier.checkpoint import save_checkpoint
    from ..classifier.model import ModelConfig, build_model

    cfg = ModelConfig()
    torch.manual_seed(0)
    path = save_checkpoint(folder / "random.pt", build_model("station", cfg),
                           {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    return str(path), "random network of the default configuration (no bundled model)"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run_stats(out: Path) -> dict:
    """Per-step mean seconds per case and peak memory per worker process, from the case manifests."""
    step_s: dict[str, list[float]] = {}
    per_worker: dict[str, float] = {}
    case_s = []
    for case in sorted((out / "cases").iterdir()):
        manifest = case / "case.json"
        if not manifest.is_file():
            continue
        m = json.loads(manifest.read_text(encoding="utf-8"))
        for s, v in (m.get("steps") or {}).items():
            if not v.get("cached"):
                step_s.setdefault(s, []).append(float(v["seconds"]))
        run = m.get("run") or {}
        if run.get("seconds") is not None:
            case_s.append(float(run["seconds"]))
        if run.get("peak_memory_mb"):
            who = f"{run.get('host', '')}:{run.get('pid', '')}"
            per_worker[who] = max(per_worker.get(who, 0.0), float(run["peak_memory_mb"]))
    return {
        "mean_step_s": {s: round(statistics.mean(v), 2) for s, v in step_s.items()},
        "mean_case_s": round(statistics.mean(case_s), 2) if case_s else None,
        "worker_peak_memory_mb": sorted(round(v, 1) for v in per_worker.values()),
    }


def run(args: argparse.Namespace) -> dict:
    from ..batch.run import parse_steps, run_batch
    from ..phantom import generate_cohort

    if args.cases < 1:
        raise UsageError(f"--cases {args.cases}: expected 1 or more")
    steps = parse_steps(args.steps)
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="lns-bench-batch-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cohort = generate_cohort(root / "cohort", args.cases, seed=args.seed, size=args.size)
        gen_s = time.perf_counter() - t0
        model, weights = _model(args, root) if "assess" in steps else (None, None)
        atlases = args.atlases
        if "stations" in steps and not atlases:
            from ..phantom import build_demo_atlas_set

            atlases = str(build_demo_atlas_set())  # made once, outside the timed runs
        runs = {}
        for w in workers:
            out = root / f"out_w{w}"
            load_before = _load()
            t0 = time.perf_counter()
            summary = run_batch(cohort, out, workers=w, steps=steps, atlases=atlases, model=model,
                                device=args.device, threads_per_worker=args.threads)
            wall = time.perf_counter() - t0
            ok = summary.counts["ok"]
            runs[f"workers_{w}"] = {
                "workers": w, "threads_per_worker": summary.parameters["threads_per_worker"],
                "wall_s": round(wall, 2), "cases": args.cases, "ok": ok, "failed": summary.counts["failed"],
                "cases_per_hour": round(3600.0 * ok / wall, 1),
                **_run_stats(out),
                "children_peak_memory_mb_so_far": round(
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
                "load_average_before": load_before, "load_average_after": _load(),
                "failures": [f"{r['scan_id']} at {r['error_step']}: {r['error']}" for r in summary.failed],
            }
    result = {"steps": steps, "size": args.size, "cases": args.cases, "device": args.device, "cores": cores,
              "model_weights": weights, "phantom_generation_s": round(gen_s, 2), "runs": runs,
              "peak_memory_mb": round(peak_memory_mb(), 1), "load_average": _load()}
    if "workers_1" in runs and "workers_2" in runs and runs["workers_1"]["cases_per_hour"]:
        result["speedup_2_vs_1"] = round(runs["workers_2"]["cases_per_hour"] / runs["workers_1"]["cases_per_hour"], 2)
    return result
