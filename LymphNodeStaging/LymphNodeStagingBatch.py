"""Cohort processing from 3D Slicer without the main window:

    Slicer --no-splash --no-main-window --python-script LymphNodeStagingBatch.py COHORT.csv --out DIR [options]

The arguments are those of ``lnstaging batch`` (``--help`` lists them): this script hands them to the command
line's batch command, so results are identical and a run resumes per case where it stopped. The exit status is the
command line's: 0 when every case is complete, 1 when a case failed or the input is unusable, 2 for a usage error.
"""

import sys
from pathlib import Path

for _candidate in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if (_candidate / "LymphNodeStagingLib").is_dir():
        if str(_candidate) not in sys.path:
            sys.path.insert(0, str(_candidate))
        break


def main(argv: list[str] | None = None) -> int:
    """Run ``lnstaging batch`` with these arguments; returns its exit status (argparse's for --help or bad
    options)."""
    from LymphNodeStagingLib.cli.main import main as lnstaging

    try:
        return lnstaging(["batch", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:  # --help, or options argparse refuses
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


if __name__ == "__main__":
    code = main()
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)  # processes pending events, then leaves the application
    except ImportError:
        pass
    sys.exit(code)
