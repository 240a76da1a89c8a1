"""Small synthetic thorax label maps made of ellipsoids and tubes, for the registration, fusion and mapping tests.

The shapes use TotalSegmentator 'total' ids (and the phantom's extra ids >= 200); the station map places a few
catalogue stations next to the structures that define them. A smooth deformation plus an affine turns one body into
another, so a registration can be checked against the known truth.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

SPACING = (2.0, 2.0, 4.0)
SIZE = (80, 70, 50)  # x, y, z voxels: 160 x 140 x 200 mm


def _grid(size=SIZE, spacing=SPACING):
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1], strict=True)], indexing="ij")
    return x, y, z


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _tube(x, y, z, cx, cy, r, z0, z1):
    return ((x - cx) ** 2 + (y - cy) ** 2 <= r ** 2) & (z >= z0) & (z <= z1)


def body(warp=None, size=SIZE, spacing=SPACING) -> tuple[sitk.Image, sitk.Image]:
    """(anatomy, stations) label maps; warp(x, y, z) -> (x', y', z') deforms the coordinates of the shapes."""
    x, y, z = _grid(size, spacing)
    if warp is not None:
        x, y, z = warp(x, y, z)
    anat = np.zeros(x.shape, np.uint8)
    st = np.zeros(x.shape, np.uint8)
    cx = 80.0
    anat[_ellipsoid(x, y, z, (cx - 45, 70, 110), (32, 45, 85))] = 10  # lung left-lower (patient's right is -x)
    anat[_ellipsoid(x, y, z, (cx + 45, 70, 110), (32, 45, 85))] = 12
    for k, zc in enumerate(np.arange(20, 200, 16)):
        anat[_ellipsoid(x, y, z, (cx, 115, zc), (11, 11, 6.5))] = 32 + min(k, 11)  # vertebrae
    anat[_tube(x, y, z, cx, 75, 8, 110, 200)] = 16  # trachea
    anat[_tube(x, y, z, cx + 3, 98, 6, 20, 200)] = 15  # esophagus
    anat[_tube(x, y, z, cx + 25, 100, 10, 20, 120)] = 52  # descending aorta
    anat[_tube(x, y, z, cx - 12, 45, 12, 60, 120)] = 52  # ascending aorta
    anat[_ellipsoid(x, y, z, (cx + 6, 70, 125), (28, 28, 10)) & ~_ellipsoid(x, y, z, (cx + 6, 70, 125), (16, 16, 20))
         & (y > 50) & (y < 100)] = 52  # arch
    anat[_ellipsoid(x, y, z, (cx, 45, 45), (40, 32, 32))] = 51  # heart
    anat[_tube(x, y, z, cx, 15, 7, 50, 160)] = 116  # sternum
    anat[_ellipsoid(x, y, z, (cx + 10, 55, 95), (20, 10, 8))] = 200  # pulmonary artery
    anat[_tube(x, y, z, cx - 25, 55, 7, 100, 170)] = 62  # svc
    st[_ellipsoid(x, y, z, (cx - 14, 78, 150), (6, 10, 16)) & (anat == 0)] = 8  # 4R
    st[_ellipsoid(x, y, z, (cx + 14, 78, 150), (6, 10, 16)) & (anat == 0)] = 7  # 4L
    st[_ellipsoid(x, y, z, (cx, 85, 92), (12, 9, 10)) & (anat == 0)] = 11  # 7
    st[_ellipsoid(x, y, z, (cx + 16, 45, 112), (9, 8, 8)) & (anat == 0)] = 9  # 5
    st[_ellipsoid(x, y, z, (cx - 12, 25, 140), (12, 8, 14)) & (anat == 0)] = 5  # 3A
    return _image(anat, spacing), _image(st, spacing)


def _image(a, spacing, origin=(-80.0, -70.0, -100.0)):
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def smooth_warp(amplitude_mm: float = 6.0, scale: float = 1.0, shift=(0.0, 0.0, 0.0), seed: int = 0):
    """A smooth sinusoidal deformation plus an isotropic scale and a shift (all known)."""
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * np.pi, 3)

    def warp(x, y, z):
        cx, cy, cz = 80.0, 70.0, 100.0
        dx = amplitude_mm * np.sin(z / 45.0 + ph[0])
        dy = amplitude_mm * np.sin(x / 40.0 + ph[1])
        dz = amplitude_mm * np.sin(y / 35.0 + ph[2])
        return (cx + (x - cx) * scale + dx + shift[0], cy + (y - cy) * scale + dy + shift[1],
                cz + (z - cz) * scale + dz + shift[2])

    return warp


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0
