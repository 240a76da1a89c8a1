"""3D Slicer module: mediastinal lymph node stations on FDG PET/CT, their probability of malignancy and the N-stage.

A thin layer: the widget moves values between the GUI and the parameter node, the logic is a facade over
LymphNodeStagingLib (assessment, MRML bridge, export), which holds all computation and all scene building.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LymphNodeStagingLib.errors import Cancelled

# In a checkout the library sits next to this folder; in a built extension it is copied next to this file.
for _candidate in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if (_candidate / "LymphNodeStagingLib").is_dir() and str(_candidate) not in sys.path:
        sys.path.insert(0, str(_candidate))
        break


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
            "Click a row of the station table to jump to the station; move the threshold or override a station to "
            "re-stage instantly. Not a medical device: results must be reviewed by a qualified physician.")
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
    petIsSuv: bool = True
    petDicomFolder: str = ""
    tumourSide: Annotated[str, Choice(["R", "L"])] = "R"
    anatomySegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    atlasSet: str = ""
    ruleSet: Annotated[str, Choice(["ajcc8", "engelson2026"])] = "ajcc8"
    useCpu: bool = False
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    resultSegmentation: vtkMRMLSegmentationNode


#
# LymphNodeStagingWidget
#


class LymphNodeStagingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: inputs, Apply with progress and cancel, results table, threshold, overrides, export."""

    TABLE_COLUMNS = ("Station", "Probability", "Status", "SUVmax", "SUVpeak", "Agreement", "Override")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None  # the running AssessmentProcess
        self._pollTimer = None
        self._updatingResults = False

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

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.stationTableWidget.connect("cellClicked(int,int)", self.onStationClicked)
        self.ui.overrideComboBox.connect("currentIndexChanged(int)", self.onOverrideChanged)
        self.ui.resultSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultSelected)
        self.ui.stationTableWidget.setColumnCount(len(self.TABLE_COLUMNS))
        self.ui.stationTableWidget.setHorizontalHeaderLabels(list(self.TABLE_COLUMNS))
        self.ui.exportDirectoryButton.directory = qt.QDir.homePath()

        self.initializeParameterNode()

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
        if self._process is not None:
            self._process.cancel()  # its inputs are leaving the scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Parameter node of the module, with the first CT-like volume selected when nothing is."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first

    def setParameterNode(self, inputParameterNode: LymphNodeStagingParameterNode | None) -> None:
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
        hasPet = bool(p and (p.petVolume or p.petDicomFolder))
        if p and p.ctVolume and hasPet:
            self.ui.applyButton.toolTip = _("Assess the stations and stage the case.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select a CT volume and a PET volume (or a PET DICOM folder).")
            self.ui.applyButton.enabled = False
        self.ui.exportButton.enabled = self.logic.result is not None

    # ----- log and progress ------------------------------------------------------------------------------------
    def addLog(self, text: str) -> None:
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
    def onApplyButton(self) -> None:
        """Install missing dependencies (after confirmation), then start the assessment in a child process.

        The GUI stays responsive: a timer polls the process for progress and log lines, Cancel asks it to stop.
        """
        if self._process is not None:
            return
        p = self._parameterNode
        self._setRunning(True)
        with slicer.util.tryWithErrorDisplay(_("Failed to start the assessment."), waitCursor=True):
            self.logic.setupPythonRequirements(interactive=True)
            self._process = self.logic.startBackgroundProcess(
                p.ctVolume, p.petVolume, p.tumourSide, petIsSuv=p.petIsSuv, petDicomFolder=p.petDicomFolder,
                anatomy=p.anatomySegmentation, modelPath=p.modelPath, atlasSet=p.atlasSet, rules=p.ruleSet,
                cpu=p.useCpu, threshold=p.threshold)
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
        pass

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
        if self._process is not None:
            self._process.cancel()
            self.addLog(_("Cancelling..."))

    def onResultSelected(self, node) -> None:
        if self._updatingResults or node is None:
            return
        with slicer.util.tryWithErrorDisplay(_("This segmentation holds no lymph node staging result."),
                                             waitCursor=False):
            self.logic.loadResultFromNode(node)
            self.updateResults()

    def onThresholdChanged(self, value: float) -> None:
        if self.logic.result is None or self._updatingResults:
            return
        self.logic.restage(threshold=value)
        self.updateResults()

    def _selectedStation(self) -> str | None:
        row = self.ui.stationTableWidget.currentRow()
        if row < 0 or self.logic.result is None:
            return None
        item = self.ui.stationTableWidget.item(row, 0)
        return item.text() if item else None

    def onStationClicked(self, row: int, column: int) -> None:
        station = self._selectedStation()
        if station is None:
            return
        self.logic.jumpToStation(station)
        override = self.logic.result.station(station).override or "model"
        self._updatingResults = True
        self.ui.overrideComboBox.currentText = override
        self._updatingResults = False

    def onOverrideChanged(self, index: int) -> None:
        station = self._selectedStation()
        if station is None or self._updatingResults:
            return
        value = self.ui.overrideComboBox.currentText
        self.logic.restage(overrides={station: None if value == "model" else value})
        self.updateResults()

    def onExportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            paths = self.logic.exportResults(self.ui.exportDirectoryButton.directory)
            self.addLog(_("Exported: {files}").format(files=", ".join(str(v) for v in paths.values())))

    # ----- results ---------------------------------------------------------------------------------------------
    def updateResults(self) -> None:
        """Show the logic's current result: N-stage labels and the station table."""
        result = self.logic.result
        if result is None:
            return
        self._updatingResults = True
        try:
            self.ui.nStageLabel.text = result.n_stage
            self.ui.tnm9Label.text = result.tnm9
            self.ui.decidingLabel.text = _("{stations} ({rules} rules, tumour side {side})").format(
                stations=", ".join(result.deciding_stations) or _("none"), rules=result.rules, side=result.side)
            self.ui.thresholdSliderWidget.value = result.threshold
            table = self.ui.stationTableWidget
            table.setRowCount(len(result.stations))
            from LymphNodeStagingLib.staging.colors import probability_color

            for row, st in enumerate(result.stations):
                cells = (st.name, _num(st.probability), st.status, _num(st.suv_max, 2), _num(st.suv_peak, 2),
                         _num(st.agreement), st.override or "")
                for col, text in enumerate(cells):
                    item = qt.QTableWidgetItem(text)
                    if col == 1 and st.probability is not None:
                        r, g, b = probability_color(st.probability)
                        item.setBackground(qt.QColor(int(255 * r), int(255 * g), int(255 * b)))
                    table.setItem(row, col, item)
        finally:
            self._updatingResults = False
        self._checkCanApply()


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


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
        self.nodes = None  # mrml.ResultNodes
        self.dicomSources = {}

    def getParameterNode(self):
        return LymphNodeStagingParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # ----- dependencies ----------------------------------------------------------------------------------------
    def setupPythonRequirements(self, interactive: bool = True) -> None:
        """Install the pinned dependencies that are missing (asks first when interactive)."""
        from LymphNodeStagingLib.slicer import dependencies as slicer_deps

        missing = slicer_deps.missing(slicer_deps.slicer_requirements())
        torchReq = slicer_deps.torch_requirement()
        needTorch = bool(slicer_deps.missing([torchReq]))
        try:
            import torch  # noqa: F401
            needTorch = False
        except ImportError:
            pass
        if not missing and not needTorch:
            return
        names = [r.spec for r in missing] + ([torchReq.spec] if needTorch else [])
        if interactive and not slicer.util.confirmOkCancelDisplay(
                _("LymphNodeStaging needs these Python packages, which will be downloaded and installed now "
                  "(this can take several minutes):\n{names}").format(names="\n".join(names))):
            raise RuntimeError(_("Python packages required by LymphNodeStaging were not installed."))
        if needTorch:
            self._installTorch(torchReq)
        if missing:
            specs = [r.spec for r in missing]
            self.log(_("Installing {names}").format(names=", ".join(specs)))
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(specs, requester="LymphNodeStaging")
            else:
                slicer.util.pip_install(specs)

    def _installTorch(self, requirement) -> None:
        try:
            import PyTorchUtils
        except ImportError:
            # no PyTorch extension: the pinned (CPU) build from PyPI
            slicer.util.pip_install(requirement.spec)
            return
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log(_("Installing PyTorch through the PyTorch extension"))
            torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={requirement.version}")

    # ----- assessment ------------------------------------------------------------------------------------------
    @staticmethod
    def _checkInputs(ctVolume, petVolume, petDicomFolder) -> None:
        if ctVolume is None:
            raise ValueError(_("Select a CT volume."))
        if petVolume is None and not petDicomFolder:
            raise ValueError(_("Select a PET volume or a PET DICOM folder."))

    def process(self, ctVolume, petVolume=None, side: str = "R", *, petIsSuv: bool = True, petDicomFolder: str = "",
                anatomy=None, modelPath: str = "", atlasSet: str = "", rules: str = "ajcc8", cpu: bool = False,
                threshold: float = 0.5, progress=None, cancel=None, outDir: str | None = None):
        """Assess one PET/CT given as volume nodes (PET as node or DICOM folder) in this process and show the result.

        Blocks until done (scripts, batch, tests); the widget uses startBackgroundProcess instead.
        """
        import time

        from LymphNodeStagingLib.assessment.assess import assess_case
        from LymphNodeStagingLib.slicer import mrml

        self._checkInputs(ctVolume, petVolume, petDicomFolder)
        start = time.time()
        self.log(_("Assessing lymph node stations..."))
        ct = mrml.image_from_volume_node(ctVolume)
        if petDicomFolder:
            pet, petIsSuv = petDicomFolder, False  # SUV computed from the DICOM headers
        else:
            pet = mrml.image_from_volume_node(petVolume)
        anatomyImage = None
        if anatomy is not None:
            anatomyImage = self._anatomyImage(anatomy, ctVolume)
        assessment = assess_case(
            ct, pet, side, anatomy=anatomyImage, model=modelPath or None, atlases=atlasSet or None, rules=rules,
            device="cpu" if cpu else self.defaultDevice(), pet_is_suv=petIsSuv, out_dir=outDir,
            progress=progress, cancel=cancel)
        self._showOutput(assessment.result, assessment.station_map, assessment.pet if petVolume is None else None,
                         getattr(assessment, "dicom_sources", None), ctVolume, petVolume, threshold, start)
        return self.nodes

    def startBackgroundProcess(self, ctVolume, petVolume=None, side: str = "R", *, petIsSuv: bool = True,
                               petDicomFolder: str = "", anatomy=None, modelPath: str = "", atlasSet: str = "",
                               rules: str = "ajcc8", cpu: bool = False, threshold: float = 0.5,
                               stationMapping: str = "", python: str | None = None):
        """Start the assessment in a child process and return it (an AssessmentProcess: poll(), cancel()).

        The input volumes are written to a temporary folder; call finishBackgroundProcess(process) once
        ``process.finished`` to show the result. ``stationMapping``: a station mapping folder written before (e.g.
        by a cohort run), which skips the registration.
        """
        import tempfile
        import time

        from LymphNodeStagingLib.assessment.process import AssessmentJob, AssessmentProcess
        from LymphNodeStagingLib.io.files import write_image
        from LymphNodeStagingLib.slicer import mrml

        self._checkInputs(ctVolume, petVolume, petDicomFolder)
        workDir = Path(tempfile.mkdtemp(prefix="LymphNodeStaging-"))
        try:
            ctFile = write_image(mrml.image_from_volume_node(ctVolume), workDir / "ct.nrrd", compress=False)
            if petDicomFolder:
                petFile, petIsSuv = petDicomFolder, False  # SUV computed from the DICOM headers in the child
            else:
                petFile = write_image(mrml.image_from_volume_node(petVolume), workDir / "pet.nrrd", compress=False)
            anatomyFile = None
            if anatomy is not None:
                anatomyFile = write_image(self._anatomyImage(anatomy, ctVolume), workDir / "anatomy.nrrd",
                                          compress=False)
            job = AssessmentJob(
                ct=str(ctFile), pet=str(petFile), side=side, out_dir=str(workDir / "out"),
                anatomy=str(anatomyFile) if anatomyFile else None, model=modelPath or None,
                atlases=atlasSet or None, rules=rules, device="cpu" if cpu else self.defaultDevice(),
                pet_is_suv=bool(petIsSuv), case_id=ctVolume.GetName(), station_mapping=stationMapping or None)
            process = AssessmentProcess(job, python=python or self.pythonExecutable()).start()
        except Exception:
            import shutil

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
                             context["ctVolume"], context["petVolume"], context["threshold"], context["start"])
        finally:
            shutil.rmtree(context["workDir"], ignore_errors=True)
        return self.nodes

    @staticmethod
    def pythonExecutable() -> str:
        """The Python interpreter for child processes: PythonSlicer inside Slicer, else this interpreter."""
        import shutil

        return shutil.which("PythonSlicer") or sys.executable

    def _showOutput(self, result, stationMap, petImage, dicomSources, ctVolume, petVolume, threshold, start):
        import time

        from LymphNodeStagingLib.slicer import mrml

        if abs(result.threshold - threshold) > 1e-9:
            result = result.restage(threshold=threshold)
        if petVolume is None:
            petVolume = mrml.volume_node_from_image(slicer.mrmlScene, petImage, "PET (SUV)")
        self.dicomSources = dict(dicomSources or {})
        self.showAssessment(result, stationMap, ctVolume, petVolume)
        self.log(_("{stage} (TNM 9 {tnm9}) in {seconds:.1f} s").format(
            stage=result.n_stage, tnm9=result.tnm9, seconds=time.time() - start))

    @staticmethod
    def defaultDevice() -> str:
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"

    @staticmethod
    def _anatomyImage(anatomy, referenceVolume):
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

    def showAssessment(self, result, stationMap, ctVolume, petVolume=None):
        """Show a result (CaseResult + station map) over the CT/PET; reuses this logic's nodes when present."""
        from LymphNodeStagingLib.slicer import mrml

        scene = slicer.mrmlScene
        mrml.show_pet_over_ct(scene, ctVolume, petVolume)
        self.nodes = mrml.show_result(scene, result, stationMap, reference_node=ctVolume)
        self.result = result
        self.stationMap = stationMap
        return self.nodes

    def loadResultFromNode(self, segmentationNode) -> None:
        """Review a result saved in the scene (the result JSON is stored on the segmentation node)."""
        from LymphNodeStagingLib.slicer import mrml

        self.result = mrml.result_from_node(segmentationNode)
        self.nodes = mrml.find_result_nodes(slicer.mrmlScene, segmentationNode)
        self.stationMap = None

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
        from LymphNodeStagingLib.slicer import mrml

        return mrml.jump_to_station(slicer.mrmlScene, self.result, station, self.nodes.segmentation)

    def exportResults(self, outDir: str):
        """.seg.nrrd, result JSON/CSV, report; DICOM SEG when the CT came from DICOM."""
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
    """A small synthetic PET/CT with a station map and a result (the phantom generator when installed)."""
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.staging.result import make_case_result
    from LymphNodeStagingLib.staging.stations import STATIONS

    try:
        from LymphNodeStagingLib.phantom import generate_patient

        patient = generate_patient(0, size="small")
        ct, pet, stations = patient.ct, patient.pet, patient.stations
    except (ImportError, AttributeError, TypeError):
        shape, spacing = (24, 40, 48), 4.0
        z, y, x = np.meshgrid(*(np.arange(n) * spacing - (n - 1) * spacing / 2 for n in shape), indexing="ij")
        ctArray = np.where((x / 90) ** 2 + (y / 70) ** 2 <= 1, 40.0, -1000.0).astype(np.float32)
        petArray = np.where(ctArray > -500, 1.0, 0.0).astype(np.float32)
        labels = np.zeros(shape, np.uint8)
        for i, st in enumerate(STATIONS):
            cx = {"R": -20.0, "L": 20.0, "M": 0.0}[st.side]
            cz = 40.0 - 5.0 * i
            labels[(x - cx) ** 2 + (y - 0) ** 2 + (z - cz) ** 2 <= 36.0] = st.label
        petArray[labels == 8] = 7.0  # 4R

        def image(array):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((spacing,) * 3)
            img.SetOrigin(tuple(-(n - 1) * spacing / 2 for n in shape[::-1]))
            return img

        ct, pet, stations = image(ctArray), image(petArray), image(labels)
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(stations))}
    probabilities = {st.name: (0.9 if st.name == "4R" else 0.6 if st.name == "7" else 0.1)
                     for st in STATIONS if st.label in present}
    result = make_case_result("synthetic", side, probabilities)
    return ct, pet, stations, result


class LymphNodeStagingTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload & Test, ctest py_LymphNodeStaging) on synthetic data; nothing is downloaded."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ShowAndRestage()
        self.setUp()
        self.test_FullPipeline()

    def test_ShowAndRestage(self):
        """Nodes of a synthetic result, instant re-staging after an override, export."""
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

        logic.restage(overrides={"7": "negative"})
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_TNM9), "N2a")
        self.assertEqual(mrml.segment_tag(segmentation.GetSegment("7"), mrml.TAG_OVERRIDE), "negative")
        logic.restage(threshold=0.95)
        self.assertEqual(nodes.segmentation.GetAttribute(mrml.ATTR_N_STAGE), "N0")
        self.assertIsNotNone(logic.jumpToStation("4R"))

        with tempfile.TemporaryDirectory() as tmp:
            paths = logic.exportResults(tmp)
            self.assertTrue(os.path.isfile(paths["segmentation"]))
            reloaded = mrml.load_segmentation(scene, paths["segmentation"])
            self.assertEqual(reloaded.GetSegmentation().GetNumberOfSegments(), 17)
        self.delayDisplay("Test passed")

    def test_FullPipeline(self):
        """The whole assessment on a phantom, when the assessment and the phantom are installed."""
        try:
            from LymphNodeStagingLib.assessment.assess import assess_case  # noqa: F401
            from LymphNodeStagingLib.phantom import generate_patient  # noqa: F401
        except ImportError:
            self.delayDisplay("Assessment or phantom not available: full pipeline test skipped")
            return
        from LymphNodeStagingLib.slicer import mrml

        ct, pet, _stations, _result = makeSyntheticCase()
        scene = slicer.mrmlScene
        ctNode = mrml.volume_node_from_image(scene, ct, "CT")
        petNode = mrml.volume_node_from_image(scene, pet, "PET")
        logic = LymphNodeStagingLogic()
        nodes = logic.process(ctNode, petNode, "R", petIsSuv=True, cpu=True)
        self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 17)
        self.assertIn(logic.result.n_stage, ("N0", "N1", "N2", "N3"))
        self.delayDisplay("Test passed")
