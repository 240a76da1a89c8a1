"""lnstaging evaluate: cross-validated evaluation of TS1/TS2/TS3 and the baselines, with ablations and a report."""

from __future__ import annotations

import argparse

from .. import options


def _list(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="cross-validate methods on a cohort and write a report (tables, tests, confusion matrices)",
        description="Patient-level stratified k-fold cross-validation of the chosen methods on a cohort CSV: per "
        "fold, training (TS1/TS2/TS3) on the training patients with model selection on the validation patients, "
        "predictions on the test patients, then metrics per fold and mean +- sd, pooled bootstrap CIs, paired "
        "tests against TS1, confusion matrices and report.md. The split file OUT/split.json is written once and "
        "reused; every finished step is reused, so an interrupted run resumes. With --model, a trained model is "
        "tested on the whole cohort instead.",
    )
    p.add_argument("cohort", metavar="COHORT.csv")
    options.add_out(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--strategy", default="ts1,threshold",
                   help="methods, comma-separated or 'all': ts1, ts2, ts3, threshold (station SUVmax), lesion (lesion "
                   "mask overlap; needs lesion_path), nodes-mil (node classifier trained from station labels), fusion "
                   "(station CNN + node classifier), short-axis (a node's short axis >= 10 mm), node-suvmax (a node's "
                   "SUVmax >= 2.5), node-combined (either) (default ts1,threshold)")
    p.add_argument("--modality", choices=["petct", "ct", "both"], default="petct",
                   help="petct (default), ct (every learned method trained and tested without the PET; methods that "
                   "need the PET are left out) or both (each learned method twice; the CT-only rows end in -ct)")
    p.add_argument("--node-model", metavar="CKPT",
                   help="node segmentation model of the node methods (default: the bundled one)")
    p.add_argument("--node-epochs", type=options.positive_int, default=20, help="node classifier epochs (default 20)")
    p.add_argument("--node-patch-spacing", type=options.positive_float, default=2.0,
                   help="mm per voxel of the 32 mm node patches (default 2)")
    p.add_argument("--node-pos-weight", type=options.positive_float, default=10.0,
                   help="weight of a malignant station's term in the node classifier's loss (default 10)")
    p.add_argument("--ablation", action="append", default=[],
                   help="centroid (TS1 on fixed centroid patches), no-pseudo (TS2 without pseudo-label loss), "
                   "rules (TS1 staged with the other rule set), atlases=K (TS1 on maps from K atlases), and the TS1 "
                   "variants mil-max, mil-noisy-or, mil-attention (--mil-instances patches per station), hybrid "
                   "(+ SUVmax, SUVpeak, volume), batchnorm (keeps SUV levels), combined with '+' "
                   "(e.g. mil-attention+hybrid); repeat or comma-separate")
    p.add_argument("--mil-instances", type=int, default=4, metavar="K",
                   help="patches per station of the mil-* ablations (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the training runs")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of each fold's non-test patients used for validation (default 0.25: 60/20/20)")
    p.add_argument("--reference", choices=["labels", "truth"], default="labels",
                   help="reference labels: the cohort's (default) or the true_* columns of a phantom cohort")
    options.add_rules(p)
    options.add_model(p, help="test this checkpoint on every scan of the cohort (no folds, no training)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--ts23-epochs", type=int, help="epochs of TS2/TS3 (default: --epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--ts23-batch-size", type=int, help="TS2/TS3 patients per batch (default: --batch-size)")
    p.add_argument("--ts23-steps", type=int, help="TS2/TS3 steps per epoch (default: --max-steps-per-epoch)")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--small", action="store_true", help="the small network (32^3 patches at 2 mm)")
    p.add_argument("--patch-spacing", type=float)
    options.add_classifier_options(p)
    options.add_atlases(p)
    options.add_map_store(p)
    options.add_pet_is_suv(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CIs")
    p.add_argument("--permutations", type=int, default=10000, help="permutations of the N-stage test")
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...evaluation.crossval import BASE_METHODS, EvaluationConfig, evaluate_model, run_evaluation

    options.check_out(args)
    options.apply_runtime(args)
    methods = list(BASE_METHODS) if args.strategy.strip().lower() == "all" else _list(args.strategy)
    ablations = [a for text in args.ablation for a in _list(text)]
    config = EvaluationConfig(
        folds=args.folds if not args.model else 1, seed=args.seed, val_fraction=args.val_fraction,
        methods=tuple(methods), ablations=tuple(ablations), reference=args.reference, rules=args.rules,
        epochs=args.epochs, ts23_epochs=args.ts23_epochs, batch_size=args.batch_size,
        max_steps_per_epoch=args.max_steps_per_epoch, ts23_batch_size=args.ts23_batch_size,
        ts23_max_steps=args.ts23_steps, augment=not args.no_augment, lr=args.lr, small=args.small, patch_spacing=args.patch_spacing,
        device=args.device.torch, pet_is_suv=args.pet_is_suv, n_boot=args.bootstrap,
        n_permutations=args.permutations, model=options.classifier_options(args),
        mil_instances=args.mil_instances,
        modalities=("petct", "ct") if args.modality == "both" else (args.modality,), node_model=args.node_model,
        node_epochs=args.node_epochs, node_patch_spacing=args.node_patch_spacing,
        node_pos_weight=args.node_pos_weight)
    show = options.progress_printer(args)
    if args.model:
        res = evaluate_model(args.cohort, args.model, args.out, config, atlases=args.atlases, cache_dir=args.cache,
                             progress=show)
    else:
        res = run_evaluation(args.cohort, args.out, config, atlases=args.atlases, cache_dir=args.cache,
                             progress=show)
    text = res.files["report"].read_text()
    options.emit(res.to_dict(), args.json, text)
    return 0
