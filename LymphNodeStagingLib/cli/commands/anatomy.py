"""lnstaging anatomy: anatomy label map of a CT with TotalSegmentator (fast 3 mm model, thoracic structures)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "anatomy",
        help="CT -> anatomy label map (TotalSegmentator, offline)",
        description="Run TotalSegmentator (fast 3 mm model, thoracic roi_subset) on a CT (image file or DICOM "
        "folder) and write the label map in the project's anatomy vocabulary (TotalSegmentator v2 'total' ids). "
        "Usage statistics are switched off and nothing is downloaded: the weights must be installed "
        "(docs/how-to/run-totalsegmentator.md).",
    )
    p.add_argument("ct", type=Path, metavar="CT", help="CT image (.nii.gz, .nrrd, .mha) or DICOM folder")
    options.add_out_file(p, "anatomy.nii.gz")
    options.add_device(p)
    p.add_argument("--full", action="store_true", help="all 'total' classes instead of the thoracic subset")
    p.add_argument("--series", default=None, help="CT series when the DICOM folder holds several")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.output = options.out_file(args)
    import numpy as np
    import SimpleITK as sitk

    from ...anatomy.totalsegmentator import run_totalsegmentator
    from ...anatomy.vocabulary import THORACIC_ROI, vocabulary
    from ...io.files import write_image
    from ...io.images import load_ct

    roi = None if args.full else THORACIC_ROI
    with tempfile.TemporaryDirectory() as tmp:
        ct_path = args.ct
        if args.ct.is_dir() or not args.ct.name.lower().endswith((".nii", ".nii.gz")):
            ct_img, _, _ = load_ct(args.ct, args.series)
            ct_path = write_image(ct_img, Path(tmp) / "ct.nii.gz")
        run_totalsegmentator(ct_path, args.output, device=args.device.totalsegmentator, fast=True, roi_subset=roi)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(args.output)))
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    names = vocabulary()
    found = {names.get(int(i), str(i)): int(c) for i, c in zip(ids, counts, strict=True)}
    out = {"output": str(args.output), "device": args.device.torch, "fast": True, "roi_subset": list(roi or []),
           "structures": found}
    options.emit(out, args.json, f"anatomy written to {args.output}: {len(found)} structures")
    return 0
