"""3D Slicer module: mediastinal lymph node stations on FDG PET/CT, their probability of malignancy and the N-stage.

A thin layer: the widget moves values between the GUI and the parameter node, the logic is a facade over
LymphNodeStagingLib (assessment, MRML bridge, export, dependencies), which holds all computation and all scene
building.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Union

# In a checkout the library sits next to this folder; in a built extension it is copied next to this file.
for _candidate in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if (_candidate / "LymphNodeStagingLib").is_dir():
        if str(_candidate) not in sys.path:
            sys.path.insert(0, str(_candidate))
        break

import qt  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode  # noqa: E402
from slicer.i18n import tr as _  # noqa: E402
from slicer.i18n import translate  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

from LymphNodeStagingLib.errors import Cancelled  # noqa: E402
from LymphNodeStagingLib.staging.rules import DEFAULT_RULES, available_rule_sets  # noqa: E402

#: Device choices of the Advanced section (read by LymphNodeStagingLib.runtime.parse_device).
DEVICES = ("auto", "cpu", "gpu")
#: Reader decisions of the override combo box, in its order ("model": no override).
OVERRIDES = (None, "positive", "negative")
#: Node attribute Slicer's DICOM plugins set on a volume loaded from DICOM (the SOP Instance UIDs of its files).
DICOM_INSTANCE_UIDS = "DICOM.instanceUIDs"


#
# LymphNodeStaging
#


class LymphNodeStaging(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lymph Node Staging")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Nuclear Medicine")]
        self.parent.dependencies = []
        self.parent.contributors = ["LymphNodeStaging contributors"]
        self.parent.helpText = _(
            "Finds the 17 mediastinal lymph node stations on an FDG PET/CT, gives each a probability of malignancy "
            "and derives the N-stage of lung cancer (AJCC 8th edition and TNM 9th edition N2a/N2b). "
            "Click a row of the station table to jump to the station; move the threshold, change the rule set or "
            "override a station to re-stage instantly. With a lymph node model (Advanced) the lymph nodes are found "
            "and measured too: a 'Lymph nodes' segmentation coloured by station and a node table (click a row to jump "
            "to the node). 'Load demo case' loads a synthetic patient. "
            "Not a medical device: results must be reviewed by a qualified physician.")
        self.parent.acknowledgementText = _(
            "Method: S. Engelson et al., Deep learning-based mediastinal lymph node assessment on PET/CT images "
            "without pixel-level annotations, J. Med. Imaging 13(1) 014507 (2026), doi:10.1117/1.JMI.13.1.014507. "
            "Clean-room implementation. Anatomy by TotalSegmentator (Wasserthal et al., 2023).")


#
# LymphNodeStagingParameterNode
#


@parameterNodeWrapper
class LymphNodeStagingParameterNode:
    """Inputs and options of one assessment; saved with the scene."""

    ctVolume: vtkMRMLScalarVolumeNode
    petVolume: vtkMRMLScalarVolumeNode
    tumourSide: Annotated[str, Choice(["R", "L"])] = "R"
    petIsSuv: bool = False  # only for a PET from an image file; a PET from DICOM gets SUV from its header
    anatomy: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007 - read as typing.Union
    modelPath: str = ""
    nodeModelPath: str = ""
    atlasSet: str = ""
    ruleSet: Annotated[str, Choice(available_rule_sets())] = DEFAULT_RULES
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    stationMethod: Annotated[str, Choice(["atlas", "network", "both"])] = "atlas"  # stationnet/method.py
    stationModelPath: str = ""
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    resultSegmentation: vtkMRMLSegmentationNode


#
# LymphNodeStagingWidget
#


class LymphNodeStagingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: inputs, Apply with progress and cancel, results table, threshold, rule set, overrides, export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None  # the running AssessmentProcess
        self._pollTimer = None
        self._updatingResults = False
        self._station = None  # station of the last clicked table row

    def setup(self) -> None:
        """Called once when the module is first opened."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LymphNodeStaging.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LymphNodeStagingLogic()
        self.logic.logCallback = self.addLog

        # the assessment runs in a child process; its progress is read on the GUI thread by this timer
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._pollProcess)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemoButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.ruleSetComboBox.connect("currentIndexChanged(int)", self.onRuleSetChanged)
        self.ui.stationTableView.connect("clicked(QModelIndex)", self.onStationClicked)
        self.ui.nodeTableView.connect("clicked(QModelIndex)", self.onNodeClicked)
        self.ui.overrideComboBox.connect("currentIndexChanged(int)", self.onOverrideChanged)
        self.ui.resultSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultSelected)
        self.ui.exportDirectoryButton.directory = qt.QDir.homePath()
        self._addResultBanners()

        self.initializeParameterNode()

    def _addResultBanners(self) -> None:
        """Two labels at the top of the Results section, shown with a result: a red banner when it was computed
        with the synthetic demo atlases or the demo model, and an orange box with its warnings (implausible
        station map, stations not found)."""
        layout = self.ui.resultsCollapsibleButton.layout()
        self.demoBannerLabel = qt.QLabel()
        self.demoBannerLabel.objectName = "demoBannerLabel"
        self.demoBannerLabel.wordWrap = True
        self.demoBannerLabel.setStyleSheet(
            "QLabel { background-color: #c62828; color: white; font-weight: bold; padding: 6px; }")
        self.demoBannerLabel.toolTip = _("The result was computed with synthetic demo data. Give the atlas set and "
                                         "the model of your site under Advanced.")
        self.warningsLabel = qt.QLabel()
        self.warningsLabel.objectName = "resultWarningsLabel"
        self.warningsLabel.wordWrap = True
        self.warningsLabel.setStyleSheet("QLabel { background-color: #ffb74d; color: black; padding: 4px; }")
        layout.insertWidget(0, self.demoBannerLabel)
        layout.insertWidget(1, self.warningsLabel)
        self.demoBannerLabel.visible = False
        self.warningsLabel.visible = False

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._process is not None:
            self._process.kill()
            self._process = None
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        if self._process is not None:
            self._process.cancel()  # its inputs are leaving the scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Parameter node of the module, with the first volume selected as CT when nothing is."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first

    def setParameterNode(self, inputParameterNode: "LymphNodeStagingParameterNode | None") -> None:
        """Bind the GUI to a parameter node (None: unbind)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p and p.ctVolume:
            self.ui.applyButton.toolTip = (_("Assess the stations and stage the case.") if p.petVolume else
                                           _("Assess the stations and stage the case from the CT alone (no PET "
                                             "selected: a CT-only model, no SUV)."))
            self.ui.applyButton.enabled = self._process is None
        else:
            self.ui.applyButton.toolTip = _("Select a CT volume (and the PET volume of a PET/CT).")
            self.ui.applyButton.enabled = False
        self.ui.exportButton.enabled = self.logic.result is not None

    # ----- log and progress ------------------------------------------------------------------------------------
    def addLog(self, text: str) -> None:
        """Append a line to the log box."""
        self.ui.logTextEdit.appendPlainText(text)

    def _progress(self, fraction: float, message: str = "") -> None:
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        if message:
            self.ui.progressBar.setFormat(f"%p% {message}")

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        if running:
            self.ui.applyButton.enabled = False
            self.ui.progressBar.value = 0
        else:
            self._checkCanApply()

    # ----- actions ---------------------------------------------------------------------------------------------
    def onLoadDemoButton(self) -> None:
        """Load a synthetic PET/CT patient (generated once into the cache) and select it as input."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the demo case."), waitCursor=True):
            self.useDemoCase(self.logic.loadDemoCase())

    def useDemoCase(self, demo: dict) -> None:
        """Select a loaded demo case (``LymphNodeStagingLogic.loadDemoCase``) as the inputs."""
        p = self._parameterNode
        p.ctVolume, p.petVolume, p.anatomy = demo["ctVolume"], demo["petVolume"], demo["anatomy"]
        p.tumourSide = demo["side"]
        p.petIsSuv = True  # the phantom's PET file holds SUV
        self.addLog(_("Demo case {case}: synthetic patient, tumour side {side}, true N-stage {stage}").format(
            case=demo["caseId"], side=demo["side"], stage=demo["truth"].get("n_stage", "?")))

    def onApplyButton(self) -> None:
        """Install missing dependencies (after one confirmation), then start the assessment in a child process.

        The GUI stays responsive: a timer polls the process for progress and log lines, Cancel asks it to stop.
        """
        if self._process is not None:
            return
        p = self._parameterNode
        self._setRunning(True)
        with slicer.util.tryWithErrorDisplay(_("Failed to start the assessment."), waitCursor=True):
            self.logic.setupPythonRequirements(interactive=True)
            self._process = self.logic.startBackgroundProcess(
                p.ctVolume, p.petVolume, p.tumourSide, petIsSuv=p.petIsSuv, anatomy=p.anatomy,
                modelPath=p.modelPath, nodeModelPath=p.nodeModelPath, atlasSet=p.atlasSet, rules=p.ruleSet,
                device=p.device, threshold=p.threshold, stationMethod=p.stationMethod,
                stationModelPath=p.stationModelPath)
        if self._process is None:
            self._setRunning(False)
            return
        self._pollTimer.start()

    def _pollProcess(self) -> None:
        """Timer slot: show the child's progress and log lines; when it has ended, show the result."""
        process = self._process
        if process is None:
            self._pollTimer.stop()
            return
        for event in process.poll():
            if event.kind == "progress":
                self._progress(event.fraction or 0.0, event.message)
            elif event.kind == "log" and event.message:
                self.addLog(event.message)
        if not process.finished:
            return
        self._pollTimer.stop()
        self._process = None
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to assess the lymph node stations."), waitCursor=False):
                try:
                    self.logic.finishBackgroundProcess(process)
                except Cancelled:
                    self.addLog(_("Assessment cancelled."))
                else:
                    self._parameterNode.resultSegmentation = self.logic.nodes.segmentation
                    self.updateResults()
        finally:
            self._setRunning(False)

    def onCancelButton(self) -> None:
        """Ask the running assessment to stop."""
        if self._process is not None:
            self._process.cancel()
            self.addLog(_("Cancelling..."))

    def onResultSelected(self, node) -> None:
        """Review a result saved in the scene."""
        if self._updatingResults or node is None:
            return
        with slicer.util.tryWithErrorDisplay(_("This segmentation holds no lymph node staging result."),
                                             waitCursor=False):
            self.logic.loadResultFromNode(node)
            self.updateResults()

    def onThresholdChanged(self, value: float) -> None:
        """Re-stage with another probability threshold."""
        if self.logic.result is None or self._updatingResults:
            return
        self.logic.restage(threshold=value)
        self.updateResults()

    def onRuleSetChanged(self, index: int) -> None:
        """Re-stage the shown result with the chosen rule set."""
        rules = self.ui.ruleSetComboBox.currentText
        if self.logic.result is None or self._updatingResults or not rules or rules == self.logic.result.rules:
            return
        self.logic.restage(rules=rules)
        self.updateResults()

    def onStationClicked(self, index) -> None:
        """Centre the slice views on the station of the clicked table row and show its override."""
        if self.logic.result is None or self.logic.nodes is None:
            return
        station = self.logic.nodes.table.GetCellText(index.row(), 0)
        if not station:
            return
        self._station = station
        self.logic.jumpToStation(station)
        self._updatingResults = True
        try:
            self.ui.overrideComboBox.currentIndex = OVERRIDES.index(self.logic.result.station(station).override)
        finally:
            self._updatingResults = False

    def onNodeClicked(self, index) -> None:
        """Centre the slice views on the lymph node of the clicked node table row."""
        if self.logic.result is None or self.logic.nodes is None or self.logic.nodes.node_table is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot show this lymph node."), waitCursor=False):
            self.logic.jumpToNode(index.row())

    def onOverrideChanged(self, index: int) -> None:
        """Apply the reader's decision for the selected station and re-stage."""
        if self._station is None or self.logic.result is None or self._updatingResults:
            return
        self.logic.restage(overrides={self._station: OVERRIDES[max(0, index)]})
        self.updateResults()

    def onExportButton(self) -> None:
        """Write the result files into the chosen folder."""
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            paths = self.logic.exportResults(self.ui.exportDirectoryButton.directory)
            self.addLog(_("Exported: {files}").format(files=", ".join(str(v) for v in paths.values())))

    # ----- results ---------------------------------------------------------------------------------------------
    def updateResults(self) -> None:
        """Show the logic's current result: N-stage labels, the station table node, threshold and rule set."""
        result = self.logic.result
        if result is None:
            return
        self._updatingResults = True
        try:
            banner = result.demo_banner
            self.demoBannerLabel.text = banner or ""
            self.demoBannerLabel.visible = bool(banner)
            statement = result.provenance.get("statement")
            warnings = [w for w in result.warnings if w != statement]
            self.warningsLabel.text = "\n".join(f"\u26a0 {w}" for w in warnings)
            self.warningsLabel.visible = bool(warnings)
            self.ui.nStageLabel.text = result.n_stage
            self.ui.tnm9Label.text = result.tnm9
            self.ui.decidingLabel.text = _("{stations} ({rules} rules, tumour side {side})").format(
                stations=", ".join(result.deciding_stations) or _("none"), rules=result.rules, side=result.side)
            self.ui.thresholdSliderWidget.value = result.threshold
            if result.rules in available_rule_sets():
                self._parameterNode.ruleSet = result.rules
            self.ui.stationTableView.setMRMLTableNode(self.logic.nodes.table)
            self.ui.nodesLabel.text = self.logic.nodesSummary()
            nodeTable = self.logic.nodes.node_table
            self.ui.nodeTableView.setMRMLTableNode(nodeTable)
            self.ui.nodeTableView.visible = nodeTable is not None
        finally:
            self._updatingResults = False
        self._checkCanApply()


