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
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import Cancelled, LNSError, UsageError
from . import commands as commands_pkg

#: Order of the subcommands in --help; every module in ``commands/`` with a ``register`` function is a subcommand.
COMMAND_ORDER: tuple[str, ...] = (
    "demo", "stage", "validate_cohort", "phantom", "suv", "anatomy", "map", "assess", "nodes",
    "train", "train_nodes", "train_node_classifier", "train_stations", "calibrate", "evaluate", "evaluate_nodes", "batch", "bench",
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
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(f"{__package__}.commands.{name}")
        module.register(sub)
    return parser


def _fail(command: str, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"lnstaging {command}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed work or invalid data, 2 usage error or a validation
    with problems, 130 interrupted). Errors are one line on stderr; ``--debug`` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
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
    command = args.command
    try:
        return int(args.func(args) or 0)
    except (Cancelled, KeyboardInterrupt):
        print(f"lnstaging {command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        return _fail(command, str(exc), 2, debug)
    except LNSError as exc:
        return _fail(command, str(exc), 1, debug)
    except MemoryError:
        return _fail(command, "out of memory; use smaller inputs, fewer workers or a machine with more memory", 1,
                     debug)
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return _fail(command, f"{exc.strerror or exc}{where}", 1, debug)
    except Exception as exc:  # noqa: BLE001 - a bug must not reach the user as a traceback
        return _fail(command, f"unexpected failure ({type(exc).__name__}: {exc}); run again with --debug for the "
                     "traceback and report it", 1, debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
