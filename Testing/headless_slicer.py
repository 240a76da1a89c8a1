"""A headless 3D Slicer core for tests: scene, application logic, module logics and offscreen views.

It stands in for the Slicer application (which cannot run here) using only the Qt-free ``slicer-core`` wheel:
an MRML scene, ``vtkSlicerApplicationLogic``, the module logics that the extension touches (Colors, Volumes,
Segmentations, Tables, Texts, Subject hierarchy, Terminologies), the ``slicer.mrmlScene`` / ``slicer.modules``
globals that ``slicer.util`` reads, and offscreen slice and 3D views rendered through Slicer's own slice logic and
displayable managers (EGL, no X server). ``slicer.app`` stays None: code under test must not need it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
import vtk  # noqa: E402


class HeadlessSlicer:
    """Scene + application logic + module logics, wired as Slicer's application does at start-up."""

    def __init__(self, home: str | Path | None = None) -> None:
        self._tmp = None
        if home is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="headless-slicer-")
            home = self._tmp.name
        self.home = Path(home)
        (self.home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)

        output = vtk.vtkOutputWindow.GetInstance()
        if hasattr(output, "SetDisplayModeToAlwaysStdErr"):
            output.SetDisplayModeToAlwaysStdErr()

        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetHomeDirectory(str(self.home))
        self.app_logic.SetShareDirectory("share")
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())
        for factory in (slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(),
                        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()):
            factory.SetMRMLApplicationLogic(self.app_logic)

        # Colors first (registers the colour legend node; installed as the application's colour logic),
        # Segmentations before any segmentation work (registers the converter rules).
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLApplicationLogic(self.app_logic)
        colors.SetMRMLScene(self.scene)
        colors.AddDefaultColorNodes()
        self.app_logic.SetColorLogic(colors)
        self.logics: dict[str, object] = {"colors": colors}
        self.app_logic.SetModuleLogic("Colors", colors)
        for name, cls in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                          ("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Tables", slicer.vtkSlicerTablesLogic),
                          ("Texts", slicer.vtkSlicerTextsLogic),
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("Data", slicer.vtkSlicerDataModuleLogic)):
            logic = cls()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name.lower()] = logic
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)

        # Globals read by slicer.util (getNode, arrayFromVolume, ...).
        slicer.mrmlScene = self.scene
        if not isinstance(getattr(slicer, "modules", None), SimpleNamespace):
            slicer.modules = SimpleNamespace()
        for key, logic in self.logics.items():
            setattr(slicer.modules, key, SimpleNamespace(logic=lambda logic=logic: logic))
        slicer.app = None
        self._views: list[object] = []

    def slice_view(self, name: str = "Red", orientation: str = "Axial", size: int = 384) -> OffscreenSliceView:
        view = OffscreenSliceView(self, name, orientation, size)
        self._views.append(view)
        return view

    def threed_view(self, size: int = 384) -> OffscreenThreeDView:
        view = OffscreenThreeDView(self, size)
        self._views.append(view)
        return view

    def close(self) -> None:
        for view in self._views:
            view.close()
        self._views.clear()
        self.scene.Clear(True)
        if self._tmp is not None:
            self._tmp.cleanup()


def _render_window(size: int, layers: int):
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.SetNumberOfLayers(layers)
    window.SetMultiSamples(0)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window, interactor


def _save_png(window, path: str | Path) -> Path:
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return path


@dataclass
class _Pixel:
    x: int
    y: int


