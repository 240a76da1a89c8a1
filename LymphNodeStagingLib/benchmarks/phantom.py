"""Benchmark of the phantom generator: wall time per stage of one small and one full-size patient, peak memory;
optionally the statistics of a generated cohort (--cohort-stats N)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

HELP = "phantom generator: seconds per small / full patient (+ --cohort-stats N for cohort statistics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=1, help="patient seed (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="small patients to time (default 3)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-size patient")
    parser.add_argument("--cohort-stats", type=int, default=0, metavar="N",
                        help="also generate N small patients and report N-stage mix, SUVmax and AUC statistics")


def run(args: argparse.Namespace) -> dict:
    from ..io.files import peak_memory_mb
    from ..phantom import generate_patient, write_patient

    out: dict = {}
    generate_patient(args.seed, "small")  # warm-up (imports, caches)
    times = []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        generate_patient(args.seed + i, "small")
        times.append(time.perf_counter() - t0)
    out["small_generate_s"] = {"min": round(min(times), 3), "max": round(max(times), 3),
                               "mean": round(sum(times) / len(times), 3)}
    with tempfile.TemporaryDirectory() as tmp:
        p = generate_patient(args.seed, "small")
        t0 = time.perf_counter()
        write_patient(p, Path(tmp) / "small")
        out["small_write_nifti_s"] = round(time.perf_counter() - t0, 3)
        out["small_ct_size"] = list(p.ct.GetSize())
        if not args.no_full:
            t0 = time.perf_counter()
            p = generate_patient(args.seed, "full")
            out["full_generate_s"] = round(time.perf_counter() - t0, 3)
            out["full_ct_size"] = list(p.ct.GetSize())
            out["full_pet_size"] = list(p.pet.GetSize())
            t0 = time.perf_counter()
            write_patient(p, Path(tmp) / "full")
            out["full_write_nifti_s"] = round(time.perf_counter() - t0, 3)
    if args.cohort_stats:
        from ..phantom.stats import cohort_stats

        t0 = time.perf_counter()
        out["cohort_stats"] = cohort_stats(args.cohort_stats, seed=args.seed)
        out["cohort_stats_s"] = round(time.perf_counter() - t0, 3)
    out["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return out
