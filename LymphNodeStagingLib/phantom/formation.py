"""Image formation: CT in HU from the material map, PET in SUV from an activity map blurred by the scanner's point
spread, sampled on its own coarser grid (same frame of reference) with count-dependent noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Canvas, Grid
from .materials import MATERIAL_HU
from .materials import Material as M


@dataclass
class Physiology:
    """Per-patient background uptake (SUV) of the organs that confound station SUVmax."""

    blood_pool: float
    myocardium: float
    esophagus: float
    liver: float

    @staticmethod
    def sample(rng: np.random.Generator, physiological: bool = True) -> Physiology:
        blood = float(rng.uniform(1.5, 2.0))
        myo = float(rng.uniform(1.0, 2.5)) if rng.random() < 0.4 else float(np.clip(rng.lognormal(np.log(5.0), 0.4), 2.5, 10))
        eso = float(rng.uniform(1.3, 2.8))
        liver = float(rng.uniform(1.9, 2.6))
        if not physiological:
            blood, myo, eso = 1.0, 1.0, 1.0
        return Physiology(round(blood, 3), round(myo, 3), round(eso, 3), round(liver, 3))


def suv_table(ph: Physiology) -> np.ndarray:
    """Default SUV of each material (nodes and tumour are set per instance)."""
    t = np.zeros(M.COUNT, np.float32)
    t[M.FAT] = 0.35
    t[M.MUSCLE] = 0.7
    t[M.LUNG] = 0.45
    t[M.AIR] = 0.0
    t[M.AIRWAY_WALL] = 0.8
    t[M.BLOOD] = ph.blood_pool
    t[M.MYOCARDIUM] = ph.myocardium
    t[M.ESOPHAGUS] = ph.esophagus
    t[M.BONE_MARROW] = 1.3
    t[M.BONE_CORTEX] = 0.4
    t[M.CARTILAGE] = 0.5
    t[M.LIVER] = ph.liver
    t[M.SPLEEN] = 0.85 * ph.liver
    t[M.STOMACH] = 1.6
    t[M.CORD] = 1.3
    t[M.THYROID] = 1.4
    t[M.NODE] = 1.2
    t[M.NODE_CALCIFIED] = 1.2
    t[M.TUMOUR] = 8.0
    t[M.SOFT] = 0.8
    return t


def make_ct(canvas: Canvas, rng: np.random.Generator, noise_hu: float) -> sitk.Image:
    """CT (int16 HU): material values, lung density gradient, slight blur (scanner resolution), Gaussian noise."""
    mat = canvas.material
    hu = np.asarray(MATERIAL_HU, np.float32)[mat]
    lung = mat == M.LUNG
    # dependent lung density: denser posteriorly (cy in canonical mm)
    grad = np.clip((canvas.cy + 60.0) / 180.0, 0, 1) * 90.0
    hu += np.where(lung, np.broadcast_to(grad, hu.shape), 0).astype(np.float32)
    img = canvas.grid.image(hu)
    img = sitk.SmoothingRecursiveGaussian(img, [0.5, 0.5, 0.8])
    arr = sitk.GetArrayFromImage(img)
    if noise_hu > 0:
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise_hu)
    arr = np.clip(np.rint(arr), -1024, 3071).astype(np.int16)
    out = canvas.grid.image(arr)
    return out


def activity_map(canvas: Canvas, ph: Physiology, nodes_map: np.ndarray, node_suv: dict[int, float],
                 tumour_box=None, tumour_uptake=None) -> np.ndarray:
    """True SUV on the CT grid (before blur)."""
    act = suv_table(ph)[canvas.material]
    if node_suv:
        objs = ndimage.find_objects(nodes_map)
        for nid, suv in node_suv.items():
            if nid - 1 < len(objs) and objs[nid - 1] is not None:
                sl = objs[nid - 1]
                act[sl][nodes_map[sl] == nid] = suv
    if tumour_box is not None and tumour_uptake is not None:
        sub = act[tumour_box]
        np.copyto(sub, tumour_uptake, where=tumour_uptake > 0)
    return act


def pet_grid_for(ct_grid: Grid, spacing: tuple[float, float, float], rng: np.random.Generator) -> Grid:
    """A PET grid covering the CT field of view, with its own spacing and a random sub-voxel origin shift."""
    lo = np.asarray(ct_grid.origin) - 0.5 * np.asarray(ct_grid.spacing)
    hi = lo + np.asarray(ct_grid.size) * np.asarray(ct_grid.spacing)
    sp = np.asarray(spacing, float)
    shift = rng.uniform(0.1, 0.9, 3) * sp
    origin = lo - shift + 0.5 * sp
    size = np.ceil((hi - origin + 0.5 * sp) / sp).astype(int)
    return Grid(tuple(int(v) for v in size), tuple(float(v) for v in sp), tuple(float(v) for v in origin))


def make_pet(act: np.ndarray, ct_grid: Grid, pet_grid: Grid, rng: np.random.Generator, fwhm_mm: float = 6.0,
             noise: bool = True, noise_level: float = 0.022) -> sitk.Image:
    """PET SUV image: Gaussian PSF (plus voxel integration), resampled to the PET grid, count-dependent noise.

    noise_level is the variance per unit SUV in a 4 mm voxel (CoV about 10 % at SUV 2.2); it scales with the voxel
    volume.
    """
    sp = np.asarray(pet_grid.spacing)
    sigma = np.sqrt((fwhm_mm / 2.3548) ** 2 + sp**2 / 12.0)
    img = ct_grid.image(act.astype(np.float32))
    img = sitk.SmoothingRecursiveGaussian(img, [float(s) for s in sigma])
    ref = sitk.Image(list(pet_grid.size), sitk.sitkFloat32)
    ref.SetSpacing(pet_grid.spacing)
    ref.SetOrigin(pet_grid.origin)
    pet = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(pet)
    if noise:
        k = noise_level * (4.0**3 / float(np.prod(sp)))
        n = rng.standard_normal(arr.shape).astype(np.float32)
        n = ndimage.gaussian_filter(n, 0.7)
        n /= max(float(n.std()), 1e-6)
        arr = arr + np.sqrt(np.clip(arr, 0, None) * k).astype(np.float32) * n
    arr = np.clip(arr, 0, None).astype(np.float32)
    return pet_grid.image(arr)


def sample_image_max(img: sitk.Image, points: np.ndarray) -> float:
    """Maximum of an image sampled (trilinear) at physical points (N, 3)."""
    if len(points) == 0:
        return float("nan")
    arr = sitk.GetArrayViewFromImage(img)
    g = Grid.from_image(img)
    idx = g.index_of(points)[:, ::-1].T
    vals = ndimage.map_coordinates(arr, idx, order=1, mode="nearest")
    return float(vals.max())
