"""lnstaging assess: assess one PET/CT, or a CT alone, (stations, probabilities, SUV, N-stage) and write the report
files."""

from __future__ import annotations

import argparse

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "assess",
        help="assess one PET/CT (or a CT alone): station probabilities and N-stage",
        description="Map the 17 stations onto the CT, classify each from its CT+PET patch, derive the N-stage and "
        "write result.json, result.csv, stations.nii.gz and overview.png into --out. With a node model (--node-model, "
        "or a bundled one) the lymph nodes are found and measured too: result.json lists them, result.csv counts them "
        "per station, nodes.nii.gz holds their instance map. Without --pet the CT is assessed alone (CT-only mode): no SUV "
        "figures, station probabilities from a CT-only model (--model trained with `lnstaging train --modality ct`; "
        "default: the bundled CT-only demo model); result.json says modality \"ct\".",
    )
    p.add_argument("--ct", required=True, help="CT: NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--pet", help="PET: DICOM folder (SUV computed from the header) or an SUV image file with "
                   "--pet-is-suv; without it the CT is assessed alone (CT-only mode)")
    options.add_side(p)
    p.add_argument("--anatomy", help="precomputed anatomy labels (file or folder); default: run TotalSegmentator "
                   "(not needed with --method network)")
    options.add_station_method(p)
    options.add_model(p)
    p.add_argument("--node-model", metavar="CHECKPOINT", help="node model (best.pt of lnstaging train-nodes) to find "
                   "and measure the lymph nodes (default: the bundled node model when there is one, else no node "
                   "detection)")
    p.add_argument("--node-classifier", metavar="CHECKPOINT",
                   help="node classifier (best.pt of lnstaging train-node-classifier): every node's probability of "
                   "malignancy, each station's probability from its nodes and its most suspicious node (default: the "
                   "bundled one for PET/CT or CT alone, when there is one)")
    options.add_atlases(p)
    options.add_rules(p)
    p.add_argument("--threshold", type=options.probability, help="probability threshold, 0..1 (default: the model's)")
    p.add_argument("--tta", type=options.count, default=0,
                   help="extra weight-map-sampled patches per station (default 0)")
    options.add_pet_is_suv(p)
    options.add_suv_mode(p)
    p.add_argument("--case-id", help="identifier written into the result (default: from the CT file name)")
    options.add_out(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...assessment.assess import assess_case

    options.check_out(args)
    options.apply_runtime(args)
    show = options.progress_printer(args)
    res = assess_case(args.ct, args.pet, args.side, anatomy=args.anatomy, model=args.model,
                      node_model=args.node_model, node_classifier=args.node_classifier, atlases=args.atlases,
                      method=args.method,
                      station_model=args.station_model,
                      rules=args.rules, device=args.device, pet_is_suv=args.pet_is_suv, suv_mode=args.suv_mode,
                      threshold=args.threshold, tta=args.tta, case_id=args.case_id, out_dir=args.out, progress=show)
    r = res.result
    out = {**r.to_dict(), "files": {k: str(v) for k, v in res.files.items()}}
    lines = [r.text_table(), r.explanation]
    if r.nodes is not None:
        large = [n for n in r.nodes if (n.get("short_axis_mm") or 0.0) >= 10.0]
        lines.append(f"lymph nodes: {len(r.nodes)} found, {len(large)} with a short axis of 10 mm or more")
    statement = (r.provenance or {}).get("statement")
    lines += [f"warning: {w}" for w in r.warnings if w != statement]
    lines.append(f"files in {args.out}: {', '.join(p.name for p in res.files.values())}")
    options.emit(out, args.json, "\n".join(lines))
    return 0
