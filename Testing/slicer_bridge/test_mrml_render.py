"""Offscreen rendering of the result nodes through Slicer's slice logic and displayable managers (EGL).

Writes the PNGs for a person to look at (in the test's tmp folder). The README and Extensions Index screenshots are
made by ``render_screenshots.py`` next to this file, on a full-size phantom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402
import vtk  # noqa: E402

from LymphNodeStagingLib.slicer import mrml


def legend_box(legend, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1; y from the top) of a vertical colour legend, placed as Slicer's colour legend
    displayable manager places it: lower-left corner at position * (1 - size), in normalized viewport units."""
    px, py = legend.GetPosition()[:2]
    w, h = legend.GetSize()
    x0, y0 = px * (1 - w), py * (1 - h)
    return (int(x0 * size), int(round((1 - y0 - h) * size)), int(round((x0 + w) * size)), int((1 - y0) * size))


def render_case(out_dir: Path, size: int = 384) -> dict:
    """Show the synthetic case and render an axial slice through 4R and a 3D view; return what the tests need."""
    app = headless_slicer.HeadlessSlicer(out_dir / "home")
    try:
        case = headless_slicer.synthetic_case()
        scene = app.scene
        ct = mrml.volume_node_from_image(scene, case.ct, "CT")
        pet = mrml.volume_node_from_image(scene, case.pet, "PET")
        # views first, as in the application: the colour legend displayable manager makes an actor for each
        # legend node added to the scene after the view exists
        view = app.slice_view(size=size)
        three_d = app.threed_view(size=size)
        mrml.show_pet_over_ct(scene, ct, pet)
        nodes = mrml.show_result(scene, case.result, case.stations, reference_node=ct)
        view.fit()
        ras_4r = mrml.jump_to_station(scene, case.result, "4R", nodes.segmentation)
        axial = view.save_png(out_dir / "axial_4R.png")
        centres = {**case.centres_lps, "tissue": (0.0, -60.0, case.centres_lps["4R"][2])}
        pixels = {name: view.ras_to_pixel(mrml.lps_to_ras(centres[name])) for name in ("4R", "4L", "tissue")}
        nodes.segmentation.GetDisplayNode().SetVisibility(False)  # the fused PET/CT alone
        axial_pet = view.save_png(out_dir / "axial_4R_pet.png")
        nodes.segmentation.GetDisplayNode().SetVisibility(True)
        legend = legend_box(nodes.legend, size)
        nodes.legend.SetVisibility(False)  # the same view without the legend: the control for its pixels
        axial_no_legend = view.save_png(out_dir / "axial_4R_no_legend.png")
        nodes.legend.SetVisibility(True)

        nodes.segmentation.CreateClosedSurfaceRepresentation()
        view.node.SetSliceVisible(True)
        three_d.reset_camera(elevation=20.0)
        three_d.window.Render()
        coord = vtk.vtkCoordinate()
        coord.SetCoordinateSystemToWorld()
        coord.SetValue(*ras_4r)
        x3, y3 = coord.GetComputedDisplayValue(three_d.renderer)
        threed = three_d.save_png(out_dir / "threed.png")
        return {"axial": axial, "axial_no_legend": axial_no_legend, "axial_pet": axial_pet, "threed": threed,
                "pixels": pixels,
                "legend": legend, "pixel_3d": (x3, size - 1 - y3), "size": size}
    finally:
        app.close()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render_case(tmp_path_factory.mktemp("render"))


def _patch(img: np.ndarray, x: int, y: int, r: int = 1) -> np.ndarray:
    return img[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3).mean(axis=0)


def test_axial_slice_shows_stations_where_they_are(rendered):
    img = headless_slicer.read_png(rendered["axial"])
    assert img.shape == (rendered["size"], rendered["size"], 3)
    p4r, p4l = rendered["pixels"]["4R"], rendered["pixels"]["4L"]
    # radiological convention: the patient's right (4R) is on the left of the picture
    assert p4r.x < p4l.x and abs(p4r.y - p4l.y) <= 1
    r, g, b = _patch(img, p4r.x, p4r.y)
    assert r > 150 and r > g + 20 and g > b + 20, (r, g, b)  # p=0.92: light red fill over the hot PET
    r, g, b = _patch(img, p4l.x, p4l.y)
    assert g > 120 and g > b + 40, (r, g, b)  # p=0.20: green-yellow fill
    # outside the body: black background
    assert _patch(img, 3, 3).max() < 30
    assert img.std() > 20  # grey tissue, not a blank picture


