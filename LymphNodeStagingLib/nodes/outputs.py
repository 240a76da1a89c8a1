"""The files of a node detection: nodes.nii.gz (instance ids on the CT grid, 0 = background), nodes.csv (one row per
node), nodes.json (the nodes, the model, the crop, the settings) and overview.png; optionally the probability map.
Every file is written under a temporary name and renamed."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import SimpleITK as sitk

from ..io.files import write_image, write_json, write_text
from .infer import NodeDetection
from .overview import write_node_overview

CSV_COLUMNS = ("id", "station", "short_axis_mm", "long_axis_mm", "volume_ml", "mean_hu", "score", "voxels",
               "centre_x_mm", "centre_y_mm", "centre_z_mm", "suv_max", "suv_mean", "suv_peak")


def nodes_csv_text(detection: NodeDetection) -> str:
    """nodes.csv: one row per node in id order (empty cells for missing SUV or station)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for n in detection.nodes:
        d = n.to_dict()
        x, y, z = d.pop("centre_mm")
        d.update(centre_x_mm=x, centre_y_mm=y, centre_z_mm=z)
        writer.writerow(["" if d[c] is None else (round(d[c], 4) if isinstance(d[c], float) else d[c])
                         for c in CSV_COLUMNS])
    return buf.getvalue()


def write_node_outputs(detection: NodeDetection, ct: sitk.Image, out_dir: str | Path, case_id: str = "",
                       extra: dict | None = None, probability: bool = False) -> dict[str, Path]:
    """Write the detection's files into ``out_dir`` and return their paths by role."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"nodes_image": write_image(sitk.Cast(detection.instances, sitk.sitkUInt16), out / "nodes.nii.gz"),
             "nodes_csv": write_text(out / "nodes.csv", nodes_csv_text(detection))}
    if probability:
        files["probability"] = write_image(detection.probability, out / "probability.nii.gz")
    title = f"{case_id + ': ' if case_id else ''}{len(detection.nodes)} lymph node(s), threshold " \
            f"{detection.threshold:.2f}"
    notes = [f"crop: {detection.crop.source}; model: {detection.model.get('arch')} "
             f"({Path(str(detection.model.get('path', '-'))).name})", *detection.warnings]
    files["overview"] = write_node_overview(ct, detection.instances, detection.nodes, detection.crop,
                                            out / "overview.png", title=title, notes=notes)
    files["nodes_json"] = out / "nodes.json"
    write_json(out / "nodes.json", {"case_id": case_id, **detection.to_dict(), **(extra or {}),
                                    "files": {k: str(v) for k, v in files.items()}})
    return files
