"""MRML bridge: shows a case assessment in a Slicer scene and exports it. Qt-free; the scene is always passed in.

What it builds for one case (``show_result``):

* a segmentation node with the 17 stations as segments (ID = station name, name "Station 4R"), each coloured by
  its malignancy probability through one colour map (green 0 -> yellow 0.5 -> red 1) that also feeds a colour
  legend, with an IASLC terminology entry and per-segment tags (probability, status, SUVmax, SUVpeak, agreement,
  override);
* a table node (one row per station), a text node with the N-stage report, and the N-stage, TNM 9 category, rule
  set and deciding stations as attributes of the segmentation node (the full result JSON too, so that a saved scene
  can be re-staged after reloading);
* for a result computed with the synthetic demo atlases or the demo model: the demo banner as the first line of the
  report, as an attribute of the result nodes (``ATTR_PROVENANCE``) and in the colour legend's title, so that it
  shows in every view;
* with lymph nodes (a node model ran): a second segmentation node ("Lymph nodes") with one segment per node, named
  after its station and short axis ("4R node 12 mm"), coloured by station (``staging.colors.station_color``), tagged
  with its measurements, and a node table (one row per node); ``jump_to_node`` centres the slice views on the node of
  a table row;
* all of it in one subject-hierarchy folder next to the CT volume.

``update_result`` re-stages in place (colours do not change: probabilities are fixed; statuses, tags, table, text
and attributes do; the lymph nodes do not depend on the staging). The same code runs in the Slicer application, in
``Slicer --python-script`` and in tests with the headless core.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..assessment.dicom_seg import station_codes
from ..errors import InputError
from ..io.files import atomic_path
from ..staging.colors import COLOR_POINTS, probability_color, station_color
from ..staging.result import ABSENT, CaseResult
from ..staging.stations import STATIONS, Station

log = logging.getLogger(__name__)

PREFIX = "LymphNodeStaging."
ATTR_ROLE = PREFIX + "Role"
ATTR_N_STAGE = PREFIX + "NStage"
ATTR_TNM9 = PREFIX + "TNM9"
ATTR_DECIDING = PREFIX + "DecidingStations"
ATTR_RULES = PREFIX + "RuleSet"
ATTR_SIDE = PREFIX + "TumourSide"
ATTR_THRESHOLD = PREFIX + "Threshold"
ATTR_CASE = PREFIX + "CaseId"
ATTR_RESULT = PREFIX + "ResultJSON"
ATTR_PROVENANCE = PREFIX + "Provenance"  # the demo statement; "" for a result without demo provenance
TAG_STATION = PREFIX + "Station"
TAG_PROBABILITY = PREFIX + "Probability"
TAG_STATUS = PREFIX + "Status"
TAG_OVERRIDE = PREFIX + "Override"
TAG_SUV_MAX = PREFIX + "SUVmax"
TAG_SUV_PEAK = PREFIX + "SUVpeak"
TAG_AGREEMENT = PREFIX + "Agreement"
TAG_NODE_ID = PREFIX + "NodeId"
TAG_SHORT_AXIS = PREFIX + "ShortAxisMm"
TAG_LONG_AXIS = PREFIX + "LongAxisMm"
TAG_VOLUME = PREFIX + "VolumeMl"
TAG_SCORE = PREFIX + "Score"

COLOR_MAP_NAME = "LymphNodeStaging probability"
LEGEND_TITLE = "Malignancy probability"
#: Second line of the legend title for a result with demo provenance (the views show it next to the colour bar).
LEGEND_DEMO_LINE = "DEMO - not for patients"
LEGEND_DEMO_COLOR = (1.0, 0.3, 0.25)
#: Column names of the station table (the names stay English: scripts read columns by name; the titles shown in
#: the table view can be translated, see ``set_column_titles``).
TABLE_COLUMNS = ("Station", "Probability", "Status", "Override", "SUVmax", "SUVpeak", "Agreement", "Group",
                 "TopNode", "NodeProbability")
#: Column names of the lymph node table (one row per node, in id order); the same rule for names and titles.
NODE_TABLE_COLUMNS = ("ID", "Station", "ShortAxis", "LongAxis", "Volume", "SUVmax", "Score", "Probability")
#: Name of the lymph node segmentation (after the case id).
NODES_NAME = "Lymph nodes"

# Terminology (Slicer's "category~type~modifier" entry): category "Anatomical Structure" as in Slicer's general
# anatomy list, the lymph node site of the station as type (SNOMED CT, shared with the DICOM SEG export) and the
# laterality as type modifier.
SLICER_CATEGORY = ("SCT", "123037004", "Anatomical Structure")
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def segment_tag(segment, name: str) -> str | None:
    """The value of a segment tag, None when the tag is not set."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


