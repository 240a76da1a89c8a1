"""The scripted module file against its .ui and stand-ins for qt/ctk/ScriptedLoadableModule, plus its logic and
its Slicer test class run on the real MRML core (headless)."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402
import standins  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "LymphNodeStaging"
MODULE_FILE = MODULE_DIR / "LymphNodeStaging.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LymphNodeStaging.ui"

ANY = None  # any widget class
#: what a use of ``self.ui.<name>.<member>`` requires of the widget class
MEMBER_CLASSES: dict[str, set[str] | None] = {
    "enabled": ANY, "toolTip": ANY, "visible": ANY, "layout": ANY,
    "appendPlainText": {"QPlainTextEdit"},
    "value": {"QProgressBar", "ctkSliderWidget", "QSlider", "QSpinBox", "QDoubleSpinBox"},
    "setFormat": {"QProgressBar"},
    "text": {"QLabel", "QPushButton", "QLineEdit"},
    "setMRMLTableNode": {"qMRMLTableView"},
    "currentText": {"QComboBox"}, "currentIndex": {"QComboBox"},
    "directory": {"ctkDirectoryButton"},
}
#: what a signal connected with ``self.ui.<name>.connect("signal(...)", ...)`` requires
SIGNAL_CLASSES: dict[str, set[str]] = {
    "clicked": {"QPushButton", "ctkPushButton", "qMRMLTableView"},
    "valueChanged": {"ctkSliderWidget", "QSlider", "QSpinBox", "QDoubleSpinBox"},
    "currentIndexChanged": {"QComboBox"},
    "currentNodeChanged": {"qMRMLNodeComboBox"},
}


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_uses() -> list[tuple[str, str, str | None, int]]:
    """(widget name, member, signal or None, line) for every ``self.ui.<name>.<member>`` in the module file."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            uses.append((node.attr, "", None, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "ui" and \
                node.attr != "connect":
            uses.append((node.value.attr, node.attr, None, node.lineno))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect" \
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute) \
                and node.func.value.value.attr == "ui" and node.args and isinstance(node.args[0], ast.Constant):
            uses.append((node.func.value.attr, "connect", node.args[0].value.split("(")[0], node.lineno))
    return uses


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of the parameterNodeWrapper class."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module file")


def test_every_ui_name_the_code_uses_exists_with_a_suitable_class():
    widgets = ui_widgets()
    uses = ui_uses()
    assert len({u[0] for u in uses}) >= 12
    problems = []
    for name, member, signal, line in uses:
        if name not in widgets:
            problems.append(f"line {line}: self.ui.{name} is not in {UI_FILE.name}")
            continue
        cls = widgets[name].get("class")
        if member == "connect":
            allowed = SIGNAL_CLASSES.get(signal)
            if allowed is None:
                problems.append(f"line {line}: signal {signal} of self.ui.{name} is not known to this test")
            elif cls not in allowed:
                problems.append(f"line {line}: self.ui.{name} is a {cls}, signal {signal} needs one of {allowed}")
        elif member:
            if member not in MEMBER_CLASSES:
                problems.append(f"line {line}: self.ui.{name}.{member} is not known to this test")
            elif MEMBER_CLASSES[member] is not ANY and cls not in MEMBER_CLASSES[member]:
                problems.append(f"line {line}: self.ui.{name} is a {cls}, .{member} needs one of "
                                f"{MEMBER_CLASSES[member]}")
    assert not problems, "\n".join(problems)


