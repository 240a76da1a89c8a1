"""lnstaging calibrate: calibrate a trained model's station probabilities on a cohort it was not trained on."""

from __future__ import annotations

import argparse

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate a model's station probabilities on held-out scans (writes a new checkpoint)",
        description="Run the model on every usable scan of a cohort it was not trained on, fit a calibration of its "
        "station probabilities (temperature, Platt or isotonic by the number of labels), tune the operating "
        "threshold again on the calibrated probabilities, and write the calibrated checkpoint to --out.",
    )
    p.add_argument("cohort", metavar="COHORT.csv", help="held-out scans with station or N-stage labels")
    options.add_model(p, help="the checkpoint to calibrate (default: the bundled demo model)")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="the calibrated checkpoint to write")
    p.add_argument("--method", default="auto", choices=("auto", "temperature", "platt", "isotonic"),
                   help="calibration (default auto: by the number of labels of the rarer class)")
    p.add_argument("--threshold-for", default="stage", choices=("stage", "station"),
                   help="tune the threshold for N-stage accuracy (default) or station balanced accuracy")
    options.add_atlases(p)
    options.add_map_store(p)
    options.add_pet_is_suv(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...paths import demo_model_path
    from ...training.calibrate import calibrate_model

    options.apply_runtime(args)
    res = calibrate_model(args.model or demo_model_path(), args.cohort, args.out, method=args.method,
                          threshold_for=args.threshold_for, atlases=args.atlases, pet_is_suv=args.pet_is_suv,
                          device=args.device, cache_dir=args.cache, progress=options.progress_printer(args))
    text = (f"{res.calibration.method} calibration on {res.scans} scans ({res.stations} stations with a label): "
            f"ECE {res.ece_before:.3f} -> {res.ece_after:.3f}, Brier {res.brier_before:.3f} -> {res.brier_after:.3f} "
            f"(on these scans); threshold {res.threshold_before:.2f} -> {res.threshold:.2f}\n"
            f"checkpoint: {res.checkpoint}")
    options.emit(res.to_dict(), args.json, text)
    return 0