# ----- geometry ------------------------------------------------------------------------------------------------
def ijk_to_ras(image: sitk.Image) -> vtk.vtkMatrix4x4:
    """IJK-to-RAS matrix of a SimpleITK image (SimpleITK is LPS: the first two rows flip sign)."""
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got {image.GetDimension()}D")
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    m[:2, :] *= -1.0
    m[3, :] = (0.0, 0.0, 0.0, 1.0)
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def lps_to_ras(point) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData from an array indexed [k, j, i] (SimpleITK/slicer.util order)."""
    array = np.ascontiguousarray(array)
    data = vtk.vtkImageData()
    data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    data.GetPointData().SetScalars(vtk_array)
    return data


def volume_node_from_image(scene, image: sitk.Image, name: str, *, labelmap: bool = False, node=None):
    """A scalar (or label map) volume node holding a copy of ``image``, with its geometry."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(cls, name)
    array = sitk.GetArrayViewFromImage(image)
    if labelmap:
        array = array.astype(np.int16)
    node.SetIJKToRASMatrix(ijk_to_ras(image))
    node.SetAndObserveImageData(_image_data(array))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def image_from_volume_node(node) -> sitk.Image:
    """A SimpleITK image (LPS) from a scalar volume node (parent transforms are not applied)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
        raise InputError(f"expected a scalar volume node with image data, got {node!r}")
    data = node.GetImageData()
    nx, ny, nz = data.GetDimensions()
    scalars = data.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"volume {node.GetName()!r}: expected one scalar component, got "
                         f"{scalars.GetNumberOfComponents()}")
    array = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    a = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    a[:2, :] *= -1.0  # RAS -> LPS
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    image = sitk.GetImageFromArray(array.copy())
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (a[:3, :3] / spacing).ravel()))
    return image


# ----- display of the inputs -----------------------------------------------------------------------------------
#: CT in a mediastinal window (width, level in HU).
CT_WINDOW = (400.0, 40.0)
#: PET as a nuclear-medicine reader fuses it: SUV 0..12 on the hot-iron scale (PET-Heat), transparent below SUV 2.5,
#: so that the blood pool (SUV about 1.5-2.5) and soft tissue leave the CT visible and hot nodes stand out.
PET_SUV_RANGE = (0.0, 12.0)
PET_SUV_THRESHOLD = 2.5


def show_pet_over_ct(scene, ct_node, pet_node=None, *, opacity: float = 0.6, suv_range: tuple[float, float] =
                     PET_SUV_RANGE, suv_threshold: float | None = PET_SUV_THRESHOLD,
                     pet_color: str = "PET-Heat", ct_window: tuple[float, float] = CT_WINDOW) -> None:
    """CT in the background (mediastinal window), PET in the foreground of every slice view: a PET colour map over
    ``suv_range``, transparent below ``suv_threshold`` (None: the whole PET is blended), at ``opacity``."""
    ct_display = ct_node.GetDisplayNode() or (ct_node.CreateDefaultDisplayNodes() or ct_node.GetDisplayNode())
    ct_display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    ct_display.SetAutoWindowLevel(False)
    ct_display.SetWindowLevel(*ct_window)
    if pet_node is not None:
        pet_display = pet_node.GetDisplayNode() or (pet_node.CreateDefaultDisplayNodes()
                                                     or pet_node.GetDisplayNode())
        color = scene.GetFirstNodeByName(pet_color)
        if color is not None:
            pet_display.SetAndObserveColorNodeID(color.GetID())
        pet_display.SetAutoWindowLevel(False)
        pet_display.SetWindowLevelMinMax(*suv_range)
        pet_display.SetAutoThreshold(False)
        if suv_threshold is None:
            pet_display.SetApplyThreshold(False)
        else:
            pet_display.SetThreshold(float(suv_threshold), 1.0e6)  # no upper limit: the hottest voxels stay shown
            pet_display.SetApplyThreshold(True)
    for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(ct_node.GetID())
        composite.SetForegroundVolumeID(pet_node.GetID() if pet_node is not None else None)
        composite.SetForegroundOpacity(opacity if pet_node is not None else 0.0)


def _nodes(scene, cls: str) -> list:
    col = scene.GetNodesByClass(cls)
    return [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems())]


# ----- colours -------------------------------------------------------------------------------------------------
def probability_color_node(scene):
    """The probability colour map (a procedural colour node over 0..1), created once per scene."""
    node = scene.GetFirstNodeByName(COLOR_MAP_NAME)
    if node is not None and node.IsA("vtkMRMLProceduralColorNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", COLOR_MAP_NAME)
    node.SetAttribute(ATTR_ROLE, "probability-colors")
    ctf = vtk.vtkColorTransferFunction()
    for p, r, g, b in COLOR_POINTS:
        ctf.AddRGBPoint(p, r, g, b)
    ctf.SetColorSpaceToRGB()
    node.SetAndObserveColorTransferFunction(ctf)
    node.SetDescription("Malignancy probability of a lymph node station: green 0, yellow 0.5, red 1")
    return node


def _add_legend(scene, seg_node, color_node):
    """A colour legend (probability 0..1) shown in every view where the segmentation is shown.

    Slicer's colour legend displayable manager draws the colours and the range of the legend's *primary display
    node* (here the segmentation display node), not those set on the legend node: without a colour node on the
    segmentation display node it hides the legend ("No color node is set in primary display node"), and without a
    scalar range it labels 0..100. It updates its actor only on a ModifiedEvent of the legend node, so the legend
    is signalled once it is attached.
    """
    display = seg_node.GetDisplayNode()
    if display is None:
        raise InputError(f"segmentation {seg_node.GetName()!r} has no display node for the colour legend")
    # segments keep their own colours; the display node's colour node and range only feed the legend
    display.SetAndObserveColorNodeID(color_node.GetID())
    display.SetScalarRangeFlag(display.UseManualScalarRange)
    display.SetScalarRange(0.0, 1.0)
    legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode", f"{seg_node.GetName()} legend")
    legend.SetAndObserveColorNodeID(color_node.GetID())
    legend.SetTitleText(LEGEND_TITLE)
    legend.SetLabelFormat("%.2f")  # 5 labels: 0, 0.25, 0.5, 0.75, 1
    legend.SetNumberOfLabels(5)
    legend.SetUseColorNamesForLabels(False)
    legend.SetOrientation(legend.Vertical)
    legend.SetPosition(0.95, 0.5)
    legend.SetSize(0.12, 0.5)
    seg_node.AddAndObserveDisplayNodeID(legend.GetID())
    legend.SetAndObservePrimaryDisplayNode(display)
    legend.Modified()
    return legend


# ----- terminology ---------------------------------------------------------------------------------------------
def station_terminology(station: Station | str) -> str:
    """Slicer terminology entry string of a station: lymph node site (SNOMED CT) with laterality."""
    _category, site, laterality = station_codes(station)

    def code(scheme: str, value: str, meaning: str) -> str:
        return f"{scheme}^{value}^{meaning}"

    modifier = code(laterality.scheme, laterality.value, laterality.meaning) if laterality else "^^"
    return "~".join([TERMINOLOGY_CONTEXT, code(*SLICER_CATEGORY), code(site.scheme, site.value, site.meaning),
                     modifier, ANATOMIC_CONTEXT, "^^", "^^"])


# ----- result nodes --------------------------------------------------------------------------------------------
@dataclass
class ResultNodes:
    """The nodes that show one case."""

    segmentation: object
    table: object
    text: object
    color: object
    legend: object | None
    folder_item: int
    node_segmentation: object | None = None  # the lymph nodes, one segment each (when the result has nodes)
    node_table: object | None = None  # one row per lymph node

    def all_nodes(self) -> list:
        return [n for n in (self.segmentation, self.table, self.text, self.legend, self.node_segmentation,
                            self.node_table) if n is not None]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _import_labels(seg_node, labels: sitk.Image, segment_ids: list[str], what: str) -> None:
    """Label value k (1..n) of ``labels`` becomes the segment ``segment_ids[k - 1]`` of ``seg_node`` (every ID gets
    a segment, empty when its label is absent)."""
    scene = seg_node.GetScene()
    if labels.GetDimension() != 3:
        raise InputError(f"{what}: expected a 3D label image, got {labels.GetDimension()}D")
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    bad = [v.item() for v in values if v != 0 and not 1 <= v <= len(segment_ids)]
    if bad or not np.allclose(values, np.round(values)):
        raise InputError(f"{what}: expected label values 0..{len(segment_ids)}, found {bad or values.tolist()}")
    if len(segment_ids) > np.iinfo(np.int16).max:
        raise InputError(f"{what}: {len(segment_ids)} labels do not fit a Slicer label map (at most 32767)")
    labelmap = volume_node_from_image(scene, labels, f"LymphNodeStaging {what} (import)", labelmap=True)
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg_node, ids):
            raise InputError(f"{what}: importing the label map into the segmentation failed")
    finally:
        scene.RemoveNode(labelmap)


def _set_segments(seg_node, station_map: sitk.Image) -> None:
    _import_labels(seg_node, station_map, [st.name for st in STATIONS], "station map")
    segmentation = seg_node.GetSegmentation()
    for st in STATIONS:
        segment = segmentation.GetSegment(st.name)
        segment.SetName(f"Station {st.name}")
        segment.SetTag(TAG_STATION, st.name)
        segment.SetTerminology(station_terminology(st))


def show_result(scene, result: CaseResult, station_map: sitk.Image, *, reference_node=None,
                nodes: ResultNodes | None = None, name: str | None = None,
                node_map: sitk.Image | None = None) -> ResultNodes:
    """Create (or refill) the result nodes of a case. ``reference_node``: the CT, for geometry and hierarchy.

    For a result with lymph nodes (``result.nodes`` not None) the node table is made too, and with ``node_map`` (the
    instance map of the nodes: ids of ``result.nodes``, 0 = background) the "Lymph nodes" segmentation."""
    name = name or f"{result.case_id} stations"
    color = probability_color_node(scene)
    if nodes is None:
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.CreateDefaultDisplayNodes()
        seg.SetAttribute(ATTR_ROLE, "stations")
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{result.case_id} station table")
        table.SetAttribute(ATTR_ROLE, "table")
        text = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{result.case_id} N-stage report")
        text.SetAttribute(ATTR_ROLE, "report")
        legend = _add_legend(scene, seg, color)
        nodes = ResultNodes(seg, table, text, color, legend, 0)
    else:
        nodes.segmentation.GetSegmentation().RemoveAllSegments()
    seg = nodes.segmentation
    _set_segments(seg, station_map)
    if reference_node is not None:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    display = seg.GetDisplayNode()
    display.SetOpacity2DFill(0.3)  # light fill and a full outline: the fused PET stays readable inside a station
    display.SetOpacity2DOutline(1.0)
    display.SetOpacity3D(0.8)
    _show_nodes(scene, nodes, result, node_map, reference_node)
    _place_in_hierarchy(scene, nodes, reference_node, result.case_id)
    update_result(nodes, result)
    return nodes


# ----- lymph nodes ---------------------------------------------------------------------------------------------
def node_segment_name(node: dict) -> str:
    """Segment name of a lymph node: its station and short axis rounded to mm, e.g. "4R node 12 mm" ("node 7 mm"
    outside every station)."""
    short = int(np.floor(float(node.get("short_axis_mm") or 0.0) + 0.5))
    station = node.get("station")
    return f"{station} node {short} mm" if station else f"node {short} mm"


def node_segment_id(node_id: int) -> str:
    return f"node-{int(node_id)}"


def _node_ids(result: CaseResult) -> list[int]:
    ids = [int(n["id"]) for n in result.nodes or []]
    if ids != list(range(1, len(ids) + 1)):
        raise InputError(f"case result {result.case_id}: lymph node ids must be 1..{len(ids)} in order, got {ids[:10]}")
    return ids


def _show_nodes(scene, nodes: ResultNodes, result: CaseResult, node_map: sitk.Image | None, reference_node) -> None:
    """The node table (a result with nodes) and the "Lymph nodes" segmentation (with ``node_map``); nodes shown
    before are removed (a refill with a result without nodes empties them)."""
    if result.nodes is None and node_map is not None:
        raise InputError(f"a lymph node map was given, but the result of case {result.case_id} has no nodes "
                         "(no node model ran)")
    ids = _node_ids(result)
    if nodes.node_segmentation is not None:
        nodes.node_segmentation.GetSegmentation().RemoveAllSegments()
    if result.nodes is None:
        if nodes.node_table is not None:
            _fill_table(nodes.node_table, NODE_TABLE_COLUMNS, {"ID", "Station"}, [], {})
        return
    if node_map is not None:
        seg = nodes.node_segmentation
        if seg is None:
            seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{result.case_id} {NODES_NAME}")
            seg.CreateDefaultDisplayNodes()
            seg.SetAttribute(ATTR_ROLE, "nodes")
            seg.SetAttribute(ATTR_CASE, result.case_id)
            nodes.node_segmentation = seg
        if ids:
            _import_labels(seg, node_map, [node_segment_id(i) for i in ids], "lymph node map")
        segmentation = seg.GetSegmentation()
        for record in result.nodes:
            segment = segmentation.GetSegment(node_segment_id(record["id"]))
            segment.SetName(node_segment_name(record))
            segment.SetColor(*station_color(record.get("station")))
            segment.SetTag(TAG_NODE_ID, str(int(record["id"])))
            segment.SetTag(TAG_STATION, record.get("station") or "")
            segment.SetTag(TAG_SHORT_AXIS, _fmt(record.get("short_axis_mm"), 1))
            segment.SetTag(TAG_LONG_AXIS, _fmt(record.get("long_axis_mm"), 1))
            segment.SetTag(TAG_VOLUME, _fmt(record.get("volume_ml"), 3))
            segment.SetTag(TAG_SUV_MAX, _fmt(record.get("suv_max"), 2))
            segment.SetTag(TAG_SCORE, _fmt(record.get("score"), 3))
            if record.get("station"):
                segment.SetTerminology(station_terminology(record["station"]))
        if reference_node is not None:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        display = seg.GetDisplayNode()
        display.SetOpacity2DFill(0.45)  # small objects: a stronger fill than the stations', and a full outline
        display.SetOpacity2DOutline(1.0)
        display.SetOpacity3D(1.0)
    if nodes.node_table is None:
        nodes.node_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{result.case_id} lymph node table")
        nodes.node_table.SetAttribute(ATTR_ROLE, "node-table")
    rows = [{"ID": str(int(n["id"])), "Station": n.get("station") or "", "ShortAxis": n.get("short_axis_mm"),
             "LongAxis": n.get("long_axis_mm"), "Volume": n.get("volume_ml"), "SUVmax": n.get("suv_max"),
             "Score": n.get("score"), "Probability": n.get("probability")} for n in result.nodes]
    _fill_table(nodes.node_table, NODE_TABLE_COLUMNS, {"ID", "Station"}, rows, {
        "ID": "lymph node id (its label in nodes.nii.gz)", "Station": "station the node lies in (empty: none)",
        "ShortAxis": "short axis in mm (axial slice of largest area)", "LongAxis": "long axis in mm",
        "Volume": "volume in ml", "SUVmax": "maximum SUV in the node", "Score": "detection score (0..1)",
        "Probability": "malignancy probability of the node (node classifier; empty when none ran)"})
    for col, unit in (("ShortAxis", "mm"), ("LongAxis", "mm"), ("Volume", "ml")):
        nodes.node_table.SetColumnUnitLabel(col, unit)


def _place_in_hierarchy(scene, nodes: ResultNodes, reference_node, case_id: str) -> None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    if not nodes.folder_item:
        parent = sh.GetSceneItemID()
        if reference_node is not None:
            item = sh.GetItemByDataNode(reference_node)
            if item:
                parent = sh.GetItemParent(item)
        nodes.folder_item = sh.CreateFolderItem(parent, f"Lymph node staging {case_id}")
    for node in (nodes.segmentation, nodes.table, nodes.text, nodes.node_segmentation, nodes.node_table):
        if node is None:
            continue
        item = sh.GetItemByDataNode(node) or sh.CreateItem(nodes.folder_item, node)
        sh.SetItemParent(item, nodes.folder_item)


def update_result(nodes: ResultNodes, result: CaseResult) -> None:
    """Write a (re-staged) result into the nodes: segment colours and tags, table, text, attributes."""
    seg = nodes.segmentation
    segmentation = seg.GetSegmentation()
    with _modify(seg):
        for st in result.stations:
            segment = segmentation.GetSegment(st.name)
            if segment is None:
                raise InputError(f"segmentation {seg.GetName()!r} has no segment {st.name!r}")
            segment.SetColor(*probability_color(st.probability if st.present else None))
            segment.SetTag(TAG_PROBABILITY, _fmt(st.probability))
            segment.SetTag(TAG_STATUS, st.status)
            segment.SetTag(TAG_OVERRIDE, st.override or "")
            segment.SetTag(TAG_SUV_MAX, _fmt(st.suv_max, 2))
            segment.SetTag(TAG_SUV_PEAK, _fmt(st.suv_peak, 2))
            segment.SetTag(TAG_AGREEMENT, _fmt(st.agreement))
        attrs = {
            ATTR_CASE: result.case_id, ATTR_N_STAGE: result.n_stage, ATTR_TNM9: result.tnm9,
            ATTR_DECIDING: ";".join(result.deciding_stations), ATTR_RULES: result.rules, ATTR_SIDE: result.side,
            ATTR_THRESHOLD: f"{result.threshold:.3f}", ATTR_RESULT: json.dumps(result.to_dict(), default=str),
            ATTR_PROVENANCE: demo_statement(result),
        }
        for key, value in attrs.items():
            seg.SetAttribute(key, value)
    display = seg.GetDisplayNode()
    if display is not None:
        for st in result.stations:
            # absent stations (empty segments) are hidden
            display.SetSegmentVisibility(st.name, st.status != ABSENT)
    _fill_table(nodes.table, TABLE_COLUMNS, {"Station", "Status", "Override", "Group", "TopNode"}, _station_rows(result),
                STATION_DESCRIPTIONS)
    nodes.text.SetText(report_text(result))
    for node in (nodes.table, nodes.text):
        node.SetAttribute(ATTR_N_STAGE, result.n_stage)
        node.SetAttribute(ATTR_TNM9, result.tnm9)
        node.SetAttribute(ATTR_PROVENANCE, demo_statement(result))
    if nodes.legend is not None:
        _set_legend_title(nodes.legend, bool(result.demo_banner))


def _set_legend_title(legend, demo: bool) -> None:
    """The legend's title: with a second line in red for a demo result, which every view then shows."""
    title = LEGEND_TITLE + (f"\n{LEGEND_DEMO_LINE}" if demo else "")
    color = LEGEND_DEMO_COLOR if demo else (1.0, 1.0, 1.0)
    prop = legend.GetTitleTextProperty()
    if legend.GetTitleText() == title and tuple(prop.GetColor()) == color:
        return
    legend.SetTitleText(title)
    prop.SetColor(*color)
    prop.SetBold(demo)
    legend.Modified()