def test_parameter_names_in_the_ui_match_the_parameter_node():
    fields = parameter_fields()
    bound = {}
    for name, w in ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, w.get("class"))
    assert set(bound) == set(fields), (set(bound) ^ set(fields))
    for field, (name, cls) in bound.items():
        ann = fields[field]
        if ann.startswith(("vtkMRML", "Union[vtkMRML")):
            expected = {"qMRMLNodeComboBox"}
        elif ann == "bool":
            expected = {"QCheckBox"}
        elif "Choice" in ann:
            expected = {"QComboBox"}
        elif "float" in ann:
            expected = {"ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox"}
        else:
            expected = {"ctkPathLineEdit", "QLineEdit", "ctkDirectoryButton"}
        assert cls in expected, f"{name} ({cls}) bound to {field}: {ann} should be one of {expected}"
    # node selectors get the scene through the top widget's mrmlSceneChanged signal
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot").startswith("setMRMLScene")}
    selectors = {n for n, w in ui_widgets().items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert selectors <= receivers


def _children(section: str) -> set[str]:
    root = ET.parse(UI_FILE).getroot()
    button = next(w for w in root.iter("widget") if w.get("name") == section)
    return {w.get("name") for w in button.iter("widget")} - {section}


def _property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return "".join(prop.itertext()).strip()
    return None


def test_inputs_up_front_options_in_a_collapsed_advanced_section():
    inputs, advanced = _children("inputsCollapsibleButton"), _children("advancedCollapsibleButton")
    widgets = ui_widgets()
    assert {"ctSelector", "petSelector", "tumourSideComboBox", "loadDemoButton"} <= inputs
    assert {"petIsSuvCheckBox", "anatomySelector", "modelPathLineEdit", "atlasPathLineEdit", "ruleSetComboBox",
            "deviceComboBox"} <= advanced
    assert _property(widgets["advancedCollapsibleButton"], "collapsed") == "true"
    assert widgets["advancedCollapsibleButton"].get("class") == "ctkCollapsibleButton"
    assert _property(widgets["inputsCollapsibleButton"], "collapsed") in (None, "false")
    # the parameter node wrapper fills the combo boxes from the Choice annotations (the rule sets from the library)
    for name in ("tumourSideComboBox", "ruleSetComboBox", "deviceComboBox"):
        assert widgets[name].findall("item") == [], f"{name} lists items of its own"
    fields = parameter_fields()
    assert fields["ruleSet"] == "Annotated[str, Choice(available_rule_sets())]"
    # the results: the MRML table node's view (one set of columns), not a table widget of its own
    assert widgets["stationTableView"].get("class") == "qMRMLTableView"
    assert not [n for n, w in widgets.items() if w.get("class") == "QTableWidget"]


def test_resources_listed_in_cmake_exist():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "LymphNodeStaging")
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake
    listed = re.findall(r"^\s+([\w./]+\.(?:py|png|ui|json|txt))\s*$", cmake, flags=re.MULTILINE)
    assert len(listed) >= 15
    for rel in listed:
        assert (MODULE_DIR / rel).is_file(), f"{rel} is listed in the module CMakeLists.txt but does not exist"
    for rel in ("Resources/Icons/LymphNodeStaging.png", "Resources/UI/LymphNodeStaging.ui",
                "Resources/requirements.txt"):
        assert rel in cmake and (MODULE_DIR / rel).is_file()
    icon = MODULE_DIR / "Resources" / "Icons" / "LymphNodeStaging.png"
    assert icon.stat().st_size <= 20_000
    lib = MODULE_DIR.parent / "LymphNodeStagingLib"
    # the module runs the whole library (the assessment in a child process): every file must be installed
    for path in sorted(lib.rglob("*.py")) + sorted((lib / "resources").rglob("*.json")):
        rel = path.relative_to(MODULE_DIR.parent).as_posix()
        assert f"../{rel}" in listed, f"{rel} is not listed in the module CMakeLists.txt"


@pytest.fixture
def module(tmp_path):
    app = headless_slicer.HeadlessSlicer(tmp_path / "home")
    standins.install()
    sys.path.insert(0, str(MODULE_DIR))
    try:
        sys.modules.pop("LymphNodeStaging", None)
        mod = importlib.import_module("LymphNodeStaging")
        yield mod
    finally:
        sys.modules.pop("LymphNodeStaging", None)
        sys.path.remove(str(MODULE_DIR))
        standins.uninstall()
        app.close()


def test_module_metadata_and_parameter_node(module):
    parent = SimpleNamespace()
    module.LymphNodeStaging(parent)
    assert parent.title == "Lymph Node Staging"
    assert parent.categories == ["Nuclear Medicine"]
    assert parent.contributors and "Engelson" in parent.acknowledgementText and parent.helpText
    logic = module.LymphNodeStagingLogic()
    params = logic.getParameterNode()
    assert params.tumourSide == "R" and params.ruleSet == "ajcc8" and params.threshold == 0.5
    assert params.device == "auto" and params.petIsSuv is False  # a PET image file is SUV only when declared
    params.threshold = 0.3
    assert logic.getParameterNode().threshold == pytest.approx(0.3)  # singleton node in the scene


def test_module_self_test_runs_on_the_headless_core(module):
    test = module.LymphNodeStagingTest("test_ShowAndRestage")
    test.setUp()
    test.test_ShowAndRestage()


