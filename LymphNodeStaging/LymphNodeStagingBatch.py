"""Cohort processing from 3D Slicer without the main window:

    Slicer --no-splash --no-main-window --python-script LymphNodeStagingBatch.py --cohort COHORT.csv --out DIR

Calls the same library function as ``lnstaging batch`` (LymphNodeStagingLib.batch.run.run_batch), so results are
identical and a run resumes per case where it stopped. Options after --out are passed on (see ``--help``).
``run(argv)`` parses the options and returns the run's summary (tested without Slicer); ``main`` logs it and gives
the exit status: 0 when every case is complete, 1 when a case failed or the options are wrong.
"""

import argparse
import logging
import sys
from pathlib import Path

for _candidate in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if (_candidate / "LymphNodeStagingLib").is_dir() and str(_candidate) not in sys.path:
        sys.path.insert(0, str(_candidate))
        break


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="LymphNodeStagingBatch", description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", required=True, help="cohort CSV (see README, 'Cohort table')")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per case; resumable)")
    parser.add_argument("--rules", default="ajcc8", help="N-staging rule set (default ajcc8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="classifier checkpoint (default: bundled demo model)")
    parser.add_argument("--atlases", default=None, help="atlas set folder (default: bundled synthetic atlases)")
    parser.add_argument("--workers", type=int, default=1, help="parallel cases")
    parser.add_argument("--steps", default=None,
                        help="comma-separated steps among suv,anatomy,stations,assess (default all)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / workers)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed cases again")
    parser.add_argument("--pet-is-suv", default="declared", choices=("declared", "yes", "no"),
                        help="declared (default): the cohort's pet_is_suv column decides, undeclared PET image files "
                             "fail; yes: every PET holds SUV; no: none does (as lnstaging batch --pet-is-suv)")
    return parser.parse_args(argv)


def run(argv):
    """Parse the options and run the cohort; returns run_batch's BatchSummary (raises LNSError on bad input)."""
    args = parse_args(argv)
    from LymphNodeStagingLib.batch.run import run_batch

    options = {"rules": args.rules, "device": args.device, "model": args.model, "atlases": args.atlases,
               "workers": args.workers, "pet_is_suv": args.pet_is_suv}
    options.update({"steps": args.steps, "threads_per_worker": args.threads, "retry_failed": args.retry_failed})
    return run_batch(args.cohort, args.out, **{k: v for k, v in options.items() if v is not None})


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from LymphNodeStagingLib.errors import LNSError

    try:
        summary = run(sys.argv[1:] if argv is None else argv)
    except LNSError as exc:
        logging.error("%s", exc)
        return 1
    counts, now = summary.counts, summary.this_run
    logging.info("%d ok, %d failed, %d pending (%d run now, %d reused) in %.1f s; summary: %s", counts["ok"],
                 counts["failed"], counts["pending"], now["computed"], now["reused"], summary.wall_s,
                 summary.files.get("summary_csv"))
    for row in summary.failed:
        logging.error("failed %s at %s: %s", row["scan_id"], row.get("error_step"), row.get("error"))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    code = main()
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)  # processes pending events, then leaves the application
    except ImportError:
        pass
    sys.exit(code)
