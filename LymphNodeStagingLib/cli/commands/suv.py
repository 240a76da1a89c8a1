"""lnstaging suv: SUVbw image from a PET DICOM series, with the factor and its provenance."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "suv",
        help="PET DICOM series -> SUVbw image with provenance",
        description="Find the PET series (Modality PT) in a DICOM folder, compute SUV (body weight) per slice as "
        "QIBA/IBSI specify (or the autoPET conversion with --mode gatidis, for comparisons) and write it as an "
        "image (.nii.gz, .nrrd, .mha). The factor(s), the tags and times used, decisions and warnings are reported.",
    )
    p.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR", help="folder with the PET DICOM files")
    options.add_out_file(p, "suv.nii.gz")
    options.add_suv_mode(p, "--mode")
    p.add_argument("--series", default=None,
                   help="SeriesInstanceUID, SeriesNumber or SeriesDescription when the folder holds several PET series")
    options.add_json(p)
    p.set_defaults(func=run)


def _write(image, path: Path) -> None:
    """Write the SUV image; a SimpleITK or file system failure becomes one sentence naming the file."""
    from ...errors import InputError
    from ...io.dicom_series import reason
    from ...io.files import write_image

    try:
        write_image(image, path)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"--out {path}: the SUV image cannot be written there ({reason(exc)})") from exc


def run(args: argparse.Namespace) -> int:
    args.output = options.out_file(args)
    from ...errors import UsageError
    from ...io.files import check_output
    from ...io.images import IMAGE_SUFFIXES
    from ...suv.conversion import suv_from_folder

    check_output(args.output, folder=False, parameter="--out")  # before any work: a file in the way, no permission
    if not any(args.output.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
        raise UsageError(f"--out {args.output}: unknown image format; expected a file name ending in "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    result = suv_from_folder(args.dicom_dir, mode=args.mode, series=args.series)
    _write(result.image, args.output)
    prov = result.provenance.to_dict()
    out = {"output": str(args.output), "mode": args.mode, "factor": prov["factor"],
           "factors": [float(f) for f in result.factors], "provenance": prov,
           "size": list(result.image.GetSize()), "spacing": list(result.image.GetSpacing())}
    factor = (f"{prov['factor']:.6g}" if prov["factor"] is not None
              else f"{prov['factor_min']:.6g}..{prov['factor_max']:.6g} (per slice)")
    text = [f"SUV ({args.mode}) written to {args.output}", f"factor: {factor}",
            f"units {prov['units']}, decay correction {prov['decay_correction']}, weight {prov['weight_kg']} kg, "
            f"dose {prov['dose_bq']} Bq", f"reference: {prov['reference_time']} ({prov['reference_source']})",
            f"injection: {prov['administration_time']}"]
    text += [f"decision: {d}" for d in prov["decisions"]] + [f"warning: {w}" for w in prov["warnings"]]
    options.emit(out, args.json, "\n".join(text))
    return 0
