"""lnstaging demo: a synthetic patient assessed end to end with the bundled model and atlas set."""

from __future__ import annotations

import argparse

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    from ...assessment.demo import DEMO_SEED, DEMO_SIZE

    p = sub.add_parser(
        "demo",
        help="generate a phantom PET/CT patient and assess it with the bundled model (the README's first command)",
        description="Generates a synthetic FDG PET/CT patient (OUT/patient), maps the 17 stations with the bundled "
        "synthetic atlas set (made once, cached), classifies them with the bundled TS1 model and writes the "
        "result JSON/CSV, the station map and the PNG overview (OUT/assessment). Prints the station table and the "
        "N-stage next to the phantom's truth.",
    )
    options.add_out(p, default="demo-out")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=f"phantom patient seed (default {DEMO_SEED})")
    p.add_argument("--size", choices=["small", "full"], default=DEMO_SIZE, help=f"phantom size (default {DEMO_SIZE})")
    options.add_model(p)
    options.add_atlases(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...assessment.demo import run_demo

    options.check_out(args)
    options.apply_runtime(args)
    res = run_demo(args.out, seed=args.seed, size=args.size, model=args.model, atlases=args.atlases,
                   device=args.device, progress=options.progress_printer(args))
    r = res.assessment.result
    t = res.truth
    truth_text = ", ".join(t["positive_stations"]) or "none"
    lines = [f"Phantom patient {r.case_id}: tumour side {r.side}; true {t['n_stage']} "
             f"(malignant stations: {truth_text})", "", r.text_table(truth=t["positive_stations"]), "",
             f"Result: {r.explanation}", "",
             f"Report files in {res.out_dir}: " + ", ".join(p.name for p in res.files.values()),
             f"Images in {res.patient_dir}. Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())]
    options.emit(res.to_dict(), args.json, "\n".join(lines))
    return 0
