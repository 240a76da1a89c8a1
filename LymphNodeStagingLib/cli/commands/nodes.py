"""lnstaging nodes: find the lymph nodes of one CT (node network + instances with measurements, station, SUV)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nodes",
        help="find the lymph nodes of one CT: instances with short axis, volume, station and SUV",
        description="Segment the lymph nodes of a CT with a node model (S-Net or 3D U-Net, trained with "
        "`lnstaging train-nodes`) in the mediastinal crop (around the station map, else the anatomy's lungs, trachea "
        "and heart, else the whole CT), split the probability map into instances at the model's threshold and "
        "measure each (short and long axis, volume, mean HU, station with --stations, SUVmax/SUVmean/SUVpeak with "
        "--pet). Writes nodes.nii.gz (instance ids on the CT grid), nodes.csv, nodes.json and overview.png into "
        "--out.",
    )
    p.add_argument("--ct", required=True, help="CT: NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--pet", help="PET for the SUV figures: DICOM folder (SUV from the header) or an SUV image file "
                   "with --pet-is-suv")
    options.add_pet_is_suv(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--stations", help="station map (labels 1..17 on the CT's space, e.g. from lnstaging map): "
                       "sets the crop and each node's station")
    where.add_argument("--anatomy", help="anatomy labels (file or TotalSegmentator folder): sets the crop")
    p.add_argument("--model", metavar="CHECKPOINT", help="node model (best.pt of lnstaging train-nodes; default: the "
                   "bundled node model, when there is one)")
    p.add_argument("--threshold", type=options.probability, help="probability threshold, 0..1 (default: the "
                   "model's, tuned on its validation patients)")
    p.add_argument("--min-volume", type=float, metavar="ML", help="drop instances smaller than this (ml; default: "
                   "the model's)")
    p.add_argument("--save-probability", action="store_true", help="also write probability.nii.gz")
    p.add_argument("--case-id", help="identifier written into the result (default: from the CT file name)")
    options.add_out(p)
    options.add_compute_options(p)
    p.set_defaults(func=run)


def _case_id(ct: str) -> str:
    """The CT file name without its suffix; a file called just "ct" is named after its folder."""
    path = Path(ct).expanduser().resolve()
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.parent.name or name if name.lower() == "ct" else name


def load_inputs(args: argparse.Namespace):
    """CT (HU), PET (SUV or None), station map and anatomy, each checked; errors name the option and file."""
    from ...errors import InputError
    from ...io.images import load_ct
    from ...nodes.data import read_station_map
    from ...preflight.case import check_case, check_image_file
    from ...preflight.image_values import check_ct_values

    suv = None
    if args.pet:
        checked = check_case(args.ct, args.pet, pet_is_suv=args.pet_is_suv, mapping=False, read_anatomy=False)
        ct, pet, suv = checked.ct, checked.pet, checked.suv
    else:
        what = f"--ct {args.ct}"
        check_image_file(args.ct, "CT", what)
        ct, _, _ = load_ct(args.ct)
        check_ct_values(ct, what)
        pet = None
    stations = anatomy = None
    if args.stations:
        stations = read_station_map(args.stations, "--stations")
    if args.anatomy:
        from ...anatomy.vocabulary import load_anatomy

        try:
            anatomy = load_anatomy(args.anatomy, reference=ct)
        except InputError as exc:
            raise InputError(f"--anatomy {args.anatomy}: {exc}") from None
    return ct, pet, stations, anatomy, suv


def run(args: argparse.Namespace) -> int:
    from ...errors import UsageError
    from ...nodes.infer import detect_nodes
    from ...nodes.model import load_node_model, resolve_node_model, verify_node_model
    from ...nodes.outputs import write_node_outputs

    model_path = resolve_node_model(args.model)
    if args.min_volume is not None and not args.min_volume >= 0:
        raise UsageError(f"--min-volume {args.min_volume}: expected a volume in ml, 0 or more")
    options.check_out(args)
    options.apply_runtime(args)
    verify_node_model(model_path)
    ct, pet, stations, anatomy, suv = load_inputs(args)
    model = load_node_model(model_path, device=args.device.torch)
    det = detect_nodes(ct, model, pet=pet, anatomy=anatomy, stations=stations, threshold=args.threshold,
                       min_volume_ml=args.min_volume, device=args.device.torch)
    case_id = args.case_id or _case_id(args.ct)
    extra = {"inputs": {"ct": str(args.ct), "pet": args.pet, "stations": args.stations, "anatomy": args.anatomy},
             "suv": suv}
    files = write_node_outputs(det, ct, args.out, case_id, extra, probability=args.save_probability)
    out = {"case_id": case_id, **det.to_dict(), **extra, "files": {k: str(v) for k, v in files.items()}}
    lines = [f"{case_id}: {len(det.nodes)} lymph node(s) at threshold {det.threshold:.2f} "
             f"(crop: {det.crop.source})"]
    for n in det.nodes[:30]:
        suv_text = "" if n.suv_max is None else f", SUVmax {n.suv_max:.1f}"
        lines.append(f"  {n.id:3d}  {n.station or '-':>4}  short axis {n.short_axis_mm:5.1f} mm, "
                     f"{n.volume_ml:.2f} ml{suv_text}")
    if len(det.nodes) > 30:
        lines.append(f"  ... and {len(det.nodes) - 30} more (nodes.csv)")
    lines += [f"warning: {w}" for w in det.warnings]
    lines.append(f"files in {args.out}: {', '.join(Path(v).name for v in files.values())}")
    options.emit(out, args.json, "\n".join(lines))
    return 0
