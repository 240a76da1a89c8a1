"""lnstaging validate-cohort: check a cohort CSV and report every problem with its line number."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...cohort.table import read_cohort
from ...errors import InputError
from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate-cohort",
        help="check a cohort CSV (exit 0 valid, 2 not valid)",
        description="Validate a cohort table: columns, N-stages, station names, tumour sides, files, duplicate "
        "scans. Label inconsistencies (stated N-stage vs the rules applied to the positive stations) are reported "
        "as warnings. Exit code 0 when valid, 2 when there are errors.",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    options.add_rules(p, help="rule set for the label consistency check")
    p.add_argument("--no-file-check", action="store_true", help="do not check that the image files exist")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    if not Path(args.cohort).is_file():
        raise InputError(f"cohort file {args.cohort} does not exist")
    try:
        cohort = read_cohort(args.cohort, check_files=not args.no_file_check, rules=args.rules)
    except InputError as exc:  # a table that cannot be read at all is a validation that found a problem
        print(f"lnstaging validate-cohort: NOT VALID: {exc}", file=sys.stderr)
        return 2
    summary = cohort.summary()
    lines = [
        f"{cohort.path}: {summary['rows']} rows, {summary['patients']} patients, "
        f"N-stages {summary['n_stage_counts']}",
        *[f"  {p}" for p in cohort.problems],
        f"{'VALID' if cohort.valid else 'NOT VALID'}: {summary['errors']} error(s), {summary['warnings']} warning(s)",
    ]
    options.emit(summary, args.json, "\n".join(lines))
    return 0 if cohort.valid else 2