def demo_statement(result: CaseResult) -> str:
    """The demo provenance statement of a result ("" when it was computed with neither the synthetic demo atlases
    nor the demo model)."""
    return str(result.provenance.get("statement") or "") if result.demo_banner else ""


class _modify:
    """StartModify/EndModify as a context manager (one Modified event)."""

    def __init__(self, node) -> None:
        self.node = node

    def __enter__(self):
        self.was = self.node.StartModify()
        return self.node

    def __exit__(self, *exc) -> None:
        self.node.EndModify(self.was)


def _station_rows(result: CaseResult) -> list[dict]:
    top = result.top_nodes()
    return [{"Station": st.name, "Probability": st.probability, "Status": st.status, "Override": st.override or "",
             "SUVmax": st.suv_max, "SUVpeak": st.suv_peak, "Agreement": st.agreement,
             "Group": result.groups.get(st.name, ""),
             "TopNode": str(int(top[st.name]["id"])) if st.name in top else "",
             "NodeProbability": st.node_probability} for st in result.stations]


STATION_DESCRIPTIONS = {"Probability": "malignancy probability (0..1)", "SUVmax": "maximum SUV in the station",
                        "SUVpeak": "mean SUV in a 1 cm^3 sphere at the hottest voxel",
                        "Agreement": "atlas agreement (mean pairwise Dice)", "Group": "N group of a positive station",
                        "TopNode": "most suspicious lymph node of the station (its id in the node table)",
                        "NodeProbability": "the station's malignancy probability from its nodes (node classifier)"}


