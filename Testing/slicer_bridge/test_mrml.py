"""The MRML bridge with the real Slicer core (headless): nodes for a case, re-staging, .seg.nrrd round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402, F401 - sets up the offscreen rendering before slicer is imported
import slicer  # noqa: E402

from LymphNodeStagingLib.slicer import mrml
from LymphNodeStagingLib.staging.colors import probability_color
from LymphNodeStagingLib.staging.stations import STATIONS


@pytest.fixture
def shown(app, case):
    scene = app.scene
    ct = mrml.volume_node_from_image(scene, case.ct, "CT")
    pet = mrml.volume_node_from_image(scene, case.pet, "PET")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    for node in (ct, pet):
        sh.CreateItem(study, node)  # the application's subject hierarchy plugins do this
    mrml.show_pet_over_ct(scene, ct, pet)
    nodes = mrml.show_result(scene, case.result, case.stations, reference_node=ct)
    return scene, ct, pet, nodes, study


def _rgb(segment):
    return tuple(segment.GetColor())


def test_nodes_for_a_case(shown, case):
    scene, ct, pet, nodes, study = shown
    segmentation = nodes.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 17
    assert [segmentation.GetNthSegmentID(i) for i in range(17)] == [s.name for s in STATIONS]
    lab = sitk.GetArrayFromImage(case.stations)
    for st in case.result.stations:
        segment = segmentation.GetSegment(st.name)
        assert segment.GetName() == f"Station {st.name}"
        assert mrml.segment_tag(segment, mrml.TAG_STATUS) == st.status
        assert np.allclose(_rgb(segment), probability_color(st.probability if st.present else None), atol=1e-6)
        if st.present:
            assert float(mrml.segment_tag(segment, mrml.TAG_PROBABILITY)) == pytest.approx(st.probability, abs=1e-3)
            assert float(mrml.segment_tag(segment, mrml.TAG_SUV_MAX)) == pytest.approx(st.suv_max, abs=0.01)
            assert float(mrml.segment_tag(segment, mrml.TAG_AGREEMENT)) == pytest.approx(0.8)
            mask = slicer.vtkOrientedImageData()
            nodes.segmentation.GetBinaryLabelmapRepresentation(st.name, mask)
            assert mask.GetPointData().GetScalars() is not None
        else:
            assert mrml.segment_tag(segment, mrml.TAG_PROBABILITY) == ""
            assert not np.any(lab == st.label)
        assert "59441001" not in segment.GetTerminology()  # the site code, not the generic lymph node
        assert "SCT^123037004^Anatomical Structure" in segment.GetTerminology()
    assert "24028007^Right" in segmentation.GetSegment("4R").GetTerminology()
    assert "28330007^Subcarinal" in segmentation.GetSegment("7").GetTerminology()
    # hot red 4R, green 3A
    r, g, b = _rgb(segmentation.GetSegment("4R"))
    assert r > 0.8 and g < 0.3
    r, g, b = _rgb(segmentation.GetSegment("3A"))
    assert g > r
    # N-stage as attributes (10L contralateral, p=0.66 -> N3 under ajcc8)
    seg = nodes.segmentation
    assert seg.GetAttribute(mrml.ATTR_N_STAGE) == "N3"
    assert seg.GetAttribute(mrml.ATTR_TNM9) == "N3"
    assert seg.GetAttribute(mrml.ATTR_DECIDING) == "10L"
    assert seg.GetAttribute(mrml.ATTR_RULES) == "ajcc8"
    assert seg.GetAttribute(mrml.ATTR_SIDE) == "R"
    assert "N3 (TNM 9: N3)" in nodes.text.GetText()
    assert "Deciding stations: 10L" in nodes.text.GetText()
    # table
    table = nodes.table
    assert table.GetNumberOfRows() == 17
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(mrml.TABLE_COLUMNS)
    row = {table.GetColumnName(c): table.GetCellText(7, c) for c in range(table.GetNumberOfColumns())}
    assert row["Station"] == "4R" and row["Status"] == "positive" and row["Group"] == "N2"
    assert float(row["Probability"]) == pytest.approx(0.92)
    assert math.isnan(table.GetTable().GetColumnByName("Probability").GetValue(12))  # station 9 absent
    # legend shows the probability colour map
    assert nodes.legend is not None and nodes.legend.GetColorNodeID() == nodes.color.GetID()
    # the legend displayable manager draws the colour node and range of the legend's primary display node
    seg_display = nodes.segmentation.GetDisplayNode()
    assert nodes.legend.GetPrimaryDisplayNode() is seg_display
    assert seg_display.GetColorNodeID() == nodes.color.GetID()
    assert tuple(seg_display.GetScalarRange()) == (0.0, 1.0)
    assert seg_display.GetScalarRangeFlag() != seg_display.UseDirectMapping
    lo, hi = nodes.color.GetColorTransferFunction().GetRange()
    assert (lo, hi) == (0.0, 1.0)
    assert np.allclose(nodes.color.GetColorTransferFunction().GetColor(0.92), probability_color(0.92), atol=1e-6)
    # PET over CT with a PET colour map in every slice view
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        comp = composites.GetItemAsObject(i)
        assert comp.GetBackgroundVolumeID() == ct.GetID() and comp.GetForegroundVolumeID() == pet.GetID()
    assert pet.GetDisplayNode().GetColorNode().GetName() == "PET-Heat"
    # subject hierarchy: one folder next to the CT, in the same study
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(seg))
    assert sh.GetItemParent(folder) == study
    for node in (nodes.table, nodes.text):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder
    assert mrml.find_result_nodes(scene, seg).table is nodes.table


def test_segment_centres_are_where_the_stations_are(shown, case):
    _scene, _ct, _pet, nodes, _study = shown
    for name in ("4R", "10L", "7"):
        centre = nodes.segmentation.GetSegmentCenterRAS(name)
        expected = mrml.lps_to_ras(case.centres_lps[name])
        assert np.allclose(centre, expected, atol=3.1), name  # one voxel
    # 4R is on the patient's right: LPS x = -18 mm (LPS +x = left), RAS x = +18 mm (RAS +x = right)
    assert nodes.segmentation.GetSegmentCenterRAS("4R")[0] == pytest.approx(18.0, abs=3.1)
    assert mrml.station_center_ras(case.result, "4R")[0] == pytest.approx(18.0)  # RAS x = -LPS x


def test_restage_after_override_updates_nodes_in_place(shown, case):
    scene, _ct, _pet, nodes, _study = shown
    ids = (nodes.segmentation.GetID(), nodes.table.GetID(), nodes.text.GetID())
    before = {st.name: _rgb(nodes.segmentation.GetSegmentation().GetSegment(st.name)) for st in case.result.stations}
    restaged = case.result.restage(overrides={"10L": "negative"})
    mrml.update_result(nodes, restaged)
    seg = nodes.segmentation
    assert (seg.GetID(), nodes.table.GetID(), nodes.text.GetID()) == ids
    assert seg.GetAttribute(mrml.ATTR_N_STAGE) == "N2"
    assert seg.GetAttribute(mrml.ATTR_TNM9) == "N2b"
    assert seg.GetAttribute(mrml.ATTR_DECIDING) == "4R;7"
    segment = seg.GetSegmentation().GetSegment("10L")
    assert mrml.segment_tag(segment, mrml.TAG_OVERRIDE) == "negative" and mrml.segment_tag(segment, mrml.TAG_STATUS) == "negative"
    after = {st.name: _rgb(seg.GetSegmentation().GetSegment(st.name)) for st in restaged.stations}
    assert after == before  # colours show probabilities, which an override does not change
    status_col = [nodes.table.GetCellText(r, 2) for r in range(17)]
    assert status_col[13] == "negative"
    assert nodes.table.GetCellText(13, 3) == "negative"
    assert "Reader overrides: 10L -> negative" in nodes.text.GetText()
    # threshold 0.6: 7 falls out -> N2a
    mrml.update_result(nodes, restaged.restage(threshold=0.6))
    assert seg.GetAttribute(mrml.ATTR_TNM9) == "N2a"
    stored = mrml.result_from_node(seg)
    assert stored.threshold == pytest.approx(0.6) and stored.station("10L").override == "negative"
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1


def test_seg_nrrd_round_trip(shown, case, tmp_path, app):
    _scene, _ct, _pet, nodes, _study = shown
    path = mrml.save_segmentation(nodes.segmentation, tmp_path / "case.seg.nrrd")
    assert path.is_file() and not list(tmp_path.glob(".*part*"))
    loaded = mrml.load_segmentation(app.scene, path, "reloaded")
    seg = loaded.GetSegmentation()
    assert seg.GetNumberOfSegments() == 17
    lab = sitk.GetArrayFromImage(case.stations)
    for st in case.result.stations:
        segment = seg.GetSegment(st.name)
        original = nodes.segmentation.GetSegmentation().GetSegment(st.name)
        assert segment.GetName() == f"Station {st.name}"
        assert np.allclose(_rgb(segment), _rgb(original), atol=1e-4)
        assert mrml.segment_tag(segment, mrml.TAG_PROBABILITY) == mrml.segment_tag(original, mrml.TAG_PROBABILITY)
        assert mrml.segment_tag(segment, mrml.TAG_STATUS) == st.status
        assert segment.GetTerminology() == original.GetTerminology()
    # voxels: the file, read as a plain NRRD, holds the station labels on the same grid
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 4:
        arr = arr[..., 0]
    assert img.GetSize()[:3] == case.stations.GetSize()
    assert np.allclose(img.GetOrigin(), case.stations.GetOrigin())
    names = {img.GetMetaData(f"Segment{i}_Name"): int(img.GetMetaData(f"Segment{i}_LabelValue"))
             for i in range(17)}
    for st in STATIONS:
        assert np.array_equal(arr == names[f"Station {st.name}"], lab == st.label), st.name


def test_seg_nrrd_read_by_slicerio(shown, case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    _scene, _ct, _pet, nodes, _study = shown
    path = mrml.save_segmentation(nodes.segmentation, tmp_path / "case.seg.nrrd")
    info = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in info["segments"]]
    assert names == [f"Station {s.name}" for s in STATIONS]
    colors = {s["name"]: s["color"] for s in info["segments"]}
    assert np.allclose(colors["Station 4R"], probability_color(0.92), atol=1e-3)


def test_jump_to_station_centres_slice_views(shown, app, case):
    scene, _ct, _pet, nodes, _study = shown
    view = app.slice_view()
    ras = mrml.jump_to_station(scene, case.result, "10L", nodes.segmentation)
    assert ras == pytest.approx(mrml.lps_to_ras(case.centres_lps["10L"]))
    assert view.node.GetSliceOffset() == pytest.approx(ras[2], abs=1e-3)
    assert mrml.jump_to_station(scene, case.result, "9") is None  # absent station: no jump


def test_volume_round_trip_keeps_lps_geometry(app):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    node = mrml.volume_node_from_image(app.scene, img, "v")
    assert node.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    back = mrml.image_from_volume_node(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert back.GetSpacing() == pytest.approx(img.GetSpacing())
    assert back.GetDirection() == pytest.approx(img.GetDirection())
    idx = (3, 2, 1)
    assert back.TransformIndexToPhysicalPoint(idx) == pytest.approx(img.TransformIndexToPhysicalPoint(idx))


def test_bad_inputs_raise_with_a_clear_message(app, case):
    bad = sitk.Image(4, 4, 4, sitk.sitkUInt8) + 30
    with pytest.raises(mrml.InputError, match="label values 0..17"):
        mrml.show_result(app.scene, case.result, bad)
    with pytest.raises(mrml.InputError, match=".seg.nrrd"):
        mrml.save_segmentation(app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), "x.nrrd")
    with pytest.raises(mrml.InputError, match="holds no LymphNodeStaging result"):
        mrml.result_from_node(app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))


def test_export_writes_all_files(shown, case, tmp_path):
    _scene, _ct, _pet, nodes, _study = shown
    paths = mrml.export_result(nodes, case.result, tmp_path / "out")
    assert set(paths) == {"segmentation", "json", "csv", "report"}
    data = json.loads(paths["json"].read_text())
    assert data["n_stage"] == "N3"
    assert paths["csv"].read_text().count("\n") == 18
    assert "N3" in paths["report"].read_text()
