"""lnstaging batch: run the pipeline over every row of a cohort CSV (resumable, parallel, Dask for clusters)."""

from __future__ import annotations

import argparse
import sys

from ...runtime import Progress
from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="assess every scan of a cohort CSV (resumable, parallel workers, Dask clusters)",
        description="Run the steps suv, anatomy, stations and assess for every row of a cohort CSV. Each case gets "
        "a folder with each step's cached result and a manifest; a rerun skips complete cases and recomputes only "
        "the steps whose parameters changed. Writes summary.csv, summary.json and report.png into --out.",
    )
    p.add_argument("cohort", help="cohort CSV (see lnstaging validate-cohort)")
    options.add_out(p, help="output folder (one sub-folder per case)")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes (default 1; 0 = in this process); with --scheduler local: the "
                        "number of Dask workers")
    options.add_threads(p, help="threads per worker (default: the machine's cores divided by --workers)")
    options.add_device(p)
    options.add_model(p)
    options.add_atlases(p)
    options.add_map_store(p)
    options.add_station_method(p)
    p.add_argument("--steps", default=None,
                   help="comma-separated steps among suv,anatomy,stations,assess (default all; the steps they "
                        "depend on are added)")
    p.add_argument("--scheduler", default=None,
                   help="Dask scheduler address (tcp://host:port), or 'local' for a Dask LocalCluster")
    p.add_argument("--retry-failed", action="store_true", help="run failed cases again")
    options.add_rules(p)
    options.add_pet_is_suv(p)
    options.add_suv_mode(p)
    p.add_argument("--iterations", default=None,
                   help="deformable registration iterations per level, e.g. 60,40 (default: the library's)")
    p.add_argument("--affine-iterations", type=int, default=None, help="affine registration iterations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    options.add_json(p)
    p.set_defaults(func=run)


def _progress_bar(enabled: bool):
    """A tqdm bar on stderr fed by run_batch's progress (cases done of the total)."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    state: dict = {}

    def report(p: Progress) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=int(p.total), initial=int(p.done), unit="case", file=sys.stderr,
                                dynamic_ncols=True)
            return
        bar = state["bar"]
        bar.update(max(0, int(p.done) - bar.n))
        bar.set_postfix_str(p.message, refresh=True)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return report, close


def run(args: argparse.Namespace) -> int:
    from ...batch.run import run_batch
    from ...errors import UsageError

    options.check_out(args)
    registration: dict = {}
    if args.iterations:
        try:
            registration["iterations"] = [int(v) for v in args.iterations.split(",")]
        except ValueError:
            raise UsageError(f"--iterations {args.iterations!r}: expected integers separated by commas") from None
    if args.affine_iterations is not None:
        registration["affine_iterations"] = args.affine_iterations
    report, close = _progress_bar(not args.no_progress and sys.stderr.isatty())
    try:
        summary = run_batch(args.cohort, args.out, workers=args.workers, device=args.device.torch, model=args.model,
                            atlases=args.atlases, steps=args.steps, scheduler=args.scheduler,
                            retry_failed=args.retry_failed, rules=args.rules, progress=report,
                            threads_per_worker=args.threads, pet_is_suv=args.pet_is_suv,
                            suv_mode=args.suv_mode, registration=registration, map_store=args.cache,
                            method=args.method, station_model=args.station_model)
    finally:
        close()
    obj = {"out": str(summary.out_dir), "counts": summary.counts, "this_run": summary.this_run,
           "wall_s": summary.wall_s, "files": {k: str(v) for k, v in summary.files.items()},
           "failures": [{"scan_id": r["scan_id"], "step": r["error_step"], "error": r["error"]}
                        for r in summary.failed],
           "parameters": summary.parameters}
    c, r = summary.counts, summary.this_run
    lines = [f"{c['ok']} ok, {c['failed']} failed, {c['pending']} pending ({r['computed']} run now, "
             f"{r['reused']} reused) in {summary.wall_s:.1f} s",
             f"summary: {summary.files['summary_csv']}", f"report:  {summary.files['report_png']}"]
    for f in obj["failures"]:
        lines.append(f"  failed {f['scan_id']} at {f['step']}: {f['error']}")
    options.emit(obj, args.json, "\n".join(lines))
    return 1 if summary.counts["failed"] else 0