def _fill_table(table_node, columns: tuple[str, ...], string_columns: set[str], rows: list[dict],
                descriptions: dict[str, str]) -> None:
    """Replace the table's contents with ``rows`` (a dict per row; numbers as doubles, None as NaN), locked."""
    table = vtk.vtkTable()
    arrays = {}
    for col in columns:
        arr = vtk.vtkStringArray() if col in string_columns else vtk.vtkDoubleArray()
        arr.SetName(col)
        arrays[col] = arr
        table.AddColumn(arr)
    for row in rows:
        for col, arr in arrays.items():
            v = row[col]
            if col in string_columns:
                arr.InsertNextValue(str(v))
            else:
                arr.InsertNextValue(float("nan") if v is None else float(v))
    was = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # computed values: not editable in the table view (overrides go through re-staging)
    for col, text in descriptions.items():
        table_node.SetColumnDescription(col, text)
    table_node.EndModify(was)


def set_column_titles(table_node, titles: dict[str, str]) -> None:
    """Titles shown in the table view's header for the columns named in ``titles`` (e.g. translated ones); the
    column names stay as they are. Kept when the table is refilled."""
    was = table_node.StartModify()
    for name, title in titles.items():
        if table_node.GetColumnIndex(name) < 0:
            raise InputError(f"table {table_node.GetName()!r} has no column {name!r}")
        table_node.SetColumnTitle(name, title)
    table_node.EndModify(was)