def test_module_self_test_shows_lymph_nodes(module):
    test = module.LymphNodeStagingTest("test_LymphNodes")
    test.setUp()
    test.test_LymphNodes()


def test_logic_requires_inputs(module):
    logic = module.LymphNodeStagingLogic()
    with pytest.raises(ValueError, match="No result to re-stage"):
        logic.restage(threshold=0.4)
    with pytest.raises(ValueError, match="Nothing to export"):
        logic.exportResults("/nonexistent")


# ----- Apply in the background: the widget's timer glue over a real child process ----------------------------------
class StandinWidget:
    """Stand-in for the Qt widgets the result/progress code touches: records what it is given."""

    def __init__(self) -> None:
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.text = ""
        self.value = 0
        self.format = ""
        self.currentText = ""
        self.currentIndex = 0
        self.tableNode = None
        self.lines: list[str] = []
        self.values: list[int] = []

    def __setattr__(self, name, value) -> None:
        if name == "value" and "values" in self.__dict__:
            self.values.append(value)
        object.__setattr__(self, name, value)

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def setFormat(self, text: str) -> None:
        self.format = text

    def setMRMLTableNode(self, node) -> None:
        self.tableNode = node


class StandinTimer:
    def __init__(self) -> None:
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from case_fixtures import phantom_case_files

    files = phantom_case_files(tmp_path_factory.mktemp("module-background"), 1357)
    return {**{k: str(v) for k, v in files.pop("paths").items()}, **files}


def _widget(module):
    widget = module.LymphNodeStagingWidget.__new__(module.LymphNodeStagingWidget)
    names = ("progressBar", "logTextEdit", "applyButton", "cancelButton", "exportButton", "nStageLabel",
             "tnm9Label", "decidingLabel", "thresholdSliderWidget", "stationTableView", "ruleSetComboBox",
             "overrideComboBox", "nodesLabel", "nodeTableView")
    widget.ui = SimpleNamespace(**{n: StandinWidget() for n in names})
    widget.demoBannerLabel, widget.warningsLabel = StandinWidget(), StandinWidget()  # made by setup, not the .ui
    widget.logic = module.LymphNodeStagingLogic()
    widget.logic.logCallback = widget.addLog
    widget._parameterNode = widget.logic.getParameterNode()
    widget._process = None
    widget._pollTimer = StandinTimer()
    widget._updatingResults = False
    widget._station = None
    return widget


def _volumes(files):
    import SimpleITK as sitk

    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(files["ct"]), "PH1357 CT")
    pet = mrml.volume_node_from_image(scene, sitk.ReadImage(files["pet"]), "PH1357 PET")
    anatomy = mrml.volume_node_from_image(scene, sitk.ReadImage(files["anatomy"]), "anatomy", labelmap=True)
    return ct, pet, anatomy


def _start(module, widget, files, **kwargs):
    ct, pet, anatomy = _volumes(files)
    params = widget._parameterNode
    params.ctVolume, params.petVolume = ct, pet
    widget._setRunning(True)
    widget._process = widget.logic.startBackgroundProcess(
        ct, pet, files["side"], petIsSuv=True, anatomy=anatomy, modelPath=files["model"], device="cpu",
        threshold=0.5, stationMapping=files["mapping"], **kwargs)
    widget._pollTimer.start()
    return widget._process


def _drive(widget, timeout: float = 180.0) -> int:
    """What the application's event loop does: call the timer slot until the timer stops."""
    import time

    ticks, deadline = 0, time.monotonic() + timeout
    while widget._pollTimer.active:
        assert time.monotonic() < deadline, "background assessment did not finish"
        widget._pollProcess()
        ticks += 1
        time.sleep(0.05)
    return ticks


