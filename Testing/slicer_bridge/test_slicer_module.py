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
    "enabled": ANY, "toolTip": ANY, "visible": ANY,
    "appendPlainText": {"QPlainTextEdit"},
    "value": {"QProgressBar", "ctkSliderWidget", "QSlider", "QSpinBox", "QDoubleSpinBox"},
    "setFormat": {"QProgressBar"},
    "text": {"QLabel", "QPushButton", "QLineEdit"},
    "setColumnCount": {"QTableWidget"}, "setHorizontalHeaderLabels": {"QTableWidget"},
    "setRowCount": {"QTableWidget"}, "setItem": {"QTableWidget"}, "currentRow": {"QTableWidget"},
    "item": {"QTableWidget"},
    "currentText": {"QComboBox"},
    "directory": {"ctkDirectoryButton"},
}
#: what a signal connected with ``self.ui.<name>.connect("signal(...)", ...)`` requires
SIGNAL_CLASSES: dict[str, set[str]] = {
    "clicked": {"QPushButton", "ctkPushButton"},
    "valueChanged": {"ctkSliderWidget", "QSlider", "QSpinBox", "QDoubleSpinBox"},
    "cellClicked": {"QTableWidget"},
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
        if ann.startswith("vtkMRML"):
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
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors <= receivers


def test_resources_listed_in_cmake_exist():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "LymphNodeStaging")
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake
    listed = re.findall(r"^\s+([\w./]+\.(?:py|png|ui|json))\s*$", cmake, flags=re.MULTILINE)
    assert len(listed) >= 15
    for rel in listed:
        assert (MODULE_DIR / rel).is_file(), f"{rel} is listed in the module CMakeLists.txt but does not exist"
    for rel in ("Resources/Icons/LymphNodeStaging.png", "Resources/UI/LymphNodeStaging.ui"):
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
    params.threshold = 0.3
    assert logic.getParameterNode().threshold == pytest.approx(0.3)  # singleton node in the scene


def test_module_self_test_runs_on_the_headless_core(module):
    test = module.LymphNodeStagingTest("test_ShowAndRestage")
    test.setUp()
    test.test_ShowAndRestage()


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
        self.lines: list[str] = []
        self.values: list[int] = []
        self.rows = 0
        self.items: dict[tuple[int, int], object] = {}

    def __setattr__(self, name, value) -> None:
        if name == "value" and "values" in self.__dict__:
            self.values.append(value)
        object.__setattr__(self, name, value)

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def setFormat(self, text: str) -> None:
        self.format = text

    def setRowCount(self, n: int) -> None:
        self.rows = n

    def setItem(self, row: int, col: int, item) -> None:
        self.items[(row, col)] = item


class StandinTimer:
    def __init__(self) -> None:
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from test_slicer_background import phantom_case_files

    files = phantom_case_files(tmp_path_factory.mktemp("module-background"), 1357)
    return {**{k: str(v) for k, v in files.pop("paths").items()}, **files}


def _widget(module):
    widget = module.LymphNodeStagingWidget.__new__(module.LymphNodeStagingWidget)
    names = ("progressBar", "logTextEdit", "applyButton", "cancelButton", "exportButton", "nStageLabel",
             "tnm9Label", "decidingLabel", "thresholdSliderWidget", "stationTableWidget")
    widget.ui = SimpleNamespace(**{n: StandinWidget() for n in names})
    widget.logic = module.LymphNodeStagingLogic()
    widget.logic.logCallback = widget.addLog
    widget._parameterNode = widget.logic.getParameterNode()
    widget._process = None
    widget._pollTimer = StandinTimer()
    widget._updatingResults = False
    return widget


def _start(module, widget, files, **kwargs):
    import SimpleITK as sitk

    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(files["ct"]), "PH1357 CT")
    pet = mrml.volume_node_from_image(scene, sitk.ReadImage(files["pet"]), "PH1357 PET")
    anatomy = mrml.volume_node_from_image(scene, sitk.ReadImage(files["anatomy"]), "anatomy", labelmap=True)
    params = widget._parameterNode
    params.ctVolume, params.petVolume = ct, pet
    widget._setRunning(True)
    widget._process = widget.logic.startBackgroundProcess(
        ct, pet, files["side"], anatomy=anatomy, modelPath=files["model"], cpu=True, threshold=0.5,
        stationMapping=files["mapping"], **kwargs)
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
    ticks = _drive(widget)
    assert ticks > 1  # the GUI thread got control back between polls
    assert widget._process is None and not process.running and process.returncode == 0
    values = widget.ui.progressBar.values
    assert values[0] == 0 and values[-1] == 100 and values == sorted(values) and len(set(values)) >= 4
    assert widget.ui.progressBar.format.startswith("%p% done")
    # the result is shown: nodes, labels, table; buttons back to idle
    nodes = widget.logic.nodes
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 17
    assert widget._parameterNode.resultSegmentation is nodes.segmentation
    assert widget.ui.nStageLabel.text == widget.logic.result.n_stage in ("N0", "N1", "N2", "N3")
    assert widget.ui.stationTableWidget.rows == 17
    assert not widget.ui.cancelButton.enabled and not widget.ui.progressBar.visible
    assert any("TNM 9" in line for line in widget.ui.logTextEdit.lines)
    # the temporary inputs are removed
    assert not process.slicerContext["workDir"].exists()


def test_cancel_from_the_widget_stops_the_child(module, phantom_files):
    widget = _widget(module)
    process = _start(module, widget, phantom_files)
    widget.onCancelButton()
    _drive(widget)
    assert process.returncode == 3 and widget.logic.result is None
    assert widget.ui.logTextEdit.lines[-1] == "Assessment cancelled."
    assert not widget.ui.cancelButton.enabled and not widget.ui.progressBar.visible
