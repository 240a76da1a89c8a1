"""Regenerate the screenshots of the README and the Extensions Index (Resources/Screenshots/*.png).

A full-size phantom patient (the demo patient) is assessed with the bundled model and atlas set, shown through the
MRML bridge as the module shows it (CT in a mediastinal window, PET fused above an SUV threshold, stations coloured
by malignancy probability, the probability legend), and rendered offscreen by Slicer's own slice logic and
displayable managers (EGL, no X server):

    .venv/bin/python Testing/slicer_bridge/render_screenshots.py [--out Resources/Screenshots] [--seed 12]

Writes LymphNodeStaging_axial.png and LymphNodeStaging_coronal.png (slices through the hottest voxel of the most
probable station) and LymphNodeStaging_threed.png (the station surfaces in front of a coronal slice), and prints
the case's N-stage and the station shown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for headless_slicer

import headless_slicer  # noqa: E402
import vtk  # noqa: E402

from LymphNodeStagingLib.slicer import mrml  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "Resources" / "Screenshots"


@dataclass
class Rendered:
    files: dict[str, Path]
    case_id: str
    n_stage: str
    tnm9: str
    station: str  # the station the slices go through
    probabilities: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def assess_phantom(seed: int, size: str = "full"):
    """A phantom patient and its assessment (bundled model and synthetic atlas set, the phantom's anatomy)."""
    from LymphNodeStagingLib.assessment.assess import assess_case
    from LymphNodeStagingLib.phantom import generate_patient

    patient = generate_patient(seed, size=size, patient_id=f"DEMO{seed:04d}")
    assessment = assess_case(patient.ct, patient.pet, patient.truth["tumour_side"], anatomy=patient.anatomy,
                             device="cpu", pet_is_suv=True, case_id=patient.patient_id)
    return patient, assessment


def _write_png(window, path: Path, colors: int | None = None) -> Path:
    """The window as PNG; ``colors``: quantized to that many colours first (smaller files)."""
    path = headless_slicer._save_png(window, path)
    if colors:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE).save(
            path, optimize=True)
    return path


