"""lnstaging train-node-classifier: the node malignancy classifier from a cohort's station labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-node-classifier",
        help="train the node malignancy classifier from station labels (multiple-instance learning)",
        description="Detect the lymph nodes of every scan of a cohort (node model, inside the fused station map), "
        "cut a 32 mm patch per node (CT, the node's mask and, unless --modality ct, the PET) and train the node "
        "classifier from the cohort's station labels (positive_stations; N-stage group pseudo-labels where the "
        "stations are unknown): a benign station's nodes are pushed towards benign, a malignant station only while "
        "all its nodes look benign, through its most suspicious one. Validation rows as in `lnstaging train`; the "
        "calibration of the station probabilities, the prior of node-less stations and the threshold are fitted on "
        "them. Writes OUT/best.pt (+ .json) and OUT/history.json.",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    options.add_out(p, help="output folder (checkpoint, history, node cache)")
    p.add_argument("--modality", choices=["petct", "ct"], default="petct",
                   help="petct: CT, mask and PET channels (default); ct: CT and mask only (CT-only mode)")
    p.add_argument("--node-model", metavar="CKPT", help="node segmentation model (default: the bundled one)")
    p.add_argument("--epochs", type=options.positive_int, default=20)
    p.add_argument("--lr", type=options.positive_float, default=1e-3)
    p.add_argument("--pos-weight", type=options.positive_float, default=10.0,
                   help="weight of a malignant station's loss term (default 10)")
    p.add_argument("--pooling", choices=["max", "noisy_or"], default="max",
                   help="station probability from its nodes: max (default) or noisy-OR")
    p.add_argument("--patch-spacing", type=options.positive_float, default=2.0,
                   help="mm per voxel of the 32 mm node patch (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=options.fraction, default=0.2)
    options.add_map_store(p)
    options.add_atlases(p)
    options.add_rules(p, default=None, help="rule set of the N-stage pseudo-labels (default ajcc8)")
    options.add_pet_is_suv(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...training.node_cases import train_node_classifier_from_cohort

    options.check_out(args)
    options.apply_runtime(args)
    res = train_node_classifier_from_cohort(
        args.cohort, args.out, node_model=args.node_model, modality=args.modality, epochs=args.epochs,
        pos_weight=args.pos_weight, patch_spacing=args.patch_spacing, pooling=args.pooling, lr=args.lr,
        seed=args.seed, val_fraction=args.val_fraction, atlases=args.atlases, cache_dir=args.cache,
        pet_is_suv=args.pet_is_suv, device=args.device, rules=args.rules, progress=options.progress_printer(args))
    d = {"out": str(Path(args.out)), "checkpoint": str(res.checkpoint), "best_epoch": res.best_epoch,
         "epochs_run": res.epochs_run, "metrics": res.metrics, "seconds": round(res.seconds, 1)}
    text = (f"node classifier ({args.modality}): best epoch {res.best_epoch} of {res.epochs_run}, validation "
            f"station AUC {res.metrics.get('val_station_auc', float('nan')):.3f}\ncheckpoint: {res.checkpoint}")
    options.emit(d, args.json, text)
    return 0