def test_apply_runs_in_a_child_process_polled_by_the_widget_timer(module, phantom_files):
    widget = _widget(module)
    process = _start(module, widget, phantom_files)
    assert process.running and widget.ui.cancelButton.enabled and not widget.ui.applyButton.enabled
    assert process.job.device == "cpu" and process.job.pet_is_suv is True
    ticks = _drive(widget)
    assert ticks > 1  # the GUI thread got control back between polls
    assert widget._process is None and not process.running and process.returncode == 0
    values = widget.ui.progressBar.values
    assert values[0] == 0 and values[-1] == 100 and values == sorted(values) and len(set(values)) >= 4
    assert widget.ui.progressBar.format.startswith("%p% done")
    # the result is shown: nodes, labels, the table node in the table view; buttons back to idle
    nodes = widget.logic.nodes
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 17
    assert widget._parameterNode.resultSegmentation is nodes.segmentation
    assert widget.ui.nStageLabel.text == widget.logic.result.n_stage in ("N0", "N1", "N2", "N3")
    table = widget.ui.stationTableView.tableNode
    assert table is nodes.table and table.GetNumberOfRows() == 17 and table.GetLocked()
    titles = module.LymphNodeStagingLogic.columnTitles()
    assert [table.GetColumnTitle(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())] == \
        [titles[c] for c in mrml_columns()]
    assert not widget.ui.cancelButton.enabled and not widget.ui.progressBar.visible
    assert any("TNM 9" in line for line in widget.ui.logTextEdit.lines)
    # no node model (and none bundled): no node table
    if widget.logic.result.nodes is None:
        assert nodes.node_table is None and nodes.node_segmentation is None and not widget.ui.nodeTableView.visible
        assert widget.ui.nodesLabel.text.startswith("Lymph nodes: no node model was run")
    # a user model and a station map of unknown atlases: no demo banner
    assert widget.logic.result.provenance["model"] == "user" and not widget.demoBannerLabel.visible
    # the temporary inputs are removed
    assert not process.slicerContext["workDir"].exists()


def test_apply_with_a_node_model_shows_the_nodes_and_rows_jump_to_them(module, phantom_files, trained_snet,
                                                                      monkeypatch):
    """The node model goes to the child, the child's nodes.nii.gz comes back as the "Lymph nodes" segmentation, the
    node table fills the node table view, and a click on a row centres the views on that node."""
    from LymphNodeStagingLib.slicer import mrml
    from LymphNodeStagingLib.staging.colors import station_color

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's torch: one thread on a busy shared machine
    widget = _widget(module)
    checkpoint = str(trained_snet[1].checkpoint)
    process = _start(module, widget, phantom_files, nodeModelPath=checkpoint)
    assert process.job.node_model == checkpoint
    _drive(widget)
    assert process.returncode == 0
    result, nodes = widget.logic.result, widget.logic.nodes
    assert result.nodes, "the tiny node model found no node"
    assert widget.logic.nodeMap is not None
    table = widget.ui.nodeTableView.tableNode
    assert table is nodes.node_table and widget.ui.nodeTableView.visible
    assert table.GetNumberOfRows() == len(result.nodes) and table.GetLocked()
    titles = module.LymphNodeStagingLogic.nodeColumnTitles()
    assert [table.GetColumnTitle(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())] == \
        [titles[c] for c in mrml.NODE_TABLE_COLUMNS]
    assert widget.ui.nodesLabel.text.startswith(f"Lymph nodes: {len(result.nodes)} found")
    segmentation = nodes.node_segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.nodes)
    for record in result.nodes[:5]:
        segment = segmentation.GetSegment(f"node-{record['id']}")
        assert segment.GetName() == mrml.node_segment_name(record)
        assert segment.GetColor() == pytest.approx(station_color(record["station"]))
    assert any("Lymph nodes:" in line for line in widget.ui.logTextEdit.lines)
    # a click on a row of the node table: every slice view and the crosshair move to the node's centre
    crosshair = headless_slicer.slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    row = len(result.nodes) - 1
    widget.onNodeClicked(SimpleNamespace(row=lambda: row))
    assert crosshair.GetCrosshairRAS() == pytest.approx(mrml.lps_to_ras(result.nodes[row]["centre_mm"]))
    assert widget.logic.result.station("4R").override is None  # a node click is not a station click
    # re-staging keeps the nodes
    widget.logic.restage(threshold=0.9)
    widget.updateResults()
    assert widget.ui.nodeTableView.tableNode is table and segmentation.GetNumberOfSegments() == len(result.nodes)


def mrml_columns() -> tuple[str, ...]:
    from LymphNodeStagingLib.slicer import mrml

    return mrml.TABLE_COLUMNS


def test_cancel_from_the_widget_stops_the_child(module, phantom_files):
    widget = _widget(module)
    process = _start(module, widget, phantom_files)
    widget.onCancelButton()
    _drive(widget)
    assert process.returncode == 3 and widget.logic.result is None
    assert widget.ui.logTextEdit.lines[-1] == "Assessment cancelled."
    assert not widget.ui.cancelButton.enabled and not widget.ui.progressBar.visible


