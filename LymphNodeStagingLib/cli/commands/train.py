"""lnstaging train: train TS1, TS2 or TS3 on a cohort (station maps cached per case)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the classifier (TS1/TS2/TS3) on a cohort CSV",
        description="Train on a cohort. Validation rows: the cohort's split column (val/validation; test rows are "
        "left out), else a stratified patient-level 20 %% share. Station maps are cached (OUT/cases or --cache) so "
        "a second run skips the registration. An interrupted run resumes from OUT/last.pt. With --modality ct the "
        "station classifier reads the CT alone (a CT-only model: `lnstaging assess` without --pet needs one).",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    p.add_argument("--strategy", required=True, choices=["ts1", "ts2", "ts3"])
    options.add_out(p, help="output folder (checkpoints, history, case cache)")
    p.add_argument("--init", help="checkpoint to start from (TS2/TS3: the TS1 model of the same data)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--sampling", choices=["weight_map", "centroid"], default="weight_map",
                   help="patch centres in training: drawn from the weight map (default) or the fixed centroid")
    p.add_argument("--no-pseudo-loss", action="store_true", help="TS2/TS3 without the pseudo-label loss")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--small", action="store_true",
                   help="the small network: 32^3 patches at 2 mm (the same 64 mm field of view), fast on a CPU")
    p.add_argument("--patch-spacing", type=float, help="patch voxel size in mm (default: the network's)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on a GPU (default on; no effect on a CPU)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading processes that cut the patches while the GPU trains (default 0)")
    options.add_classifier_options(p)
    options.add_modality(p)
    options.add_map_store(p)
    options.add_atlases(p)
    options.add_rules(p, default=None, help="rule set for validation N-staging (default: the model's)")
    options.add_pet_is_suv(p)
    p.add_argument("--val-fraction", type=float, default=0.2)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...training.from_cohort import train_from_cohort

    options.check_out(args)
    model_options = {**options.classifier_options(args), **options.modality_options(args)}
    options.apply_runtime(args)
    res = train_from_cohort(
        args.cohort, args.out, strategy=args.strategy, init=args.init, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, sampling=args.sampling,
        pseudo_loss=not args.no_pseudo_loss, max_steps_per_epoch=args.max_steps_per_epoch, small=args.small,
        atlases=args.atlases, rules=args.rules, pet_is_suv=args.pet_is_suv, val_fraction=args.val_fraction,
        device=args.device, progress=options.progress_printer(args), patch_spacing=args.patch_spacing,
        cache_dir=args.cache, model_options=model_options, amp=args.amp, workers=args.workers)
    d = res.to_dict()
    text = (f"{args.strategy}: {res.epochs_run} epochs, best epoch {res.best_epoch} "
            f"(validation {res.best_metric:.3f}), threshold {res.threshold:.2f}\ncheckpoint: {res.checkpoint}")
    options.emit({"out": str(Path(args.out)), **d}, args.json, text)
    return 0
