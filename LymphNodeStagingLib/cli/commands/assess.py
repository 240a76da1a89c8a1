"""lnstaging assess: assess one PET/CT (stations, probabilities, SUV, N-stage) and write the report files."""

from __future__ import annotations

import argparse
import sys

from ...staging.rules import DEFAULT_RULES, available_rule_sets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "assess",
        help="assess one PET/CT: station probabilities and N-stage",
        description="Map the 17 stations onto the CT, classify each from its CT+PET patch, derive the N-stage and "
        "write result.json, result.csv, stations.nii.gz and overview.png into --out.",
    )
    p.add_argument("--ct", required=True, help="CT: NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--pet", required=True, help="PET: DICOM folder (SUV computed from the header) or an SUV image "
                   "file with --pet-is-suv")
    p.add_argument("--side", required=True, help="side of the primary tumour: R or L")
    p.add_argument("--anatomy", help="precomputed anatomy labels (file or folder); default: run TotalSegmentator")
    p.add_argument("--model", help="classifier checkpoint (default: the bundled demo model)")
    p.add_argument("--atlases", help="atlas set folder (default: the bundled synthetic set)")
    p.add_argument("--rules", default=DEFAULT_RULES, help=f"{' | '.join(available_rule_sets())} (default {DEFAULT_RULES})")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    p.add_argument("--tta", type=int, default=0, help="extra weight-map-sampled patches per station (default 0)")
    p.add_argument("--pet-is-suv", action="store_true", help="the PET file already holds SUV")
    p.add_argument("--suv-mode", default="qiba", help="SUV conversion for DICOM PET: qiba (default) or gatidis")
    p.add_argument("--device", default="cpu", help="cpu | gpu | cuda:N")
    p.add_argument("--case-id", help="identifier written into the result (default: from the CT file name)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...assessment.assess import assess_case
    from ..main import emit

    device = "cuda" if args.device == "gpu" else args.device
    show = (lambda f, m: print(f"[{f * 100:5.1f} %] {m}", file=sys.stderr)) if not args.json else None
    res = assess_case(args.ct, args.pet, args.side, anatomy=args.anatomy, model=args.model, atlases=args.atlases,
                      rules=args.rules, device=device, pet_is_suv=args.pet_is_suv, suv_mode=args.suv_mode,
                      threshold=args.threshold, tta=args.tta, case_id=args.case_id, out_dir=args.out, progress=show)
    r = res.result
    out = {**r.to_dict(), "files": {k: str(v) for k, v in res.files.items()}}
    lines = [r.text_table()]
    lines.append(r.explanation)
    lines.append(f"files in {args.out}: {', '.join(p.name for p in res.files.values())}")
    emit(out, args.json, "\n".join(lines))
    return 0
