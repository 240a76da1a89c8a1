"""lnstaging train-nodes: train the node network (S-Net or 3D U-Net) on a cohort with node masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-nodes",
        help="train the lymph node network (S-Net or 3D U-Net) on a cohort with node masks",
        description="Train a node segmentation network on the cohort rows that have a nodes_path (node instance map "
        "or binary mask on the CT grid; rows without one are skipped and counted). The CT is cropped around the "
        "row's station map (else its anatomy), resampled to the working spacing and windowed 40/400 HU. Validation: "
        "the cohort's split column (val/validation; test rows are left out), else a seeded share of the patients. "
        "Writes best.pt (best validation Dice, threshold tuned on the validation patients), last.pt and "
        "history.json into --out; an interrupted run resumes from OUT/last.pt.",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    p.add_argument("--arch", required=True, choices=["snet", "unet3d"],
                   help="snet: 2D S-Net on axial slices; unet3d: 3D residual U-Net on patches")
    options.add_out(p, help="output folder (best.pt, last.pt, history.json)")
    p.add_argument("--epochs", type=options.positive_int, default=150, help="at most this many epochs (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the sampling and the weights (default 0)")
    p.add_argument("--lr", type=options.positive_float, help="learning rate (default 5e-5 for snet, 1e-3 for unet3d)")
    p.add_argument("--val-fraction", type=options.fraction, default=0.2,
                   help="share of the patients for validation when the cohort has no split column (default 0.2)")
    p.add_argument("--batch-size", type=options.positive_int, help="slices (snet, default 16) or patches (unet3d, default 2)")
    p.add_argument("--width", type=options.positive_float, default=1.0,
                   help="scale of every channel count (default 1: the published network; 0.25: a quick CPU network)")
    p.add_argument("--spacing", type=options.positive_float, nargs=3, metavar=("X", "Y", "Z"),
                   help="working spacing in mm (default 2 2 4)")
    p.add_argument("--min-inplane", type=options.positive_int, default=128,
                   help="smallest in-plane size of the crop in voxels (default 128)")
    p.add_argument("--patch", type=options.positive_int, nargs=3, metavar=("Z", "Y", "X"),
                   help="unet3d training patch and sliding window in voxels (default 32 96 96)")
    p.add_argument("--patience", type=options.positive_int, default=30,
                   help="stop after this many epochs without a better validation Dice (default 30)")
    p.add_argument("--max-steps-per-epoch", type=options.positive_int, help="cap the batches of an epoch")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on a GPU (default on; no effect on a CPU)")
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...errors import UsageError
    from ...nodes.data import NodeDataConfig
    from ...nodes.model import DEFAULT_PATCH, NodeModelConfig
    from ...nodes.train import NodeTrainConfig, train_nodes

    if not Path(args.cohort).is_file():
        from ...errors import InputError

        raise InputError(f"cohort file {args.cohort} does not exist (expected a CSV file)")
    options.check_out(args)
    options.apply_runtime(args)
    data = NodeDataConfig(**({"spacing": tuple(args.spacing)} if args.spacing else {}),
                          min_inplane=args.min_inplane)
    if args.patch and args.arch != "unet3d":
        raise UsageError("--patch is the unet3d patch; snet trains on whole axial slices")
    config = NodeTrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, val_fraction=args.val_fraction,
                             batch_size=args.batch_size, patch=tuple(args.patch) if args.patch else DEFAULT_PATCH,
                             early_stopping_patience=args.patience, max_steps_per_epoch=args.max_steps_per_epoch,
                             device=args.device.torch, amp=args.amp)
    res = train_nodes(args.cohort, args.out, arch=args.arch, data_config=data, config=config,
                      model_config=NodeModelConfig.sized(args.arch, args.width),
                      progress=options.progress_printer(args))
    d = res.to_dict()
    best = "-" if res.best_val_dice is None else f"{res.best_val_dice:.3f}"
    m = res.metrics.get(">=5mm", {}) if res.metrics else {}
    extra = ""
    if m:
        ar, od = m.get("average_recall"), m.get("object_dice")
        extra = (f"\nvalidation, nodes >= 5 mm: average recall {'-' if ar is None else f'{ar:.3f}'}, object Dice "
                 f"{'-' if od is None else f'{od:.3f}'}")
    skipped = d["skipped_without_nodes"]
    text = (f"{args.arch}: {res.epochs_run} epochs ({res.seconds_per_epoch or 0:.1f} s each), best epoch "
            f"{res.best_epoch} (validation Dice {best}), threshold {res.threshold:.2f}; {res.train_cases} training "
            f"and {res.val_cases} validation scans" + (f", {skipped} rows without nodes_path skipped" if skipped else "")
            + extra + f"\ncheckpoint: {res.checkpoint}")
    options.emit({"out": str(Path(args.out)), **d}, args.json, text)
    return 0