# ----- inputs: the PET-is-SUV rule, the demo case ------------------------------------------------------------------
def test_a_pet_volume_from_a_file_must_be_declared_suv(module, phantom_files):
    logic = module.LymphNodeStagingLogic()
    ct, pet, _anatomy = _volumes(phantom_files)
    with pytest.raises(ValueError, match="was not loaded from DICOM, so its SUV cannot be computed"):
        logic.startBackgroundProcess(ct, pet, "R", device="cpu")
    with pytest.raises(ValueError, match="PET volume holds SUV"):
        logic.process(ct, pet, "R", device="cpu")
    assert logic.checkInputs(ct, pet, petIsSuv=True) == []
    assert logic.checkInputs(ct, None) == []  # no PET: the CT is assessed alone


def test_a_bad_volume_is_refused_before_the_child_starts(module, phantom_files, monkeypatch):
    """The volumes' images are checked (grid, CT in HU, PET in SUV) before the background assessment starts."""
    import SimpleITK as sitk

    from LymphNodeStagingLib.assessment import process as process_module
    from LymphNodeStagingLib.slicer import mrml

    started = []
    monkeypatch.setattr(process_module.AssessmentProcess, "start", lambda self: started.append(self))
    logic = module.LymphNodeStagingLogic()
    ct, pet, _anatomy = _volumes(phantom_files)
    negative = mrml.volume_node_from_image(headless_slicer.slicer.mrmlScene,
                                           sitk.ReadImage(phantom_files["pet"]) - 20.0, "negative PET")
    with pytest.raises(ValueError, match="^PET 'negative PET': .* below -0.5 SUV"):
        logic.startBackgroundProcess(ct, negative, "R", petIsSuv=True, device="cpu")
    stored = mrml.volume_node_from_image(headless_slicer.slicer.mrmlScene,
                                         sitk.ReadImage(phantom_files["ct"]) + 1024, "stored CT")
    with pytest.raises(ValueError, match="^CT 'stored CT': .*without the rescale to HU"):
        logic.startBackgroundProcess(stored, pet, "R", petIsSuv=True, device="cpu")
    assert not started


def test_a_pet_volume_from_dicom_gets_suv_from_its_header(module, tmp_path):
    """A PET loaded through Slicer's DICOM module (its node lists the SOP Instance UIDs) needs no declaration: its
    DICOM files go to the library, which computes SUV from the header."""
    import pydicom
    import SimpleITK as sitk

    from LymphNodeStagingLib.phantom import generate_patient, write_patient
    from LymphNodeStagingLib.slicer import mrml
    from LymphNodeStagingLib.suv.inputs import load_pet

    patient = generate_patient(4242, size="small")
    paths = write_patient(patient, tmp_path / "dicom", format="dicom")
    files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f)
             for f in sorted(Path(paths["pet"]).iterdir())}
    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, patient.ct, "CT")
    pet = mrml.volume_node_from_image(scene, patient.pet, "PET (Bq/ml)")
    pet.SetAttribute(module.DICOM_INSTANCE_UIDS, " ".join(files))
    logic = module.LymphNodeStagingLogic()
    dicom = logic.checkInputs(ct, pet, petIsSuv=False, fileForInstance=files.get)  # no declaration needed
    assert sorted(dicom) == sorted(files.values())
    source, isSuv = logic._petSource(pet, True, "", dicom, tmp_path / "work")  # the box is ignored for DICOM
    assert isSuv is False and len(list(Path(source).iterdir())) == len(files)
    suv, provenance, _uid, _for = load_pet(source)
    assert provenance["mode"] != "user"  # computed from the header, not declared
    ref = sitk.GetArrayViewFromImage(patient.pet)
    assert abs(float(sitk.GetArrayViewFromImage(suv).max()) - float(ref.max())) < 0.05 * float(ref.max())
    # files no longer in the database: a clear refusal
    with pytest.raises(ValueError, match="no longer in the DICOM database"):
        logic.checkInputs(ct, pet, fileForInstance=lambda uid: None)