def test_pet_is_fused_as_a_reader_windows_it(rendered):
    """Above SUV 2.5 the PET shows in hot-iron colours; the soft tissue (SUV 1.2, like the blood pool) leaves the
    CT grey: the PET does not paint the whole body."""
    img = headless_slicer.read_png(rendered["axial_pet"])
    hot, tissue = rendered["pixels"]["4R"], rendered["pixels"]["tissue"]
    r, g, b = _patch(img, hot.x, hot.y)
    assert r > 180 and g > 150 and r > b + 40, (r, g, b)  # SUV 9: yellow-white over the CT
    r, g, b = _patch(img, tissue.x, tissue.y, 2)
    assert max(r, g, b) - min(r, g, b) < 8 and 60 < r < 200, (r, g, b)  # plain grey CT at 40 HU


def _saturated(img: np.ndarray, colour: str) -> np.ndarray:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    if colour == "red":
        return (r > 180) & (g < 90) & (b < 70)
    if colour == "green":
        return (g > 140) & (r < 110) & (b < 70)
    return (r > 180) & (g > 180) & (b < 90)  # yellow


def test_probability_legend_is_drawn_at_its_place(rendered):
    """The colour bar: red (p = 1) at the top, yellow in the middle, green (p = 0) at the bottom, inside the box
    given by the legend node; the same view with the legend hidden has none of these colours there."""
    img = headless_slicer.read_png(rendered["axial"])
    x0, y0, x1, y1 = rendered["legend"]
    assert 0 <= x0 < x1 <= rendered["size"] and 0 <= y0 < y1 <= rendered["size"], rendered["legend"]
    box = img[y0:y1, x0:x1]
    third = (y1 - y0) // 3
    top, middle, bottom = box[:third], box[third:2 * third], box[2 * third:]
    assert _saturated(top, "red").sum() >= 20, "no red top of the colour bar"
    assert _saturated(middle, "yellow").sum() >= 20, "no yellow middle of the colour bar"
    assert _saturated(bottom, "green").sum() >= 20, "no green bottom of the colour bar"
    assert _saturated(top, "green").sum() == 0 and _saturated(bottom, "red").sum() == 0  # the right way up
    # one narrow vertical bar: the red, yellow and green pixels share columns
    columns = [set(np.nonzero(_saturated(part, c).any(axis=0))[0]) for part, c in
               ((top, "red"), (middle, "yellow"), (bottom, "green"))]
    assert columns[0] & columns[1] & columns[2]
    # labels: light text left of the bar
    assert (box.min(axis=2) > 200).sum() >= 30
    control = headless_slicer.read_png(rendered["axial_no_legend"])[y0:y1, x0:x1]
    for colour in ("red", "yellow", "green"):
        assert _saturated(control, colour).sum() == 0, colour


def test_threed_view_shows_station_surfaces(rendered):
    img = headless_slicer.read_png(rendered["threed"])
    x, y = (int(round(v)) for v in rendered["pixel_3d"])
    assert 0 <= x < rendered["size"] and 0 <= y < rendered["size"]
    r, g, b = _patch(img, x, y, 2)
    assert r > g + 40 and r > b + 40, (r, g, b)  # the red 4R surface in front
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # a picture, not a blank window
    # the probability legend is shown in the 3D view too (the segmentation is visible there)
    x0, y0, x1, y1 = rendered["legend"]
    box = img[y0:y1, x0:x1]
    third = (y1 - y0) // 3
    assert _saturated(box[:third], "red").sum() >= 20 and _saturated(box[2 * third:], "green").sum() >= 20


def test_screenshot_script_renders_a_phantom_case(tmp_path, monkeypatch):
    """render_screenshots.py (run by hand to refresh Resources/Screenshots) on a small phantom with made-up
    probabilities: three pictures, the slices through the hottest voxel of the positive station."""
    import importlib.util
    from types import SimpleNamespace

    from LymphNodeStagingLib.phantom import generate_patient
    from LymphNodeStagingLib.staging.result import make_case_result
    from LymphNodeStagingLib.staging.stations import STATIONS

    spec = importlib.util.spec_from_file_location("render_screenshots",
                                                  Path(__file__).with_name("render_screenshots.py"))
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "render_screenshots", script)
    spec.loader.exec_module(script)
    patient = generate_patient(7, size="small")
    positive = set(patient.truth["positive_stations"]) or {"4R"}
    result = make_case_result("PH7", patient.truth["tumour_side"],
                              {s.name: (0.9 if s.name in positive else 0.1) for s in STATIONS})
    shots = script.render(patient, SimpleNamespace(result=result, station_map=patient.stations), tmp_path,
                          width=480, height=270, colors=64)
    assert set(shots.files) == {"axial", "coronal", "threed"} and shots.station in positive
    for path in shots.files.values():
        img = headless_slicer.read_png(path)
        assert img.shape == (270, 480, 3) and img.std() > 20, path