def focus_point(patient, assessment) -> tuple[str, tuple[float, float, float]]:
    """Where a reader looks first: the hottest PET voxel of the positive station with the highest SUVmax (of the
    most probable station when none is positive); returns the station and the RAS point."""
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.staging.stations import parse_station

    result = assessment.result
    present = [s for s in result.stations if s.present and s.probability is not None]
    positive = [s for s in present if s.name in result.positive_stations()]
    station = (max(positive, key=lambda s: s.suv_max or 0.0) if positive
               else max(present, key=lambda s: s.probability))
    labels = sitk.GetArrayFromImage(sitk.Resample(assessment.station_map, patient.pet, sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    suv = np.where(labels == parse_station(station.name).label, sitk.GetArrayFromImage(patient.pet), -np.inf)
    k, j, i = np.unravel_index(int(np.argmax(suv)), suv.shape)
    return station.name, mrml.lps_to_ras(patient.pet.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))


def _slice_view(app, name: str, orientation: str, width: int, height: int):
    """An offscreen slice view of ``width`` x ``height`` pixels."""
    view = app.slice_view(name, orientation, max(width, height))
    view.window.SetSize(width, height)
    view.logic.ResizeSliceNode(width, height)
    return view


def _frame(view, volume, point, zoom: float, shift: float) -> None:
    """Fit the view to the volume, zoom in, put the body ``shift`` (a fraction of the view's width) left of the
    centre (room for the legend on the right) and the slice through ``point``."""
    view.logic.FitSliceToAll()
    fov = view.node.GetFieldOfView()
    view.node.SetFieldOfView(fov[0] / zoom, fov[1] / zoom, fov[2])
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    centre[0] -= shift * fov[0] / zoom  # RAS x grows to the patient's right, shown on the left of the screen
    if view.node.GetOrientation() == "Axial":
        centre[2] = point[2]
    else:  # coronal: the slice through the point, the top of the volume (neck, upper mediastinum) in view
        centre[1] = point[1]
        centre[2] = bounds[5] - 0.5 * fov[1] / zoom
    view.node.JumpSliceByCentering(*centre)


def render(patient, assessment, out_dir: Path, width: int = 1024, height: int = 576,
           colors: int | None = 256) -> Rendered:
    """Show the case as the module does and write the three screenshots into ``out_dir``."""
    start = time.perf_counter()
    result = assessment.result
    out_dir.mkdir(parents=True, exist_ok=True)
    station, point = focus_point(patient, assessment)
    with tempfile.TemporaryDirectory(prefix="lns-screens-") as home:
        app = headless_slicer.HeadlessSlicer(home)
        try:
            scene = app.scene
            ct = mrml.volume_node_from_image(scene, patient.ct, f"{result.case_id} CT")
            pet = mrml.volume_node_from_image(scene, patient.pet, f"{result.case_id} PET (SUV)")
            # views first, as in the application (the legend displayable manager watches for new legend nodes)
            axial = _slice_view(app, "Red", "Axial", width, height)
            coronal = _slice_view(app, "Green", "Coronal", width, height)
            three_d = app.threed_view(max(width, height))
            three_d.window.SetSize(width, height)
            mrml.show_pet_over_ct(scene, ct, pet)
            nodes = mrml.show_result(scene, result, assessment.station_map, reference_node=ct)
            _frame(axial, ct, point, 1.4, 0.15)
            _frame(coronal, ct, point, 1.3, 0.15)
            files = {"axial": _save(axial, out_dir / "LymphNodeStaging_axial.png", colors),
                     "coronal": _save(coronal, out_dir / "LymphNodeStaging_coronal.png", colors)}

            # 3D: the station surfaces in front of a coronal CT/PET slice behind the mediastinum
            nodes.segmentation.CreateClosedSurfaceRepresentation()
            three_d.node.SetBoxVisible(False)
            coronal.node.JumpSliceByOffsetting(point[0], point[1] - 45.0, point[2])  # RAS y grows anteriorly
            coronal.node.SetSliceVisible(True)
            three_d.reset_camera(elevation=10.0, azimuth=-20.0)
            _pan_right(three_d.renderer.GetActiveCamera(), 0.17)
            files["threed"] = _write_png(three_d.window, out_dir / "LymphNodeStaging_threed.png", colors)
        finally:
            app.close()
    probabilities = {s.name: round(s.probability, 2) for s in result.stations if s.probability is not None}
    return Rendered(files, result.case_id, result.n_stage, result.tnm9, station, probabilities,
                    time.perf_counter() - start)


def _pan_right(camera, fraction: float) -> None:
    """Move the camera to the right by ``fraction`` of the visible height (the scene moves left: room for the
    legend) and zoom in a little."""
    import numpy as np

    position, focal = np.array(camera.GetPosition()), np.array(camera.GetFocalPoint())
    direction = (focal - position) / np.linalg.norm(focal - position)
    right = np.cross(direction, np.array(camera.GetViewUp()))
    height = 2 * np.linalg.norm(focal - position) * np.tan(np.radians(camera.GetViewAngle() / 2))
    offset = right / np.linalg.norm(right) * fraction * height
    camera.SetPosition(*(position + offset))
    camera.SetFocalPoint(*(focal + offset))
    camera.Zoom(1.3)


def _save(view, path: Path, colors: int | None) -> Path:
    connection = view.logic.GetImageDataConnection()  # the slice logic replaces its pipeline when layers change
    if connection is not None:
        view.mapper.SetInputConnection(connection)
    return _write_png(view.window, path, colors)


def main(argv: list[str] | None = None) -> int:
    from LymphNodeStagingLib.assessment.demo import DEMO_SEED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SCREENSHOTS, help="folder for the PNGs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="phantom seed (default: the demo patient)")
    parser.add_argument("--width", type=int, default=1024, help="view width in pixels (default %(default)s)")
    parser.add_argument("--height", type=int, default=576, help="view height in pixels (default %(default)s)")
    args = parser.parse_args(argv)
    vtk.vtkObject.GlobalWarningDisplayOff()
    t0 = time.perf_counter()
    patient, assessment = assess_phantom(args.seed)
    print(f"assessed {assessment.result.case_id} in {time.perf_counter() - t0:.1f} s")
    shots = render(patient, assessment, args.out, args.width, args.height)
    truth = patient.truth
    print(f"{shots.case_id}: {shots.n_stage} (TNM 9 {shots.tnm9}); truth {truth['n_stage']}, positive "
          f"{', '.join(truth['positive_stations']) or 'none'}; slices through station {shots.station}")
    print("probabilities:", ", ".join(f"{k} {v:.2f}" for k, v in shots.probabilities.items()))
    for name, path in shots.files.items():
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