def test_load_demo_case_selects_a_phantom_patient(module, tmp_path):
    widget = _widget(module)
    demo = widget.logic.loadDemoCase(size="small", folder=str(tmp_path / "demo"), buildAtlases=False)
    assert (tmp_path / "demo" / "truth.json").is_file()
    widget.useDemoCase(demo)
    p = widget._parameterNode
    assert p.ctVolume is demo["ctVolume"] and p.petVolume is demo["petVolume"] and p.anatomy is demo["anatomy"]
    assert p.petIsSuv is True and p.tumourSide == demo["side"] in ("R", "L")
    assert demo["anatomy"].IsA("vtkMRMLLabelMapVolumeNode")
    assert "true N-stage" in widget.ui.logTextEdit.lines[-1]
    # shown as a reader looks at it: CT in a mediastinal window, PET fused above a threshold
    ctDisplay, petDisplay = demo["ctVolume"].GetDisplayNode(), demo["petVolume"].GetDisplayNode()
    assert (ctDisplay.GetWindow(), ctDisplay.GetLevel()) == (400.0, 40.0)
    assert petDisplay.GetApplyThreshold() and petDisplay.GetLowerThreshold() >= 1.5
    # a second load reuses the generated files
    mtime = (tmp_path / "demo" / "ct.nii.gz").stat().st_mtime
    widget.logic.loadDemoCase(size="small", folder=str(tmp_path / "demo"), buildAtlases=False)
    assert (tmp_path / "demo" / "ct.nii.gz").stat().st_mtime == mtime


# ----- results: rule set, station table clicks, overrides ----------------------------------------------------------
def _shown(module):
    ct, pet, stations, result = module.makeSyntheticCase()
    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    widget = _widget(module)
    ctNode = mrml.volume_node_from_image(scene, ct, "CT")
    widget.logic.showAssessment(result, stations, ctNode, mrml.volume_node_from_image(scene, pet, "PET"))
    widget.updateResults()
    return widget


def test_demo_result_shows_a_banner_and_the_warnings(module):
    widget = _shown(module)
    assert not widget.demoBannerLabel.visible and not widget.warningsLabel.visible
    result = widget.logic.result
    result.set_provenance(True, True)
    result.warnings.append("implausible station map: low atlas agreement (below 0.33) at 7 (0.12)")
    widget.logic.restage(threshold=0.4)  # the re-staged result keeps provenance and warnings
    widget.updateResults()
    assert widget.demoBannerLabel.visible and widget.demoBannerLabel.text == result.demo_banner
    assert widget.demoBannerLabel.text.startswith("*** SYNTHETIC DEMO ATLASES AND MODEL")
    assert widget.warningsLabel.visible and "at 7 (0.12)" in widget.warningsLabel.text
    assert result.provenance["statement"] not in widget.warningsLabel.text  # the banner says it already
    assert widget.logic.nodes.text.GetText().startswith(result.demo_banner)


def test_rule_set_combo_restages_the_shown_result(module):
    from LymphNodeStagingLib.staging.rules import available_rule_sets

    widget = _shown(module)
    other = next(r for r in available_rule_sets() if r != widget.logic.result.rules)
    widget.ui.ruleSetComboBox.currentText = other
    widget.onRuleSetChanged(1)
    assert widget.logic.result.rules == other
    assert widget._parameterNode.ruleSet == other
    assert other in widget.ui.decidingLabel.text
    assert widget.logic.nodes.segmentation.GetAttribute("LymphNodeStaging.RuleSet") == other


def test_clicking_a_station_row_jumps_there_and_overrides_restage(module):
    widget = _shown(module)
    table = widget.logic.nodes.table
    row = next(r for r in range(table.GetNumberOfRows()) if table.GetCellText(r, 0) == "7")
    widget.onStationClicked(SimpleNamespace(row=lambda: row))
    assert widget._station == "7" and widget.ui.overrideComboBox.currentIndex == 0
    before = widget.logic.result.tnm9
    widget.onOverrideChanged(module.OVERRIDES.index("negative"))
    assert widget.logic.result.station("7").override == "negative" and table.GetCellText(row, 3) == "negative"
    assert (before, widget.logic.result.tnm9) == ("N2b", "N2a")
    widget.onStationClicked(SimpleNamespace(row=lambda: row))
    assert widget.ui.overrideComboBox.currentIndex == module.OVERRIDES.index("negative")
    widget.onOverrideChanged(0)  # back to the model's decision
    assert widget.logic.result.station("7").override is None


