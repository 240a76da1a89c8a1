"""lnstaging stage: the N-stage of a list of positive stations for a tumour side."""

from __future__ import annotations

import argparse

from ...staging.rules import load_rules, parse_side
from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="N-stage from positive stations and tumour side",
        description="Derive the N-stage (AJCC 8th) and the TNM 9th-edition N category from the positive "
        "lymph node stations and the side of the primary tumour, with the stations that decided it.",
    )
    p.add_argument("stations", nargs="*", metavar="STATION", help="positive stations, e.g. 4R 7 10L (none: N0)")
    options.add_side(p)
    options.add_rules(p)
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    stations = [s for arg in args.stations for s in arg.replace(",", ";").split(";") if s.strip()]
    result = load_rules(args.rules).stage(stations, parse_side(args.side, "--side"))
    options.emit(result.to_dict(), args.json, result.explanation())
    return 0
