"""Small synthetic CT and PET images for the preflight tests, and corrupt copies of image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def ct_array(shape=(16, 32, 32)) -> np.ndarray:
    """A thorax-like CT in HU (z, y, x): air around an elliptic body of soft tissue with two lungs and a spine."""
    z, y, x = np.indices(shape, dtype=np.float32)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    arr = np.full(shape, -1000.0, np.float32)
    body = ((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.46 * shape[2])) ** 2 <= 1
    arr[body] = 40.0
    for side in (-1, 1):
        lung = ((y - cy) / (0.25 * shape[1])) ** 2 + ((x - cx - side * 0.2 * shape[2]) / (0.14 * shape[2])) ** 2 <= 1
        arr[lung] = -850.0
    arr[((y - cy - 0.3 * shape[1]) ** 2 + (x - cx) ** 2) <= 4] = 700.0
    return arr


def pet_array(shape=(8, 16, 16), seed: int = 0) -> np.ndarray:
    """An SUV image: background about 1 with a hot spot."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(1.0, 0.2, shape).astype(np.float32).clip(0, None)
    arr[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 8.0
    return arr


def image(arr: np.ndarray, spacing=(2.0, 2.0, 4.0), origin=(-32.0, -32.0, -32.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write(img: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(img, str(path), compress)
    return path


def ct_image(**kw) -> sitk.Image:
    return image(ct_array(), **kw)


def pet_image(**kw) -> sitk.Image:
    kw.setdefault("spacing", (4.0, 4.0, 8.0))
    return image(pet_array(), **kw)


def cut(source: Path, target: Path, fraction: float = 0.5) -> Path:
    """A copy of ``source`` cut after ``fraction`` of its bytes (an interrupted copy or download)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target