def report_text(result: CaseResult) -> str:
    """Plain-text report: N-stage, TNM 9, deciding stations, rule set, threshold, positive and overridden stations,
    the warnings; a result computed with the synthetic demo atlases or the demo model starts with the demo banner."""
    lines = [result.demo_banner] if result.demo_banner else []
    lines += [
        f"Case {result.case_id}: {result.n_stage} (TNM 9: {result.tnm9})",
        f"Deciding stations: {', '.join(result.deciding_stations) or 'none'}",
        f"Rule set: {result.rules}; tumour side: {result.side}; probability threshold: {result.threshold:.2f}",
        f"Positive stations: {', '.join(result.positive_stations()) or 'none'}",
    ]
    overridden = [f"{s.name} -> {s.override}" for s in result.stations if s.override]
    if overridden:
        lines.append(f"Reader overrides: {', '.join(overridden)}")
    if result.explanation:
        lines.append(result.explanation)
    demo = demo_statement(result)
    warnings = [w for w in result.warnings if w != demo]
    if warnings:
        lines.append("Warnings:")
        lines.extend(f"- {w}" for w in warnings)
    lines.append("Not a medical device; results must be reviewed by a qualified physician.")
    return "\n".join(lines)


def result_from_node(seg_node) -> CaseResult:
    """The CaseResult stored on a segmentation node by ``show_result`` (e.g. after loading a saved scene)."""
    text = seg_node.GetAttribute(ATTR_RESULT) if seg_node is not None else None
    if not text:
        raise InputError(f"node {seg_node.GetName() if seg_node else None!r} holds no LymphNodeStaging result "
                         f"(attribute {ATTR_RESULT} missing)")
    return CaseResult.from_dict(json.loads(text))