class OffscreenSliceView:
    """A slice view: Slicer's slice logic + 2D displayable managers, the slice image drawn by an image actor."""

    MANAGERS = ("vtkMRMLCrosshairDisplayableManager", "vtkMRMLModelSliceDisplayableManager",
                "vtkMRMLOrientationMarkerDisplayableManager", "vtkMRMLRulerDisplayableManager",
                "vtkMRMLScalarBarDisplayableManager", "vtkMRMLSegmentationsDisplayableManager2D",
                "vtkMRMLColorLegendDisplayableManager")

    def __init__(self, app: HeadlessSlicer, name: str, orientation: str, size: int) -> None:
        self.size = size
        self.window, self.interactor = _render_window(size, 2)
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetLayer(0)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.overlay = vtk.vtkRenderer()
        self.overlay.SetLayer(1)
        self.overlay.InteractiveOff()
        self.overlay.SetActiveCamera(self.renderer.GetActiveCamera())
        self.window.AddRenderer(self.renderer)
        self.window.AddRenderer(self.overlay)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for dm in self.MANAGERS:
            if not factory.IsDisplayableManagerRegistered(dm):
                factory.RegisterDisplayableManager(dm)
        self.dm_group = factory.InstantiateDisplayableManagers(self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        app.app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(app.scene)
        self.node = self.logic.AddSliceNode(name)
        self.node.SetOrientation(orientation)
        self.dm_group.SetMRMLDisplayableNode(self.node)

        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.mapper)
        self.renderer.AddViewProp(self.image_actor)
        self.logic.ResizeSliceNode(size, size)

    @property
    def composite(self):
        return self.logic.GetSliceCompositeNode()

    def fit(self) -> None:
        self.logic.ResizeSliceNode(self.size, self.size)
        self.logic.FitSliceToAll()

    def ras_to_pixel(self, ras) -> _Pixel:
        """Window pixel (x from the left, y from the top of the PNG) that shows the RAS point."""
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(self.node.GetXYToRAS())
        xy_to_ras.Invert()
        x, y, _z, _w = xy_to_ras.MultiplyPoint((*ras, 1.0))
        return _Pixel(int(round(x)), int(round(self.size - 1 - y)))

    def save_png(self, path: str | Path) -> Path:
        # the slice logic replaces its output pipeline when layers change: connect the current one
        connection = self.logic.GetImageDataConnection()
        if connection is not None:
            self.mapper.SetInputConnection(connection)
        return _save_png(self.window, path)

    def close(self) -> None:
        self.dm_group.SetMRMLDisplayableNode(None)
        self.window.Finalize()


class OffscreenThreeDView:
    """A 3D view: Slicer's view logic + 3D displayable managers."""

    MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                "vtkMRMLModelDisplayableManager", "vtkMRMLThreeDReformatDisplayableManager",
                "vtkMRMLOrientationMarkerDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D",
                "vtkMRMLColorLegendDisplayableManager")

    def __init__(self, app: HeadlessSlicer, size: int) -> None:
        self.window, self.interactor = _render_window(size, 1)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        for dm in self.MANAGERS:
            if not factory.IsDisplayableManagerRegistered(dm):
                factory.RegisterDisplayableManager(dm)
        self.dm_group = factory.InstantiateDisplayableManagers(self.renderer)
        self.logic = slicer.vtkMRMLViewLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        app.app_logic.GetViewLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(app.scene)
        self.node = self.logic.AddViewNode("1")
        self.dm_group.SetMRMLDisplayableNode(self.node)

    def reset_camera(self, elevation: float = 25.0, azimuth: float = 0.0) -> None:
        self.window.Render()
        self.renderer.ResetCamera()
        camera = self.renderer.GetActiveCamera()
        camera.Elevation(elevation)
        camera.Azimuth(azimuth)
        camera.OrthogonalizeViewUp()
        self.renderer.ResetCamera()
        camera.Zoom(1.3)

    def save_png(self, path: str | Path) -> Path:
        return _save_png(self.window, path)

    def close(self) -> None:
        self.dm_group.SetMRMLDisplayableNode(None)
        self.window.Finalize()


