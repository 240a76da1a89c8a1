"""Options shared by the subcommands, declared once so that each means the same everywhere.

``--out``, ``--device``, ``--threads``, ``--rules``, ``--atlases``, ``--model``, ``--pet-is-suv`` and ``--json``
are added by the helpers below; their values are checked while the command line is parsed (an invalid value is a
usage error, exit 2, before any work starts), as are options typed :func:`probability` or :func:`count`.
:func:`check_out` checks the --out folder before any work; :func:`apply_runtime` applies ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..io.files import check_output
from ..preflight.parameters import check_threshold
from ..runtime import DEVICE_CHOICES, Device, ProgressCallback, limit_threads, parse_device
from ..staging.rules import DEFAULT_RULES, available_rule_sets
from ..suv import SUV_MODES

PET_IS_SUV_HELP = ("whether the PET holds SUV already: declared (default: a cohort's pet_is_suv column decides; a "
                   "DICOM PET is converted from its header, an undeclared PET image file is refused), yes (a bare "
                   "--pet-is-suv: every PET holds SUV) or no (DICOM PET is converted, PET image files are refused)")


def _device(value: str) -> Device:
    try:
        return parse_device(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def _number(value: str, cast, ok, expected: str):
    """An argparse type check: ``cast(value)`` when ``ok`` of it, else an error naming what was expected."""
    try:
        x = cast(value)
    except ValueError:
        x = None
    if x is None or not ok(x):
        raise argparse.ArgumentTypeError(f"{value!r}: expected {expected}")
    return x


def positive_int(value: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    return _number(value, int, lambda n: n >= 1, "a whole number, 1 or more")


def positive_float(value: str) -> float:
    """An argparse type: a number > 0."""
    return _number(value, float, lambda x: x > 0, "a number > 0")


def fraction(value: str) -> float:
    """An argparse type: a fraction in [0, 1)."""
    return _number(value, float, lambda x: 0.0 <= x < 1.0, "a fraction in [0, 1)")


def _threads(value: str) -> int:
    return _number(value, int, lambda n: n >= 1, "a whole number of threads, 1 or more")


def probability(value: str) -> float:
    """An argparse type: a probability in [0, 1] (e.g. --threshold)."""
    try:
        return check_threshold(value, "")
    except UsageError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a probability between 0 and 1") from None


def count(value: str) -> int:
    """An argparse type: a whole number, 0 or more (e.g. --tta)."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number, 0 or more")
    return n


def _rules(value: str) -> str:
    if value in available_rule_sets() or (value.endswith(".json") and Path(value).is_file()):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected one of {', '.join(available_rule_sets())} or an existing "
                                     "rule set .json file")


def _side(value: str) -> str:
    from ..staging.rules import parse_side

    try:
        return parse_side(value, "side")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("side ")) from None


def add_side(p: argparse.ArgumentParser) -> None:
    p.add_argument("--side", required=True, type=_side, metavar="R|L",
                   help="side of the primary tumour: R or L (right, left)")


def add_out(p: argparse.ArgumentParser, *, required: bool = True, default: str | None = None,
            help: str = "output folder") -> None:
    p.add_argument("--out", required=required and default is None, default=default, metavar="DIR",
                   help=help if default is None else f"{help} (default {default})")


def check_out(args: argparse.Namespace) -> Path:
    """The --out folder of :func:`add_out`, checked writable before any work (InputError naming --out)."""
    return check_output(args.out, folder=True, parameter="--out")


def add_out_file(p: argparse.ArgumentParser, example: str) -> None:
    """The output of a command that writes one image: ``--out FILE`` (or the positional OUT of earlier versions)."""
    p.add_argument("output", type=Path, nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help=f"output image, e.g. {example}")


def out_file(args: argparse.Namespace) -> Path:
    """The output path of :func:`add_out_file` (exactly one of --out and OUT)."""
    if (args.out is None) == (args.output is None):
        raise UsageError("give the output image once, with --out FILE")
    return args.out if args.out is not None else args.output


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default=Device(), metavar="DEVICE",
                   help=f"{DEVICE_CHOICES} (default cpu; auto: a GPU when torch sees one)")


def add_threads(p: argparse.ArgumentParser, help: str = "threads of this process (default: all cores)") -> None:
    p.add_argument("--threads", type=_threads, default=None, metavar="N", help=help)


def add_rules(p: argparse.ArgumentParser, default: str | None = DEFAULT_RULES, help: str | None = None) -> None:
    names = " | ".join(available_rule_sets())
    p.add_argument("--rules", type=_rules, default=default, metavar="RULES",
                   help=help or f"N-staging rule set: {names} or a rule set .json file (default {default})")


