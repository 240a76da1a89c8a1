"""lnstaging train-stations: train the station network (mediastinum + 17 stations from the CT) on a cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-stations",
        help="train the station network (mediastinum and 17 stations from the CT alone) on a cohort",
        description="Train the two-head station U-Net on a cohort: the CT is cropped to the lungs (HU threshold), "
        "resampled to 4 mm and windowed; the labels are the rows' true station maps (--labels truth: stations_path) "
        "or the fused atlas maps the product computes from the rows' anatomy (--labels atlas: anatomy_path, mapped "
        "through the shared station-map store). Validation: the cohort's split column, else a seeded share of the "
        "patients. Writes best.pt (best validation station Dice), last.pt and history.json into --out; an "
        "interrupted run resumes from OUT/last.pt.",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    p.add_argument("--labels", required=True, choices=["truth", "atlas"],
                   help="truth: the cohort's stations_path; atlas: the fused atlas maps of its anatomy_path")
    options.add_out(p, help="output folder (best.pt, last.pt, history.json)")
    p.add_argument("--epochs", type=options.positive_int, default=30, help="epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the crops, the augmentation and the "
                   "weights (default 0)")
    p.add_argument("--lr", type=options.positive_float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--val-fraction", type=options.fraction, default=0.15,
                   help="share of the patients for validation when the cohort has no split column (default 0.15)")
    p.add_argument("--patch", type=options.positive_int, nargs=3, metavar=("Z", "Y", "X"),
                   help="training crop in voxels of the 4 mm grid (default 64 48 48)")
    p.add_argument("--channels", default=None, help="channels per level, e.g. 8,16,32,48 (the default)")
    options.add_atlases(p)
    options.add_map_store(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...errors import InputError, UsageError
    from ...stationnet.network import StationNetConfig
    from ...stationnet.train import StationTrainConfig, train_stations

    if not Path(args.cohort).is_file():
        raise InputError(f"cohort file {args.cohort} does not exist (expected a CSV file)")
    mconfig = StationNetConfig()
    if args.channels:
        try:
            mconfig = StationNetConfig(channels=tuple(int(c) for c in args.channels.split(",")))
        except ValueError:
            raise UsageError(f"--channels {args.channels!r}: expected whole numbers separated by commas") from None
    options.check_out(args)
    options.apply_runtime(args)
    config = StationTrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, val_fraction=args.val_fraction,
                                device=args.device.torch, num_threads=args.threads,
                                **({"patch": tuple(args.patch)} if args.patch else {}))
    res = train_stations(args.cohort, args.out, args.labels, config=config, model_config=mconfig,
                         atlases=args.atlases, store_dir=args.cache, progress=options.progress_printer(args))
    best = "-" if res.best_val_dice is None else f"{res.best_val_dice:.3f}"
    text = (f"station network ({args.labels} labels): {res.epochs_run} epochs in {res.seconds:.0f} s, best epoch "
            f"{res.best_epoch} (validation mean station Dice {best}); {res.train_cases} training and "
            f"{res.val_cases} validation scans\ncheckpoint: {res.checkpoint}")
    options.emit({"out": str(Path(args.out)), **res.to_dict()}, args.json, text)
    return 0
