"""lnstaging phantom: generate synthetic PET/CT patients (cohort) or a synthetic atlas set."""

from __future__ import annotations

import argparse
import time

from ...errors import UsageError
from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="generate synthetic thoracic PET/CT phantoms (cohort or atlas set)",
        description="Generate synthetic FDG PET/CT patients with anatomy (TotalSegmentator ids), the 17 stations, "
        "lymph nodes, a primary tumour and image-level labels, written as a cohort (cohort.csv + one folder per "
        "patient); or, with --atlas, an atlas set (CT, anatomy, stations; no disease). Deterministic by --seed.",
    )
    options.add_out(p, required=False)
    p.add_argument("--patients", type=int, default=5, help="number of patients (or atlases with --atlas; default 5)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--size", default="small", choices=["small", "full", "atlas"],
                   help="small: 2x2x4 mm cropped (<1 s); full: 1x1x3 mm thorax; atlas: 2 mm isotropic crop")
    p.add_argument("--format", default="nifti", choices=["nifti", "dicom"], help="image format (default nifti)")
    p.add_argument("--atlas", action="store_true", help="write an atlas set instead of a cohort")
    p.add_argument("--demo-atlases", action="store_true",
                   help="build the synthetic demo atlas set in the cache (the default --atlases of every command; "
                        "5 full-size atlases, about 20 s) and print its folder; no --out needed")
    p.add_argument("--preview", action="store_true", help="write preview.png per patient")
    p.add_argument("--label-noise", type=float, default=None, help="fraction of reports with one station flipped")
    p.add_argument("--n-stage-mix", default=None, help="N0,N1,N2,N3 weights, e.g. 0.55,0.12,0.23,0.10")
    p.add_argument("--shift", type=float, default=0.0, metavar="K",
                   help="a shifted cohort: voxel spacing, noise, PSF, benign and background uptake, body size and "
                        "position in scanner coordinates moved and widened (1: the reference shift; default 0)")
    p.add_argument("--no-confounders", action="store_true",
                   help="switch off partial volume, inflammatory nodes, spill-over, physiological uptake, label noise")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...phantom import PhantomConfig, generate_atlas_set, generate_cohort

    t0 = time.perf_counter()
    if args.demo_atlases:
        from ...phantom import build_demo_atlas_set

        path = build_demo_atlas_set()
        options.emit({"atlas_set": str(path), "manifest": str(path / "manifest.json"),
              "wall_s": round(time.perf_counter() - t0, 3)}, args.json, f"synthetic demo atlas set: {path}")
        return 0
    if not args.out:
        raise UsageError("--out is required (or --demo-atlases)")
    cfg = PhantomConfig()
    if args.no_confounders:
        cfg = PhantomConfig(partial_volume=False, inflammatory_nodes=False, spill_over=False,
                            physiological_uptake=False, label_noise=0.0)
    cfg.shift = args.shift
    if args.label_noise is not None:
        cfg.label_noise = args.label_noise
    if args.n_stage_mix:
        try:
            cfg.n_stage_mix = tuple(float(v) for v in args.n_stage_mix.split(","))
        except ValueError:
            raise UsageError(f"--n-stage-mix must be 4 comma-separated numbers, got {args.n_stage_mix!r}") from None
    if args.atlas:
        out = generate_atlas_set(args.out, atlases=args.patients, seed=args.seed, size=args.size)
        result = {"atlas_set": str(out), "manifest": str(out / "manifest.json"), "atlases": args.patients,
                  "seed": args.seed, "size": args.size}
        text = f"atlas set with {args.patients} atlases: {out}"
    else:
        csv_path = generate_cohort(args.out, args.patients, args.seed, args.size, args.format, cfg,
                                   preview=args.preview)
        result = {"cohort": str(csv_path), "patients": args.patients, "seed": args.seed, "size": args.size,
                  "format": args.format, "preview": bool(args.preview)}
        text = f"{args.patients} phantom patients, cohort table {csv_path}"
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    options.emit(result, args.json, text)
    return 0