def add_atlases(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlases", default=None, metavar="DIR",
                   help="atlas set folder (default: $LNSTAGING_ATLASES, else the synthetic demo atlas set)")


def add_station_method(p: argparse.ArgumentParser) -> None:
    """--method and --station-model: how the stations are mapped (stationnet/method.py)."""
    p.add_argument("--method", default="atlas", choices=("atlas", "network", "both"),
                   help="station mapping: atlas (registration guided by the anatomy, default), network (the station "
                        "network, from the CT alone) or both (the atlas map is used; per-station Dice between the two)")
    p.add_argument("--station-model", default=None, metavar="CHECKPOINT",
                   help="station network for --method network/both (best.pt of lnstaging train-stations; default: "
                        "the bundled one)")


def add_map_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="station-map store shared by batch, train and evaluate: a case mapped once with the same CT, "
                        "anatomy and atlas set is not registered again (default: $LNSTAGING_CACHE/station-maps)")


def add_suv_mode(p: argparse.ArgumentParser, flag: str = "--suv-mode") -> None:
    p.add_argument(flag, default="qiba", choices=SUV_MODES,
                   help="SUV conversion of a DICOM PET: qiba (default, vendor-neutral QIBA/IBSI) or gatidis (the autoPET "
                        "conversion, for comparisons)")


def add_model(p: argparse.ArgumentParser, help: str = "classifier checkpoint (default: the bundled demo model)") -> None:
    p.add_argument("--model", default=None, metavar="CHECKPOINT", help=help)


def add_pet_is_suv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pet-is-suv", nargs="?", const="yes", default="declared", choices=("declared", "yes", "no"),
                   help=PET_IS_SUV_HELP)


def add_classifier_options(p: argparse.ArgumentParser) -> None:
    """Station-classifier variants: multiple-instance bags, pooling, the hybrid head, the normalisation."""
    g = p.add_argument_group("station classifier")
    g.add_argument("--instances", type=int, default=1, metavar="K",
                   help="patches per station (multiple-instance learning; 1: one centred patch, default)")
    g.add_argument("--pooling", choices=["max", "noisy_or", "attention"], default="max",
                   help="pooling of the K patches of a station (default max)")
    g.add_argument("--hybrid", action="store_true",
                   help="the final layer also receives the station's SUVmax, SUVpeak and volume")
    g.add_argument("--norm", choices=["instance", "batch"], default="instance",
                   help="normalisation layers: instance (the paper's) or batch (keeps absolute SUV levels)")


def classifier_options(args: argparse.Namespace) -> dict:
    """ModelConfig options from :func:`add_classifier_options`."""
    return {"instances": args.instances, "pooling": args.pooling, "hybrid": args.hybrid, "norm": args.norm}


def add_modality(p: argparse.ArgumentParser) -> None:
    """--modality of a station classifier to train: PET/CT (two input channels) or the CT alone (one)."""
    p.add_argument("--modality", choices=["petct", "ct"], default="petct",
                   help="what the station classifier reads: petct (CT and PET, default) or ct (the CT alone: a "
                        "CT-only model, for assessing a CT without PET; not with --hybrid)")


def modality_options(args: argparse.Namespace) -> dict:
    """ModelConfig options from :func:`add_modality` (in_channels 1 for ct); ct with --hybrid is a UsageError."""
    if args.modality == "petct":
        return {}
    if getattr(args, "hybrid", False):
        raise UsageError("--modality ct with --hybrid: the hybrid head reads the PET's SUV figures; drop --hybrid "
                         "for a CT-only model")
    return {"in_channels": 1}


def add_compute_options(p: argparse.ArgumentParser) -> None:
    """--device, --threads and --json: what every command that computes takes."""
    add_device(p)
    add_threads(p)
    add_json(p)


def apply_runtime(args: argparse.Namespace) -> None:
    """Apply --threads (when the command has it and it was given)."""
    if getattr(args, "threads", None):
        limit_threads(args.threads)


def progress_printer(args: argparse.Namespace) -> ProgressCallback | None:
    """Progress lines on stderr, or None with --json (stdout then holds one JSON object and stderr stays quiet)."""
    if getattr(args, "json", False):
        return None
    return lambda p: print(str(p), file=sys.stderr)


def emit(obj: dict, as_json: bool, text: str | None = None) -> None:
    """Print a result: one JSON object with --json, otherwise the given text (or pretty JSON)."""
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
    else:
        sys.stdout.write((text if text is not None else json.dumps(obj, indent=2, default=str)) + "\n")
