"""Cohort processing from 3D Slicer without the main window:

    Slicer --no-splash --no-main-window --python-script LymphNodeStagingBatch.py --cohort COHORT.csv --out DIR

Calls the same library function as ``lnstaging`` (LymphNodeStagingLib.batch.run_batch), so results are identical
and a run resumes per case where it stopped. Options after --out are passed on (see ``--help``).
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from LymphNodeStagingLib.errors import LNSError

    try:
        from LymphNodeStagingLib.batch import run_batch
    except ImportError as exc:
        logging.error("LymphNodeStagingLib.batch is not available: %s", exc)
        return 1
    options = {"rules": args.rules, "device": args.device, "model": args.model, "atlases": args.atlases,
               "workers": args.workers}
    try:
        summary = run_batch(args.cohort, args.out, **{k: v for k, v in options.items() if v is not None})
    except LNSError as exc:
        logging.error("%s", exc)
        return 1
    logging.info("batch finished: %s", summary)
    return 0


if __name__ == "__main__":
    code = main()
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)  # processes pending events, then leaves the application
    except ImportError:
        pass
    sys.exit(code)
