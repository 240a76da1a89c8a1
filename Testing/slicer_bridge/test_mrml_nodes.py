"""Lymph nodes in the Slicer scene (real MRML, headless core): the "Lymph nodes" segmentation with one segment per
node named after station and short axis and coloured by station, the node table, jumping the slice views to the node
of a table row, finding the nodes again in a scene, export, and an offscreen render of the node segments.

The nodes are spheres on the synthetic case, measured by the library (``node_fixtures.sphere_nodes``)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402
import vtk  # noqa: E402
from node_fixtures import sphere_nodes  # noqa: E402

from LymphNodeStagingLib.errors import InputError  # noqa: E402
from LymphNodeStagingLib.slicer import mrml  # noqa: E402
from LymphNodeStagingLib.staging.colors import station_color  # noqa: E402

#: Nodes of the synthetic case (LPS centre relative to the volume centre, radius in mm): in 4R, 4L and 7, and one in
#: the soft tissue in front of the mediastinum (no station). 4R, 4L and the one without a station share an axial level.
SPHERES = (((-18.0, 2.0, 18.0), 6.0), ((16.0, 2.0, 18.0), 4.5), ((0.0, 12.0, -6.0), 5.0), ((0.0, -45.0, 18.0), 5.0))


def case_with_nodes():
    """The synthetic case with its nodes in the result, and the node instance map."""
    case = headless_slicer.synthetic_case()
    node_map, records = sphere_nodes(case.ct, case.pet, case.stations, SPHERES)
    case.result.nodes = records
    return case, node_map


@pytest.fixture
def shown(app):
    case, node_map = case_with_nodes()
    scene = app.scene
    ct = mrml.volume_node_from_image(scene, case.ct, "CT")
    nodes = mrml.show_result(scene, case.result, case.stations, reference_node=ct, node_map=node_map)
    return case, node_map, nodes, ct


def test_one_segment_per_node_named_coloured_and_tagged(shown):
    import slicer.util

    case, node_map, nodes, ct = shown
    records = case.result.nodes
    assert sorted(n["station"] or "-" for n in records) == ["-", "4L", "4R", "7"]
    seg = nodes.node_segmentation
    assert seg.GetName() == "synthetic-001 Lymph nodes" and seg.GetAttribute(mrml.ATTR_ROLE) == "nodes"
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(records) == 4
    labels = sitk.GetArrayFromImage(node_map)
    for record in records:
        segment = segmentation.GetSegment(f"node-{record['id']}")
        name = segment.GetName()
        short = int(np.floor(record["short_axis_mm"] + 0.5))
        if record["station"]:
            assert name == f"{record['station']} node {short} mm"
            assert segment.GetTerminology() == mrml.station_terminology(record["station"])
        else:
            assert name == f"node {short} mm"
        assert re.fullmatch(r"(\w+ )?node \d+ mm", name)
        assert segment.GetColor() == pytest.approx(station_color(record["station"]))
        assert mrml.segment_tag(segment, mrml.TAG_NODE_ID) == str(record["id"])
        assert mrml.segment_tag(segment, mrml.TAG_STATION) == (record["station"] or "")
        assert float(mrml.segment_tag(segment, mrml.TAG_SHORT_AXIS)) == pytest.approx(record["short_axis_mm"], abs=0.05)
        assert float(mrml.segment_tag(segment, mrml.TAG_SUV_MAX)) == pytest.approx(record["suv_max"], abs=0.005)
        # the segment holds exactly the node's voxels of the instance map
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, f"node-{record['id']}", ct)
        assert int(mask.astype(bool).sum()) == record["voxels"] == int((labels == record["id"]).sum())
        assert np.array_equal(mask.astype(bool), labels == record["id"])
    # the 4R node is the largest: 6 mm radius on a 3 mm grid
    big = next(n for n in records if n["station"] == "4R")
    assert 9.0 <= big["short_axis_mm"] <= 15.0


def test_node_table_and_the_result_folder(shown, app):
    case, _, nodes, _ = shown
    records = case.result.nodes
    table = nodes.node_table
    assert table.GetAttribute(mrml.ATTR_ROLE) == "node-table" and table.GetLocked()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(mrml.NODE_TABLE_COLUMNS)
    assert table.GetNumberOfRows() == len(records)
    for row, record in enumerate(records):
        assert table.GetCellText(row, 0) == str(record["id"])
        assert table.GetCellText(row, 1) == (record["station"] or "")
        for col, key in (("ShortAxis", "short_axis_mm"), ("LongAxis", "long_axis_mm"), ("Volume", "volume_ml"),
                         ("SUVmax", "suv_max"), ("Score", "score")):
            value = table.GetTable().GetValueByName(row, col).ToDouble()
            assert value == pytest.approx(record[key]), (row, col)
    assert table.GetColumnUnitLabel("ShortAxis") == "mm"
    mrml.set_column_titles(table, {"ShortAxis": "Short axis (mm)"})
    assert table.GetColumnTitle("ShortAxis") == "Short axis (mm)"
    # everything in the case's folder, and found again from the station segmentation (a reloaded scene)
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(nodes.segmentation))
    for node in (nodes.node_segmentation, nodes.node_table):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder
    found = mrml.find_result_nodes(app.scene, nodes.segmentation)
    assert found.node_segmentation is nodes.node_segmentation and found.node_table is nodes.node_table
    back = mrml.result_from_node(nodes.segmentation)
    assert back.nodes == records  # the result stored on the station segmentation keeps the nodes
    # re-staging changes the stations, never the nodes
    mrml.update_result(nodes, case.result.restage(threshold=0.99))
    assert nodes.node_segmentation.GetSegmentation().GetNumberOfSegments() == len(records)
    assert table.GetNumberOfRows() == len(records)


def test_jump_to_the_node_of_a_table_row_moves_every_slice_view(app):
    views = {name: app.slice_view(name, orientation, size=64)
             for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))}
    case, node_map = case_with_nodes()
    scene = app.scene
    ct = mrml.volume_node_from_image(scene, case.ct, "CT")
    nodes = mrml.show_result(scene, case.result, case.stations, reference_node=ct, node_map=node_map)
    for view in views.values():
        view.fit()
    for row, record in enumerate(case.result.nodes):
        ras = mrml.jump_to_node(scene, case.result, nodes.node_table, row)
        r, a, s = mrml.lps_to_ras(record["centre_mm"])
        assert ras == pytest.approx((r, a, s))
        assert views["Red"].logic.GetSliceOffset() == pytest.approx(s)
        for view in views.values():  # every slice plane passes through the node centre, centred in the view
            to_slice = vtk.vtkMatrix4x4()
            to_slice.DeepCopy(view.node.GetSliceToRAS())
            to_slice.Invert()
            assert to_slice.MultiplyPoint((r, a, s, 1.0))[:3] == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
        assert abs(views["Yellow"].logic.GetSliceOffset()) == pytest.approx(abs(r))  # sagittal: along L-R
        assert abs(views["Green"].logic.GetSliceOffset()) == pytest.approx(abs(a))  # coronal: along P-A
        crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        assert crosshair.GetCrosshairRAS() == pytest.approx((r, a, s))
    with pytest.raises(InputError, match="no row 4"):
        mrml.jump_to_node(scene, case.result, nodes.node_table, 4)
    with pytest.raises(InputError, match="not a lymph node table"):
        mrml.jump_to_node(scene, case.result, nodes.table, 0)
    fewer = case.result.restage()
    fewer.nodes = fewer.nodes[:1]  # a result that does not hold the node of row 1
    with pytest.raises(InputError, match="has no lymph node 2"):
        mrml.jump_to_node(scene, fewer, nodes.node_table, 1)


def test_refusals_and_a_result_without_nodes(app):
    case, node_map = case_with_nodes()
    scene = app.scene
    plain = headless_slicer.synthetic_case()
    nodes = mrml.show_result(scene, plain.result, plain.stations)
    assert nodes.node_segmentation is None and nodes.node_table is None  # no node model ran: nothing extra
    with pytest.raises(InputError, match="has no nodes"):
        mrml.show_result(scene, plain.result, plain.stations, node_map=node_map)
    broken = case.result.restage()
    broken.nodes = [dict(n, id=n["id"] + 1) for n in broken.nodes]
    with pytest.raises(InputError, match="ids must be 1..4"):
        mrml.show_result(scene, broken, case.stations, node_map=node_map)
    too_few = case.result.restage()
    too_few.nodes = too_few.nodes[:2]
    with pytest.raises(InputError, match="lymph node map: expected label values 0..2"):
        mrml.show_result(scene, too_few, case.stations, node_map=node_map)
    # a result with nodes but no map: the table alone
    only_table = mrml.show_result(scene, case.result, case.stations)
    assert only_table.node_segmentation is None and only_table.node_table.GetNumberOfRows() == 4
    # refilling shown nodes with a result without nodes empties them
    shown = mrml.show_result(scene, case.result, case.stations, node_map=node_map)
    assert shown.node_segmentation.GetSegmentation().GetNumberOfSegments() == 4
    mrml.show_result(scene, plain.result, plain.stations, nodes=shown)
    assert shown.node_segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert shown.node_table.GetNumberOfRows() == 0


def test_export_writes_the_node_segmentation(shown, app, tmp_path):
    case, _, nodes, _ = shown
    paths = mrml.export_result(nodes, case.result, tmp_path)
    assert paths["node_segmentation"] == tmp_path / "synthetic-001_nodes.seg.nrrd"
    reloaded = mrml.load_segmentation(app.scene, paths["node_segmentation"])
    names = {reloaded.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(reloaded.GetSegmentation().GetNumberOfSegments())}
    assert names == {mrml.node_segment_name(n) for n in case.result.nodes}


# ----- offscreen render ----------------------------------------------------------------------------------------
def render_nodes(out: Path, size: int = 384) -> dict:
    """An axial slice through the 4R node: CT + PET, the stations lightly filled, the node segments coloured by
    station. Returns the PNG path and the pixels of the node centres."""
    app = headless_slicer.HeadlessSlicer(out.parent / "home-nodes")
    try:
        case, node_map = case_with_nodes()
        scene = app.scene
        ct = mrml.volume_node_from_image(scene, case.ct, "CT")
        pet = mrml.volume_node_from_image(scene, case.pet, "PET")
        view = app.slice_view(size=size)
        mrml.show_pet_over_ct(scene, ct, pet)
        nodes = mrml.show_result(scene, case.result, case.stations, reference_node=ct, node_map=node_map)
        view.fit()
        row = next(i for i, n in enumerate(case.result.nodes) if n["station"] == "4R")
        mrml.jump_to_node(scene, case.result, nodes.node_table, row)
        png = view.save_png(out)
        pixels = {n["station"] or "none": view.ras_to_pixel(mrml.lps_to_ras(n["centre_mm"]))
                  for n in case.result.nodes if abs(n["centre_mm"][2] - 18.0) < 2.0}
        nodes.segmentation.GetDisplayNode().SetVisibility(False)
        composite = view.composite
        composite.SetForegroundOpacity(0.0)
        plain = view.save_png(out.with_name(out.stem + "_nodes_only.png"))
        return {"png": png, "plain": plain, "pixels": pixels, "size": size}
    finally:
        app.close()


def test_render_shows_each_node_in_its_station_colour(tmp_path):
    shot = render_nodes(tmp_path / "nodes_slicer.png")
    img = headless_slicer.read_png(shot["png"])
    assert img.shape == (shot["size"], shot["size"], 3) and img.std() > 20
    assert set(shot["pixels"]) == {"4R", "4L", "none"}
    plain = headless_slicer.read_png(shot["plain"])  # CT and the node segments only

    def colour(x: int, y: int) -> np.ndarray:
        return plain[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)

    r, g, b = colour(shot["pixels"]["4R"].x, shot["pixels"]["4R"].y)
    assert r > b + 20 > g + 40, (r, g, b)  # 4R: pink over the grey CT
    r, g, b = colour(shot["pixels"]["4L"].x, shot["pixels"]["4L"].y)
    assert g > r + 40 and b > r + 30, (r, g, b)  # 4L: turquoise
    r, g, b = colour(shot["pixels"]["none"].x, shot["pixels"]["none"].y)
    assert max(r, g, b) - min(r, g, b) < 12 and r > 120, (r, g, b)  # no station: light grey
    # radiological convention: 4R (patient right) on the left of the picture
    assert shot["pixels"]["4R"].x < shot["pixels"]["4L"].x


def test_node_probabilities_in_the_node_and_station_tables(app):
    case, node_map = case_with_nodes()
    r = case.result
    for i, n in enumerate(r.nodes):
        n["probability"] = 0.1 + 0.2 * i
    for st in r.stations:
        st.node_probability = 0.5 if st.name == "4R" else None
    nodes = mrml.show_result(app.scene, r, case.stations, node_map=node_map)
    table = nodes.node_table.GetTable()
    for row, n in enumerate(r.nodes):
        assert table.GetValueByName(row, "Probability").ToDouble() == pytest.approx(n["probability"])
    stations = nodes.table.GetTable()
    names = [stations.GetValueByName(i, "Station").ToString() for i in range(stations.GetNumberOfRows())]
    i4r = names.index("4R")
    top = next(n for n in r.nodes if n["station"] == "4R")
    assert stations.GetValueByName(i4r, "TopNode").ToString() == str(top["id"])
    assert stations.GetValueByName(i4r, "NodeProbability").ToDouble() == pytest.approx(0.5)
    assert stations.GetValueByName(names.index("1L"), "TopNode").ToString() == ""
