"""Benchmark of cohort runs: cases per hour with 1 and 2 local workers on full-size phantoms (anatomy given)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..fileio import peak_memory_mb

HELP = "cases per hour of lnstaging batch with 1 and 2 workers on full-size phantoms (anatomy given)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=4, help="phantom patients (default 4)")
    parser.add_argument("--size", default="full", help="phantom size (default full)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--steps", default=None,
                        help="steps (default: all available; suv,anatomy,stations when the assess step is missing)")
    parser.add_argument("--atlases", default=None, help="atlas set (default: the bundled synthetic set)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the phantom cohort")
    parser.add_argument("--keep", default=None, help="keep the cohort and outputs in this folder")


def _default_steps() -> str:
    try:
        from ..assessment import default_model_path

        if default_model_path().is_file():
            return "suv,anatomy,stations,assess"
    except ImportError:
        pass
    return "suv,anatomy,stations"


def run(args: argparse.Namespace) -> dict:
    from ..batch import run_batch
    from ..phantom import generate_cohort

    steps = args.steps or _default_steps()
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="lns-bench-batch-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cohort = generate_cohort(root / "cohort", args.cases, seed=args.seed, size=args.size)
        gen_s = time.perf_counter() - t0
        if "stations" in steps and not args.atlases:
            from ..atlas import default_atlas_set_path

            default_atlas_set_path()  # made once, outside the timed runs
        runs = {}
        for w in workers:
            out = root / f"out_w{w}"
            t0 = time.perf_counter()
            summary = run_batch(cohort, out, workers=w, steps=steps, atlases=args.atlases)
            wall = time.perf_counter() - t0
            step_s: dict[str, list[float]] = {}
            mem = []
            for case in (out / "cases").iterdir():
                m = json.loads((case / "case.json").read_text(encoding="utf-8"))
                for s, v in m["steps"].items():
                    step_s.setdefault(s, []).append(float(v["seconds"]))
                if m.get("run", {}).get("peak_memory_mb"):
                    mem.append(float(m["run"]["peak_memory_mb"]))
            runs[f"workers_{w}"] = {
                "workers": w, "threads_per_worker": summary.parameters["threads_per_worker"],
                "wall_s": round(wall, 2), "cases": args.cases, "ok": summary.counts["ok"],
                "failed": summary.counts["failed"], "cases_per_hour": round(3600.0 * args.cases / wall, 1),
                "mean_step_s": {s: round(statistics.mean(v), 2) for s, v in step_s.items()},
                "worker_peak_memory_mb": round(max(mem), 1) if mem else None,
            }
    return {"steps": steps, "size": args.size, "cases": args.cases, "phantom_generation_s": round(gen_s, 2),
            "runs": runs, "peak_memory_mb": round(peak_memory_mb(), 1)}