# ----- a small synthetic PET/CT case ---------------------------------------------------------------------------
#: Station centres of the synthetic case, LPS millimetres relative to the volume centre (+x = patient left,
#: +y = posterior, +z = superior).
SYNTHETIC_CENTRES: dict[str, tuple[float, float, float]] = {
    "1L": (18, 5, 50), "1R": (-18, 5, 50), "2L": (16, 8, 36), "2R": (-16, 8, 36), "3A": (0, -30, 30),
    "3P": (0, 24, 30), "4L": (16, 2, 18), "4R": (-18, 2, 18), "5": (30, -6, 6), "6": (18, -24, 14),
    "7": (0, 12, -6), "8": (8, 26, -24), "9": (-26, 30, -36), "10L": (40, 8, -2), "10R": (-40, 8, -2),
    "11L": (52, 14, -18), "11R": (-52, 14, -18),
}
SYNTHETIC_PROBABILITIES: dict[str, float] = {
    "1L": 0.05, "1R": 0.08, "2L": 0.12, "2R": 0.30, "3A": 0.04, "3P": 0.06, "4L": 0.20, "4R": 0.92, "5": 0.10,
    "6": 0.03, "7": 0.58, "8": 0.07, "9": 0.02, "10L": 0.66, "10R": 0.35, "11L": 0.09, "11R": 0.15,
}


@dataclass
class SyntheticCase:
    ct: object  # sitk.Image, HU
    pet: object  # sitk.Image, SUV
    stations: object  # sitk.Image, labels 1..17
    result: object  # CaseResult
    centres_lps: dict[str, tuple[float, float, float]]


def synthetic_case(size: tuple[int, int, int] = (64, 56, 40), spacing: float = 3.0, side: str = "R",
                   missing: tuple[str, ...] = ("9",)) -> SyntheticCase:
    """A tiny thorax: body, lungs, trachea, spine; 17 spherical stations (``missing`` left out); hot 4R and 7."""
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.staging.result import make_case_result
    from LymphNodeStagingLib.staging.stations import parse_station

    nx, ny, nz = size
    origin = (-(nx - 1) * spacing / 2, -(ny - 1) * spacing / 2, -(nz - 1) * spacing / 2)
    z, y, x = np.meshgrid(*(np.arange(n) * spacing + o for n, o in zip((nz, ny, nx), origin[::-1], strict=True)),
                          indexing="ij")
    ct = np.full(x.shape, -1000.0, dtype=np.float32)
    body = (x / 92) ** 2 + (y / 76) ** 2 <= 1
    ct[body] = 40.0
    for cx in (-48.0, 48.0):
        ct[((x - cx) / 36) ** 2 + ((y - 4) / 52) ** 2 <= 1] = -820.0
    ct[(x ** 2 + (y - 4) ** 2 <= 7 ** 2) & (z > -4)] = -950.0  # trachea
    ct[x ** 2 + (y - 52) ** 2 <= 12 ** 2] = 500.0  # vertebra
    pet = np.where(body, 1.2, 0.0).astype(np.float32)
    pet[ct < -700] = 0.3  # lungs and airway
    labels = np.zeros(x.shape, dtype=np.uint8)
    centres = {}
    for name, (cx, cy, cz) in SYNTHETIC_CENTRES.items():
        if name in missing:
            continue
        sphere = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 7.0 ** 2
        labels[sphere] = parse_station(name).label
        ct[sphere] = 35.0
        centres[name] = (float(cx), float(cy), float(cz))
    pet += 8.0 * np.exp(-((x + 18) ** 2 + (y - 2) ** 2 + (z - 18) ** 2) / (2 * 4.0 ** 2))  # 4R
    pet += 3.0 * np.exp(-((x ** 2 + (y - 12) ** 2 + (z + 6) ** 2) / (2 * 4.0 ** 2)))  # 7

    def image(arr):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        img.SetOrigin(origin)
        return img

    probs = {k: (v if k in centres else None) for k, v in SYNTHETIC_PROBABILITIES.items()}
    suv_max = {k: float(pet[labels == parse_station(k).label].max()) for k in centres}
    result = make_case_result("synthetic-001", side, probs, suv_max=suv_max,
                              suv_peak={k: 0.8 * v for k, v in suv_max.items()},
                              agreement={k: 0.8 for k in centres}, centre_mm=centres)
    return SyntheticCase(image(ct), image(pet), image(labels), result, centres)


def read_png(path: str | Path):
    """A PNG as an (height, width, 3) int array, row 0 at the top of the picture."""
    from vtk.util import numpy_support

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    img = reader.GetOutput()
    w, h, _ = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
    return arr[::-1, :, :3].astype(int)