def find_result_nodes(scene, seg_node) -> ResultNodes:
    """The ResultNodes of a segmentation made by ``show_result`` (table, text, legend found next to it)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(seg_node))
    found = {}
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder, children)
    for i in range(children.GetNumberOfIds()):
        node = sh.GetItemDataNode(children.GetId(i))
        if node is not None and node.GetAttribute(ATTR_ROLE):
            found[node.GetAttribute(ATTR_ROLE)] = node
    legend = None
    for i in range(seg_node.GetNumberOfDisplayNodes()):
        d = seg_node.GetNthDisplayNode(i)
        if d is not None and d.IsA("vtkMRMLColorLegendDisplayNode"):
            legend = d
    if "table" not in found or "report" not in found:
        raise InputError(f"no table or report node next to segmentation {seg_node.GetName()!r}")
    return ResultNodes(seg_node, found["table"], found["report"], probability_color_node(scene), legend, folder,
                       found.get("nodes"), found.get("node-table"))


# ----- navigation ----------------------------------------------------------------------------------------------
def station_center_ras(result: CaseResult, station: str, seg_node=None) -> tuple[float, float, float] | None:
    """RAS centre of a station: the result's patch centre (LPS) if known, else the segment's centre."""
    st = result.station(station)
    if st.centre_mm is not None:
        return lps_to_ras(st.centre_mm)
    if seg_node is not None and st.present:
        centre = seg_node.GetSegmentCenterRAS(st.name)
        if centre is not None:
            return tuple(float(v) for v in centre)
    return None


def jump_to(scene, ras) -> tuple[float, float, float]:
    """Centre every slice view of the scene on a RAS point (each slice node's offset moves to the point) and put the
    crosshair there."""
    ras = tuple(float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    for crosshair in _nodes(scene, "vtkMRMLCrosshairNode"):
        crosshair.SetCrosshairRAS(*ras)
    return ras  # type: ignore[return-value]


def jump_to_station(scene, result: CaseResult, station: str, seg_node=None) -> tuple[float, float, float] | None:
    """Centre every slice view on the station; returns the RAS point (None for an absent station)."""
    ras = station_center_ras(result, station, seg_node)
    return None if ras is None else jump_to(scene, ras)


def node_center_ras(result: CaseResult, node_id: int) -> tuple[float, float, float]:
    """RAS centre of a lymph node of the result (its centroid, stored in LPS)."""
    for record in result.nodes or []:
        if int(record["id"]) == int(node_id):
            return lps_to_ras(record["centre_mm"])
    raise InputError(f"case result {result.case_id} has no lymph node {node_id}")


def jump_to_node(scene, result: CaseResult, table_node, row: int) -> tuple[float, float, float]:
    """Centre every slice view on the lymph node of row ``row`` (0-based) of the node table; returns the RAS point."""
    if table_node is None or table_node.GetAttribute(ATTR_ROLE) != "node-table":
        raise InputError(f"{table_node.GetName() if table_node is not None else None!r} is not a lymph node table")
    if not 0 <= int(row) < table_node.GetNumberOfRows():
        raise InputError(f"lymph node table {table_node.GetName()!r}: no row {row} (it has "
                         f"{table_node.GetNumberOfRows()})")
    text = table_node.GetCellText(int(row), table_node.GetColumnIndex("ID"))
    if not text.isdigit():
        raise InputError(f"lymph node table {table_node.GetName()!r}: row {row} has no node id ({text!r})")
    return jump_to(scene, node_center_ras(result, int(text)))


# ----- export --------------------------------------------------------------------------------------------------
def save_segmentation(seg_node, path: str | Path) -> Path:
    """Write the segmentation as .seg.nrrd (names, colours, tags and terminology kept), atomically."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise InputError(f"segmentation file {path}: expected a name ending in .seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    with atomic_path(path, suffix=".seg.nrrd") as tmp:
        storage.SetFileName(str(tmp))
        if not storage.WriteData(seg_node):
            raise InputError(f"writing segmentation {seg_node.GetName()!r} to {path} failed")
    return path


def load_segmentation(scene, path: str | Path, name: str | None = None):
    """Read a .seg.nrrd into a new segmentation node with Slicer's segmentation storage node."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation file {path} does not exist")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.split(".")[0])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"{path}: not readable as a Slicer segmentation (.seg.nrrd)")
    node.CreateDefaultDisplayNodes()
    return node


def export_result(nodes: ResultNodes, result: CaseResult, out_dir: str | Path, *, station_map: sitk.Image | None = None,
                  dicom_ct_dir: str | Path | None = None) -> dict[str, Path]:
    """Write .seg.nrrd (stations; lymph nodes when shown), result JSON and CSV, the report text, and DICOM SEG when
    the CT came from DICOM."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _safe(result.case_id)
    paths = {
        "segmentation": save_segmentation(nodes.segmentation, out_dir / f"{stem}_stations.seg.nrrd"),
        **({"node_segmentation": save_segmentation(nodes.node_segmentation, out_dir / f"{stem}_nodes.seg.nrrd")}
           if nodes.node_segmentation is not None else {}),
        "json": result.write_json(out_dir / f"{stem}_result.json"),
        "csv": result.write_csv(out_dir / f"{stem}_stations.csv"),
    }
    with atomic_path(out_dir / f"{stem}_report.txt") as tmp:
        tmp.write_text(report_text(result) + "\n", encoding="utf-8")
    paths["report"] = out_dir / f"{stem}_report.txt"
    if dicom_ct_dir is not None:
        if station_map is None:
            raise InputError("DICOM SEG export needs the station map (station_map=None was given)")
        from ..assessment.dicom_seg import write_dicom_seg

        paths["dicom_seg"] = write_dicom_seg(station_map, result, dicom_ct_dir, out_dir / f"{stem}_stations.seg.dcm")
    log.info("exported %s to %s", result.case_id, out_dir)
    return paths


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)) or "case"


__all__ = [
    "InputError", "ResultNodes", "export_result", "find_result_nodes", "ijk_to_ras",
    "image_from_volume_node", "jump_to", "jump_to_node", "jump_to_station", "load_segmentation", "node_center_ras",
    "node_segment_name", "probability_color", "probability_color_node",
    "demo_statement", "report_text", "result_from_node", "save_segmentation", "set_column_titles", "show_pet_over_ct", "show_result",
    "station_center_ras", "station_terminology", "update_result", "volume_node_from_image",
]