#
# LymphNodeStagingLogic
#


class LymphNodeStagingLogic(ScriptedLoadableModuleLogic):
    """Facade over LymphNodeStagingLib. Usable without the widget (batch scripts, tests)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.result = None  # current CaseResult
        self.stationMap = None  # SimpleITK station label map of the current result
        self.nodeMap = None  # SimpleITK lymph node instance map of the current result (None: no node model ran)
        self.nodes = None  # mrml.ResultNodes
        self.dicomSources = {}

    def getParameterNode(self):
        """The module's parameter node, typed."""
        return LymphNodeStagingParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        """Log a line (and show it in the widget's log box)."""
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    @staticmethod
    def columnTitles() -> dict:
        """Translated titles of the station table's columns (LymphNodeStagingLib.slicer.mrml.TABLE_COLUMNS)."""
        return {"Station": _("Station"), "Probability": _("Probability"), "Status": _("Status"),
                "Override": _("Override"), "SUVmax": _("SUVmax"), "SUVpeak": _("SUVpeak"),
                "Agreement": _("Atlas agreement"), "Group": _("N group"), "TopNode": _("Top node"),
                "NodeProbability": _("Probability from nodes")}

    @staticmethod
    def nodeColumnTitles() -> dict:
        """Translated titles of the node table's columns (LymphNodeStagingLib.slicer.mrml.NODE_TABLE_COLUMNS)."""
        return {"ID": _("ID"), "Station": _("Station"), "ShortAxis": _("Short axis (mm)"),
                "LongAxis": _("Long axis (mm)"), "Volume": _("Volume (ml)"), "SUVmax": _("SUVmax"),
                "Score": _("Score"), "Probability": _("Probability")}

    def nodesSummary(self) -> str:
        """One line about the lymph nodes of the current result, for the Results section."""
        if self.result is None or self.result.nodes is None:
            return _("Lymph nodes: no node model was run (choose one under Advanced).")
        large = sum(1 for n in self.result.nodes if (n.get("short_axis_mm") or 0.0) >= 10.0)
        return _("Lymph nodes: {count} found, {large} with a short axis of 10 mm or more. Click a row to jump to "
                 "the node.").format(count=len(self.result.nodes), large=large)

    # ----- dependencies ----------------------------------------------------------------------------------------
    @staticmethod
    def requirementsFile() -> Path:
        """The module's requirements file (what Slicer does not ship)."""
        return Path(__file__).resolve().parent / "Resources" / "requirements.txt"

    def setupPythonRequirements(self, interactive: bool = True) -> list:
        """Install the missing Python packages: one confirmation (when interactive), then one
        ``slicer.packaging.pip_ensure`` call (``slicer.util.pip_install`` in Slicer versions without it); torch
        through the PyTorch extension when it is installed. Returns what was installed."""
        from LymphNodeStagingLib.slicer import dependencies

        plan = dependencies.plan(self.requirementsFile())
        if not plan.missing:
            return []
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None

        def confirm(specs: list) -> bool:
            return slicer.util.confirmOkCancelDisplay(
                _("LymphNodeStaging needs {count} Python package(s) that Slicer does not include. They will be "
                  "downloaded and installed now; this needs a network connection and can take several minutes.")
                .format(count=len(specs)),
                windowTitle=_("LymphNodeStaging - Install Python Packages"), detailedText="\n".join(specs))

        self.log(_("Installing Python packages: {names}").format(names=", ".join(plan.missing_specs())))
        return dependencies.install(
            plan, confirm=confirm if interactive else None,
            pip_ensure=getattr(packaging, "pip_ensure", None), pip_install=slicer.util.pip_install,
            install_torch=self._torchInstaller())

    def _torchInstaller(self):
        """torch through the PyTorch extension (CPU or CUDA build for this computer), None without it."""
        try:
            import PyTorchUtils
        except ImportError:
            return None

        def installTorch(requirement) -> None:
            self.log(_("Installing PyTorch through the PyTorch extension"))
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=str(requirement.specifier))
            if torch is None:
                raise RuntimeError(_("The PyTorch extension could not install PyTorch ({requirement}); install it "
                                     "with the PyTorch Utils module.").format(requirement=requirement))

        return installTorch

    # ----- demo ------------------------------------------------------------------------------------------------
    def loadDemoCase(self, seed: int | None = None, size: str | None = None, folder: str | None = None,
                     buildAtlases: bool = True) -> dict:
        """Load a synthetic patient (the phantom generator's, written once into the cache folder) into the scene:
        CT, PET (SUV) and anatomy label map, shown fused. With ``buildAtlases`` the synthetic demo atlas set is
        built too when no atlas set is configured, so that Apply works on the demo case. Returns the nodes, the
        tumour side and the truth."""
        import json

        import SimpleITK as sitk

        from LymphNodeStagingLib.assessment.demo import DEMO_SEED, DEMO_SIZE
        from LymphNodeStagingLib.paths import ENV_ATLASES, cache_root, demo_atlas_set_path
        from LymphNodeStagingLib.phantom import build_demo_atlas_set, generate_patient, write_patient
        from LymphNodeStagingLib.slicer import mrml

        seed = DEMO_SEED if seed is None else int(seed)
        size = size or DEMO_SIZE
        caseId = f"DEMO{seed:04d}"
        folder = Path(folder) if folder else cache_root() / "slicer-demo" / f"{caseId}-{size}"
        if not (folder / "truth.json").is_file():  # written last: its presence means the case is complete
            self.log(_("Generating the demo patient (synthetic, seed {seed})...").format(seed=seed))
            write_patient(generate_patient(seed, size=size, patient_id=caseId), folder)
        if buildAtlases and not os.environ.get(ENV_ATLASES) and not (demo_atlas_set_path() / "manifest.json").is_file():
            self.log(_("Building the synthetic demo atlas set (once)..."))
            build_demo_atlas_set()
        truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
        scene = slicer.mrmlScene

        def read(name: str):
            return sitk.ReadImage(str(folder / f"{name}.nii.gz"))

        ctVolume = mrml.volume_node_from_image(scene, read("ct"), f"{caseId} CT")
        petVolume = mrml.volume_node_from_image(scene, read("pet"), f"{caseId} PET (SUV)")
        anatomy = mrml.volume_node_from_image(scene, read("anatomy"), f"{caseId} anatomy", labelmap=True)
        anatomy.GetDisplayNode().SetVisibility(False)
        mrml.show_pet_over_ct(scene, ctVolume, petVolume)
        if getattr(slicer, "app", None) is not None:
            slicer.util.resetSliceViews()
        return {"ctVolume": ctVolume, "petVolume": petVolume, "anatomy": anatomy, "side": truth["tumour_side"],
                "truth": truth, "caseId": caseId, "folder": folder}

    # ----- assessment ------------------------------------------------------------------------------------------
    @staticmethod
    def petDicomFiles(petVolume, fileForInstance=None) -> list:
        """The DICOM files a PET volume was loaded from (through Slicer's DICOM database); [] for a volume read
        from an image file. ``fileForInstance``: SOP Instance UID -> file (default: ``slicer.dicomDatabase``)."""
        uids = (petVolume.GetAttribute(DICOM_INSTANCE_UIDS) or "").split() if petVolume is not None else []
        if not uids:
            return []
        if fileForInstance is None:
            database = getattr(slicer, "dicomDatabase", None)
            if database is None:
                return []
            fileForInstance = database.fileForInstance
        files = [fileForInstance(uid) for uid in uids]
        if not all(files):
            raise ValueError(_("The DICOM files of the PET volume '{name}' are no longer in the DICOM database; "
                               "import the PET series again.").format(name=petVolume.GetName()))
        return files

    def checkInputs(self, ctVolume, petVolume, petIsSuv: bool = False, petDicomFolder: str = "",
                    fileForInstance=None) -> list:
        """Refuse what cannot be assessed, before any work; returns the PET's DICOM files ([] for a PET from an
        image file, which must be declared SUV: its SUV cannot be computed without a DICOM header; [] without a PET:
        the CT is assessed alone)."""
        if ctVolume is None:
            raise ValueError(_("Select a CT volume."))
        if petVolume is None and not petDicomFolder:
            return []  # CT-only mode
        if petDicomFolder:
            return []
        files = self.petDicomFiles(petVolume, fileForInstance)
        if not files and not petIsSuv:
            raise ValueError(_(
                "The PET volume '{name}' was not loaded from DICOM, so its SUV cannot be computed. If its values are "
                "SUV (body weight), tick 'PET volume holds SUV' under Advanced; otherwise load the PET series "
                "through the DICOM module.").format(name=petVolume.GetName()))
        return files

    @staticmethod
    def _linkFiles(files: list, folder: Path) -> Path:
        """A folder holding exactly the given files (hard links where possible, else copies)."""
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(files):
            target = folder / f"{i:05d}.dcm"
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        return folder

    def _petSource(self, petVolume, petIsSuv: bool, petDicomFolder: str, dicomFiles: list, workDir: Path):
        """(PET for the library, PET is SUV): a DICOM folder (SUV from its header), the volume's image, or None
        without a PET (the CT alone)."""
        from LymphNodeStagingLib.slicer import mrml

        if petVolume is None and not petDicomFolder:
            return None, False
        if petDicomFolder:
            return str(petDicomFolder), False
        if dicomFiles:
            return str(self._linkFiles(dicomFiles, workDir / "pet-dicom")), False
        return mrml.image_from_volume_node(petVolume), bool(petIsSuv)

    def process(self, ctVolume, petVolume=None, side: str = "R", *, petIsSuv: bool = False, petDicomFolder: str = "",
                anatomy=None, modelPath: str = "", nodeModelPath: str = "", atlasSet: str = "",
                rules: str = DEFAULT_RULES, device: str = "auto", threshold: float = 0.5, progress=None, cancel=None,
                outDir: str | None = None, fileForInstance=None, stationMethod: str = "atlas",
                stationModelPath: str = ""):
        """Assess one PET/CT given as volume nodes in this process and show the result.

        Blocks until done (scripts, batch, tests); the widget uses startBackgroundProcess instead.
        """
        import shutil
        import tempfile
        import time

        from LymphNodeStagingLib.assessment.assess import assess_case
        from LymphNodeStagingLib.runtime import parse_device
        from LymphNodeStagingLib.slicer import mrml

        dicomFiles = self.checkInputs(ctVolume, petVolume, petIsSuv, petDicomFolder, fileForInstance)
        dev = parse_device(device, name="device")
        start = time.time()
        self.log(_("Assessing lymph node stations..."))
        workDir = Path(tempfile.mkdtemp(prefix="LymphNodeStaging-"))
        try:
            pet, petIsSuv = self._petSource(petVolume, petIsSuv, petDicomFolder, dicomFiles, workDir)
            anatomyImage = self._anatomyImage(anatomy) if anatomy is not None else None
            assessment = assess_case(
                mrml.image_from_volume_node(ctVolume), pet, side, anatomy=anatomyImage, model=modelPath or None,
                node_model=nodeModelPath or None, atlases=atlasSet or None, rules=rules, device=dev,
                pet_is_suv=petIsSuv, out_dir=outDir, progress=progress, cancel=cancel, method=stationMethod,
                station_model=stationModelPath or None)
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
        suvImage = assessment.pet if isinstance(pet, str) else None  # SUV computed from the DICOM header
        detection = assessment.node_detection
        self._showOutput(assessment.result, assessment.station_map, suvImage,
                         getattr(assessment, "dicom_sources", None), ctVolume, petVolume, threshold, start,
                         nodeMap=detection.instances if detection is not None else None)
        return self.nodes

    def startBackgroundProcess(self, ctVolume, petVolume=None, side: str = "R", *, petIsSuv: bool = False,
                               petDicomFolder: str = "", anatomy=None, modelPath: str = "", nodeModelPath: str = "",
                               atlasSet: str = "", rules: str = DEFAULT_RULES, device: str = "auto",
                               threshold: float = 0.5, stationMapping: str = "", python: str | None = None,
                               fileForInstance=None, stationMethod: str = "atlas", stationModelPath: str = ""):
        """Start the assessment in a child process and return it (an AssessmentProcess: poll(), cancel()).

        The inputs are written to a temporary folder (a PET from DICOM as its DICOM files, so that SUV is
        computed from the header); call finishBackgroundProcess(process) once ``process.finished`` to show the
        result. ``stationMapping``: a station mapping folder written before (e.g. by a cohort run), which skips
        the registration. ``stationMethod``: atlas, network (from the CT alone) or both; ``stationModelPath``: the
        station network (empty: the bundled one).
        """
        import shutil
        import tempfile
        import time

        from LymphNodeStagingLib.assessment.process import AssessmentJob, AssessmentProcess
        from LymphNodeStagingLib.io.files import write_image
        from LymphNodeStagingLib.preflight.case import check_images
        from LymphNodeStagingLib.runtime import parse_device
        from LymphNodeStagingLib.slicer import mrml

        dicomFiles = self.checkInputs(ctVolume, petVolume, petIsSuv, petDicomFolder, fileForInstance)
        dev = parse_device(device, name="device")
        # the volumes' images are checked here (grid, CT in HU, PET in SUV) so that a bad volume is refused at once
        ctImage = mrml.image_from_volume_node(ctVolume)
        fromImage = petVolume is not None and not (dicomFiles or petDicomFolder)
        petImage = mrml.image_from_volume_node(petVolume) if fromImage else None
        check_images(ctImage, petImage, names={"CT": ctVolume.GetName(),
                                               "PET": petVolume.GetName() if petVolume is not None else ""})
        workDir = Path(tempfile.mkdtemp(prefix="LymphNodeStaging-"))
        try:
            ctFile = write_image(ctImage, workDir / "ct.nrrd", compress=False)
            pet, petIsSuv = self._petSource(petVolume, petIsSuv, petDicomFolder, dicomFiles, workDir)
            if pet is not None and not isinstance(pet, str):
                pet = str(write_image(pet, workDir / "pet.nrrd", compress=False))
            anatomyFile = None
            if anatomy is not None:
                anatomyFile = write_image(self._anatomyImage(anatomy), workDir / "anatomy.nrrd", compress=False)
            job = AssessmentJob(
                ct=str(ctFile), pet=pet, side=side, out_dir=str(workDir / "out"),
                anatomy=str(anatomyFile) if anatomyFile else None, model=modelPath or None,
                node_model=nodeModelPath or None, atlases=atlasSet or None, rules=rules, device=dev.torch,
                pet_is_suv=petIsSuv, case_id=ctVolume.GetName(), station_mapping=stationMapping or None,
                method=stationMethod, station_model=stationModelPath or None)
            process = AssessmentProcess(job, python=python or self.pythonExecutable()).start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self.log(_("Assessing lymph node stations in the background..."))
        process.slicerContext = {"ctVolume": ctVolume, "petVolume": petVolume, "threshold": threshold,
                                 "workDir": workDir, "start": time.time()}
        return process

    def finishBackgroundProcess(self, process):
        """Show the result of a finished background assessment (raises its error, or Cancelled); removes its
        temporary folder."""
        import shutil

        context = process.slicerContext
        try:
            output = process.output()
            self._showOutput(output.result, output.station_map, output.pet, output.dicom_sources,
                             context["ctVolume"], context["petVolume"], context["threshold"], context["start"],
                             nodeMap=output.node_map)
        finally:
            shutil.rmtree(context["workDir"], ignore_errors=True)
        return self.nodes

    @staticmethod
    def pythonExecutable() -> str:
        """The Python interpreter for child processes: PythonSlicer inside Slicer, else this interpreter."""
        import shutil

        return shutil.which("PythonSlicer") or sys.executable

    def _showOutput(self, result, stationMap, suvImage, dicomSources, ctVolume, petVolume, threshold, start,
                    nodeMap=None):
        """Show an assessment; ``suvImage``: the PET in SUV when it was computed from DICOM (shown as a new
        volume, since the loaded PET volume holds activity concentration); ``nodeMap``: the lymph node instance
        map when a node model ran."""
        import time

        from LymphNodeStagingLib.slicer import mrml

        if abs(result.threshold - threshold) > 1e-9:
            result = result.restage(threshold=threshold)
        if suvImage is not None:
            petVolume = mrml.volume_node_from_image(slicer.mrmlScene, suvImage, _("PET (SUV)"))
        self.dicomSources = dict(dicomSources or {})
        self.showAssessment(result, stationMap, ctVolume, petVolume, nodeMap=nodeMap)
        if result.nodes is not None:
            self.log(self.nodesSummary())
        if result.demo_banner:
            self.log(result.demo_banner)
        if result.modality == "ct":
            self.log(_("CT only (no PET): station probabilities from a CT-only model, no SUV figures"))
        self.log(_("{stage} (TNM 9 {tnm9}) in {seconds:.1f} s").format(
            stage=result.n_stage, tnm9=result.tnm9, seconds=time.time() - start))

    @staticmethod
    def _anatomyImage(anatomy):
        """The anatomy label map of a label map node, or of a segmentation exported to one."""
        from LymphNodeStagingLib.slicer import mrml

        if anatomy.IsA("vtkMRMLLabelMapVolumeNode"):
            return mrml.image_from_volume_node(anatomy)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "anatomy (export)")
        try:
            slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
                anatomy, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            return mrml.image_from_volume_node(labelmap)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def showAssessment(self, result, stationMap, ctVolume, petVolume=None, nodeMap=None):
        """Show a result (CaseResult + station map, and the lymph node instance map when the result has nodes) over
        the CT/PET."""
        from LymphNodeStagingLib.slicer import mrml

        scene = slicer.mrmlScene
        mrml.show_pet_over_ct(scene, ctVolume, petVolume)
        self.nodes = mrml.show_result(scene, result, stationMap, reference_node=ctVolume, node_map=nodeMap)
        self._setTitles()
        self.result = result
        self.stationMap = stationMap
        self.nodeMap = nodeMap
        return self.nodes

    def _setTitles(self) -> None:
        from LymphNodeStagingLib.slicer import mrml

        mrml.set_column_titles(self.nodes.table, self.columnTitles())
        if self.nodes.node_table is not None:
            mrml.set_column_titles(self.nodes.node_table, self.nodeColumnTitles())

    def loadResultFromNode(self, segmentationNode) -> None:
        """Review a result saved in the scene (the result JSON is stored on the segmentation node)."""
        from LymphNodeStagingLib.slicer import mrml

        self.result = mrml.result_from_node(segmentationNode)
        self.nodes = mrml.find_result_nodes(slicer.mrmlScene, segmentationNode)
        self._setTitles()
        self.stationMap = None
        self.nodeMap = None

    def restage(self, threshold=None, overrides=None, rules=None):
        """Re-stage instantly (no network run) and update the nodes in place."""
        from LymphNodeStagingLib.slicer import mrml

        if self.result is None:
            raise ValueError(_("No result to re-stage: run the assessment first."))
        merged = {s.name: s.override for s in self.result.stations if s.override}
        merged.update(overrides or {})
        self.result = self.result.restage(threshold=threshold, overrides=merged, rules=rules)
        mrml.update_result(self.nodes, self.result)
        return self.result

    def jumpToStation(self, station: str):
        """Centre every slice view on a station."""
        from LymphNodeStagingLib.slicer import mrml

        return mrml.jump_to_station(slicer.mrmlScene, self.result, station, self.nodes.segmentation)

    def jumpToNode(self, row: int):
        """Centre every slice view on the lymph node of a row (0-based) of the node table."""
        from LymphNodeStagingLib.slicer import mrml

        if self.result is None or self.nodes is None or self.nodes.node_table is None:
            raise ValueError(_("No lymph nodes to show: run the assessment with a node model first."))
        return mrml.jump_to_node(slicer.mrmlScene, self.result, self.nodes.node_table, row)

    def exportResults(self, outDir: str):
        """.seg.nrrd (stations, lymph nodes), result JSON/CSV, report; DICOM SEG when the CT came from DICOM."""
        from LymphNodeStagingLib.slicer import mrml

        if self.result is None:
            raise ValueError(_("Nothing to export: run the assessment first."))
        ctDicom = self.dicomSources.get("ct")
        return mrml.export_result(self.nodes, self.result, outDir,
                                  station_map=self.stationMap if ctDicom else None, dicom_ct_dir=ctDicom)