def test_python_requirements_are_complete_in_this_environment(module):
    logic = module.LymphNodeStagingLogic()
    assert logic.requirementsFile().is_file()
    assert logic.setupPythonRequirements(interactive=False) == []  # nothing to install, nothing asked


# ----- the extension: metadata, icon, screenshots, Extensions Index entry --------------------------------------------
EXTENSION_DIR = MODULE_DIR.parent
#: The properties of Slicer's catalog entry schema v1.0.2 (Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json,
#: "additionalProperties": false) and the ones it requires.
CATALOG_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def _cmake_variables() -> dict[str, str]:
    text = (EXTENSION_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    values: dict[str, str] = {}
    for name, value in re.findall(r'^set\((\w+) "([^"]*)"\)', text, flags=re.MULTILINE):
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_extension_icon_and_screenshots_are_in_resources():
    cmake = _cmake_variables()
    prefix = "https://raw.githubusercontent.com/LymphNodeStaging/LymphNodeStaging/main/"
    icon = EXTENSION_DIR / cmake["EXTENSION_ICONURL"].removeprefix(prefix)
    assert icon.parent.parent == EXTENSION_DIR / "Resources" and _png_size(icon) == (128, 128)
    screenshots = [EXTENSION_DIR / url.removeprefix(prefix) for url in cmake["EXTENSION_SCREENSHOTURLS"].split()]
    assert len(screenshots) >= 2
    for shot in screenshots:
        assert shot.parent == EXTENSION_DIR / "Resources" / "Screenshots", shot
        width, height = _png_size(shot)
        assert width >= 800 and height >= 450, (shot, width, height)  # a real view, not a thumbnail
        assert shot.stat().st_size < 400_000, shot
    assert (EXTENSION_DIR / "Testing" / "slicer_bridge" / "render_screenshots.py").is_file()


def test_extensions_index_entry_follows_the_catalog_schema_and_the_cmake_metadata():
    import json

    entry = json.loads((EXTENSION_DIR / "Resources" / "LymphNodeStaging.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_PROPERTIES, set(entry) ^ CATALOG_PROPERTIES
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    cmake = _cmake_variables()
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].removesuffix(".git") in cmake["EXTENSION_HOMEPAGE"]
    assert entry["dicom_support_rule"] == "Modality == 'PT'"


# --- CT-only mode: no PET volume is accepted, the background assessment runs with the CT alone -----------------


@pytest.fixture(scope="module")
def ct_only_files(tmp_path_factory):
    """A phantom case (true station map as the mapping) and a seeded random CT-only model."""
    from case_fixtures import ct_only_model, phantom_case_files

    root = tmp_path_factory.mktemp("slicer-ct-only")
    case = phantom_case_files(root, 1618)
    ct_model = ct_only_model(root / "ct_model.pt", seed=2)
    return {**case, "ct_model": str(ct_model)}


def test_background_assessment_of_a_ct_alone(module, ct_only_files):
    import SimpleITK as sitk

    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(str(ct_only_files["paths"]["ct"])), "PH1618 CT")
    logic = module.LymphNodeStagingLogic()
    lines: list[str] = []
    logic.logCallback = lines.append
    assert logic.checkInputs(ct, None) == []  # no PET: CT-only mode, nothing to refuse
    process = logic.startBackgroundProcess(ct, None, ct_only_files["side"], modelPath=ct_only_files["ct_model"],
                                           device="cpu", stationMapping=ct_only_files["mapping"])
    assert process.job.pet is None
    process.wait(timeout=300)
    logic.finishBackgroundProcess(process)
    assert logic.result.modality == "ct" and logic.result.inputs["pet"] is None
    assert all(s.suv_max is None for s in logic.result.stations)
    assert any(line.startswith("CT only (no PET)") for line in lines)
    assert logic.nodes.table is not None


def test_a_petct_model_without_a_pet_fails_in_the_child_with_the_reason(module, ct_only_files):
    import SimpleITK as sitk

    from LymphNodeStagingLib.errors import ProcessingError
    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(str(ct_only_files["paths"]["ct"])), "PH1618 CT")
    logic = module.LymphNodeStagingLogic()
    process = logic.startBackgroundProcess(ct, None, ct_only_files["side"], modelPath=ct_only_files["model"],
                                           device="cpu", stationMapping=ct_only_files["mapping"])
    with pytest.raises(ProcessingError, match="UsageError: .*reads the PET"):
        process.wait(timeout=300)
