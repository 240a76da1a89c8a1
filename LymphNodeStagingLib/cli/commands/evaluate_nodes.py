"""lnstaging evaluate-nodes: node detection metrics of a node model on a cohort with node masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-nodes",
        help="evaluate a node model on a cohort with node masks: FROC, average recall, object/voxel/slice Dice",
        description="Run the node model on every usable cohort row with a nodes_path and compare its probability "
        "map with the node masks on the CT grid, overall and by short-axis bin (<5, 5-10, >=10, >=5 mm): average "
        "recall over 0-5 false positives per scan, false positives per scan at 80 percent recall, object Dice, voxel "
        "Dice and per-slice Dice (an axial slice with no node and no prediction counts 1). Writes report.md, "
        "report.json, scans.csv and froc.png into --out.",
    )
    p.add_argument("cohort", metavar="COHORT.csv", help="scans with a nodes_path column, not used in training")
    p.add_argument("--model", metavar="CHECKPOINT", help="node model (best.pt of lnstaging train-nodes; default: the "
                   "bundled node model, when there is one)")
    p.add_argument("--threshold", type=options.probability, help="probability threshold, 0..1 (default: the "
                   "model's)")
    p.add_argument("--split", help="evaluate only the rows of this split (e.g. test)")
    options.add_out(p, help="output folder (report.md, report.json, scans.csv, froc.png)")
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...errors import InputError
    from ...nodes.evaluate import SLICE_DICE_NOTE, evaluate_nodes
    from ...nodes.model import load_node_model, resolve_node_model, verify_node_model

    model_path = resolve_node_model(args.model)
    if not Path(args.cohort).is_file():
        raise InputError(f"cohort file {args.cohort} does not exist (expected a CSV file)")
    options.check_out(args)
    options.apply_runtime(args)
    verify_node_model(model_path)
    model = load_node_model(model_path, device=args.device.torch)
    res = evaluate_nodes(args.cohort, model, args.out, device=args.device.torch, threshold=args.threshold,
                         split=args.split, progress=options.progress_printer(args))
    s = res.summary()

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{res.report.n_scans} scans at threshold {res.report.threshold:.2f}"
             + (f" ({len(res.skipped)} rows without nodes_path skipped)" if res.skipped else ""),
             f"{'nodes':>8} {'n':>5} {'avg recall':>10} {'FP@80%':>7} {'obj Dice':>8} {'vox Dice':>8} "
             f"{'slice Dice*':>11}"]
    for name in ("all", ">=5mm", "<5mm", "5-10mm", ">=10mm"):
        m = s[name]
        fp = m["fp_per_scan_at_80_recall"]
        lines.append(f"{name:>8} {m['n_truth']:>5} {f(m['average_recall']):>10} "
                     f"{('-' if fp is None else f'{fp:.2f}'):>7} {f(m['object_dice']):>8} {f(m['voxel_dice']):>8} "
                     f"{f(m['slice_dice']):>11}")
    lines.append(f"* {SLICE_DICE_NOTE}")
    lines.append(f"files in {args.out}: {', '.join(Path(v).name for v in res.files.values())}")
    options.emit({"out": str(Path(args.out)), **res.to_dict()}, args.json, "\n".join(lines))
    return 0