#
# LymphNodeStagingTest
#


def makeSyntheticCase(side: str = "R"):
    """A small phantom PET/CT with its station map and a result with made-up probabilities."""
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.phantom import generate_patient
    from LymphNodeStagingLib.staging.result import make_case_result
    from LymphNodeStagingLib.staging.stations import STATIONS

    patient = generate_patient(0, size="small")
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(patient.stations))}
    probabilities = {st.name: (0.9 if st.name == "4R" else 0.6 if st.name == "7" else 0.1)
                     for st in STATIONS if st.label in present}
    return patient.ct, patient.pet, patient.stations, make_case_result("synthetic", side, probabilities)


def makeSyntheticNodes(ct, pet, stations, result, radii=(("4R", 7.0), ("7", 4.0))):
    """Spherical lymph nodes at the centres of the given stations of a synthetic case, found and measured by the
    library (``find_nodes``); returns the result with its ``nodes`` and the node instance map."""
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.nodes.instances import find_nodes
    from LymphNodeStagingLib.staging.stations import parse_station

    labels = sitk.GetArrayFromImage(stations)
    spacing = np.asarray(stations.GetSpacing()[::-1])
    grid = np.indices(labels.shape, dtype=float)
    probability = np.zeros(labels.shape, np.float32)
    for name, radius in radii:
        inside = np.argwhere(labels == parse_station(name).label)
        if len(inside) == 0:
            continue
        centre = inside.mean(axis=0)
        d2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
        probability[d2 <= radius ** 2] = 0.9
    image = sitk.GetImageFromArray(probability)
    image.CopyInformation(stations)
    instances, found = find_nodes(image, ct, pet=pet, stations=stations)
    result.nodes = [n.to_dict() for n in found]
    return result, instances


class LymphNodeStagingTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload & Test, ctest py_LymphNodeStaging) on synthetic data; nothing is downloaded."""

    def setUp(self):
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run every test."""
        self.setUp()
        self.test_ShowAndRestage()
        self.setUp()
        self.test_LymphNodes()
        self.setUp()
        self.test_FullPipeline()

    def test_ShowAndRestage(self):
        """Nodes of a synthetic result, instant re-staging after an override and a rule change, export."""
        import tempfile

        from LymphNodeStagingLib.slicer import mrml

        self.delayDisplay("Showing a synthetic result")
        ct, pet, stations, result = makeSyntheticCase()
        scene = slicer.mrmlScene
        ctNode = mrml.volume_node_from_image(scene, ct, "CT")
        petNode = mrml.volume_node_from_image(scene, pet, "PET")
        logic = LymphNodeStagingLogic()
        nodes = logic.showAssessment(result, stations, ctNode, petNode)
        segmentation = nodes.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 17)
        self.assertEqual(segmentation.GetSegment("4R").GetName(), "Station 4R")
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_N_STAGE), "N2")
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_TNM9), "N2b")
        self.assertEqual(nodes.table.GetColumnTitle("Station"), _("Station"))

        logic.restage(overrides={"7": "negative"})
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_TNM9), "N2a")
        self.assertEqual(mrml.segment_tag(segmentation.GetSegment("7"), mrml.TAG_OVERRIDE), "negative")
        other = next(r for r in available_rule_sets() if r != result.rules)
        logic.restage(rules=other)
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_RULES), other)
        logic.restage(threshold=0.95)
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_N_STAGE), "N0")
        self.assertIsNotNone(logic.jumpToStation("4R"))

        with tempfile.TemporaryDirectory() as tmp:
            paths = logic.exportResults(tmp)
            self.assertTrue(os.path.isfile(paths["segmentation"]))
            reloaded = mrml.load_segmentation(scene, paths["segmentation"])
            self.assertEqual(reloaded.GetSegmentation().GetNumberOfSegments(), 17)
        self.delayDisplay("Test passed")

    def test_LymphNodes(self):
        """Lymph nodes of a result: one segment per node named after station and short axis, the node table, a jump
        to the node of a table row."""
        from LymphNodeStagingLib.slicer import mrml

        self.delayDisplay("Showing lymph nodes")
        ct, pet, stations, result = makeSyntheticCase()
        result, nodeMap = makeSyntheticNodes(ct, pet, stations, result)
        scene = slicer.mrmlScene
        logic = LymphNodeStagingLogic()
        nodes = logic.showAssessment(result, stations, mrml.volume_node_from_image(scene, ct, "CT"),
                                     mrml.volume_node_from_image(scene, pet, "PET"), nodeMap=nodeMap)
        self.assertEqual(len(result.nodes), 2)
        segmentation = nodes.node_segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        first = result.nodes[0]
        self.assertEqual(segmentation.GetSegment("node-1").GetName(), mrml.node_segment_name(first))
        self.assertTrue(mrml.node_segment_name(first).startswith(f"{first['station']} node "))
        self.assertEqual(nodes.node_table.GetNumberOfRows(), 2)
        self.assertEqual(nodes.node_table.GetColumnTitle("ShortAxis"), _("Short axis (mm)"))
        ras = logic.jumpToNode(1)
        expected = mrml.lps_to_ras(result.nodes[1]["centre_mm"])
        self.assertTrue(all(abs(a - b) < 1e-6 for a, b in zip(ras, expected, strict=True)))
        logic.restage(threshold=0.95)  # re-staging leaves the nodes alone
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        self.delayDisplay("Test passed")

    def test_FullPipeline(self):
        """The whole assessment on a small phantom, with its anatomy label map (no TotalSegmentator run)."""
        import tempfile

        logic = LymphNodeStagingLogic()
        with tempfile.TemporaryDirectory() as tmp:
            demo = logic.loadDemoCase(size="small", folder=tmp)
            with self.assertRaises(ValueError):  # a PET from an image file must be declared SUV
                logic.process(demo["ctVolume"], demo["petVolume"], demo["side"], device="cpu")
            nodes = logic.process(demo["ctVolume"], demo["petVolume"], demo["side"], petIsSuv=True,
                                  anatomy=demo["anatomy"], device="cpu")
        self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 17)
        self.assertIn(logic.result.n_stage, ("N0", "N1", "N2", "N3"))
        self.delayDisplay("Test passed")
