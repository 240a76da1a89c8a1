"""The ``lnstaging`` command line: one entry point, one module per subcommand in ``commands/``.

Conventions for every subcommand: ``--json`` prints exactly one JSON object on stdout; human-readable text
otherwise; errors go to stderr with a non-zero exit code (1 for bad input or failed work, 2 for usage errors
and for validations that found problems).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import Cancelled, LNSError, UsageError
from . import commands as commands_pkg

#: Order of the subcommands in --help; every module in ``commands/`` with a ``register`` function is a subcommand.
COMMAND_ORDER: tuple[str, ...] = (
    "demo", "stage", "validate_cohort", "phantom", "suv", "anatomy", "map", "assess",
    "train", "evaluate", "batch", "bench",
)


def command_modules() -> list[str]:
    """Names of the subcommand modules, in COMMAND_ORDER first, then alphabetically."""
    found = [m.name for m in pkgutil.iter_modules(commands_pkg.__path__) if not m.name.startswith("_")]
    rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
    return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lnstaging",
        description="Mediastinal lymph node station assessment and N-staging on FDG PET/CT.",
    )
    parser.add_argument("--version", action="version", version=f"lnstaging {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(f"{__package__}.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0): a return code, as for every command
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (Cancelled, KeyboardInterrupt):
        print(f"lnstaging {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"lnstaging {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except LNSError as exc:
        print(f"lnstaging {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
