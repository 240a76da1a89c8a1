"""Node segmentation of one CT and the node instances with their measurements.

``segment_nodes``: the crop and working grid of ``nodes/data.py`` (the model's own settings), the network run over
the crop (S-Net slice by slice in batches; the U-Net by sliding windows with overlap, blended with Gaussian weights),
probabilities set to 0 outside the crop box, resampled linearly back onto the CT grid.

``detect_nodes``: ``segment_nodes`` + ``find_nodes`` at the model's threshold: instances with short and long axis,
volume, mean HU, the station they lie in (with a station map) and SUVmax / SUVmean / SUVpeak (with a PET in SUV).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..errors import InputError, UsageError
from ..mapping.crop import CropBox
from .data import ct_on_grid, node_crop, station_labels, working_grid
from .instances import NodeInstance, find_nodes
from .model import NodeModel, load_node_model


def _pad_to(shape: tuple[int, ...], multiple: int | tuple[int, ...], minimum: tuple[int, ...] | None = None
            ) -> tuple[int, ...]:
    mult = multiple if isinstance(multiple, tuple) else (multiple,) * len(shape)
    out = []
    for i, s in enumerate(shape):
        s = max(s, minimum[i]) if minimum is not None else s
        out.append(int(-(-s // mult[i]) * mult[i]))
    return tuple(out)


@torch.inference_mode()
def predict_snet(network: nn.Module, image: np.ndarray, batch_slices: int = 16) -> np.ndarray:
    """S-Net probabilities of a (z, y, x) image in 0..1, axial slice by slice (in batches), as float32 (z, y, x)."""
    device = next(network.parameters()).device
    z, h, w = image.shape
    ph, pw = _pad_to((h, w), 4)
    out = np.zeros(image.shape, dtype=np.float32)
    for start in range(0, z, batch_slices):
        block = np.zeros((min(batch_slices, z - start), 1, ph, pw), dtype=np.float32)
        block[:, 0, :h, :w] = image[start:start + block.shape[0]]
        logits = network(torch.from_numpy(block).to(device)).logits
        out[start:start + block.shape[0]] = torch.sigmoid(logits.float())[:, 0, :h, :w].cpu().numpy()
    return out


def _gaussian_weights(window: tuple[int, int, int]) -> np.ndarray:
    """Blending weights of one window: a separable Gaussian (sigma = 1/8 of the window) scaled to a maximum of 1,
    never below 1e-3 (so every voxel of a window counts)."""
    axes = []
    for n in window:
        x = np.arange(n) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / max(n / 8.0, 1e-3)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@torch.inference_mode()
def predict_unet(network: nn.Module, image: np.ndarray, window: tuple[int, int, int], overlap: float = 0.5,
                 divisor: int = 4) -> np.ndarray:
    """U-Net probabilities of a (z, y, x) image in 0..1 by sliding windows of ``window`` voxels with ``overlap``
    (0..0.9), blended with Gaussian weights; an image smaller than the window is padded with 0 (air)."""
    device = next(network.parameters()).device
    win = _pad_to(tuple(int(w) for w in window), divisor)
    shape = _pad_to(image.shape, divisor, win)
    padded = np.zeros(shape, dtype=np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    steps = [max(1, int(round(w * (1.0 - overlap)))) for w in win]
    weights = _gaussian_weights(win)
    acc = np.zeros(shape, dtype=np.float32)
    norm = np.zeros(shape, dtype=np.float32)
    for z0 in _starts(shape[0], win[0], steps[0]):
        for y0 in _starts(shape[1], win[1], steps[1]):
            for x0 in _starts(shape[2], win[2], steps[2]):
                sl = (slice(z0, z0 + win[0]), slice(y0, y0 + win[1]), slice(x0, x0 + win[2]))
                x = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None].to(device)
                p = torch.sigmoid(network(x).float())[0, 0].cpu().numpy()
                acc[sl] += p * weights
                norm[sl] += weights
    prob = acc / np.maximum(norm, 1e-12)
    return prob[: image.shape[0], : image.shape[1], : image.shape[2]]


def predict_volume(model: NodeModel, image: np.ndarray) -> np.ndarray:
    """Probabilities (z, y, x) of the model's network on a working-grid image."""
    network = model.network
    was_training = network.training
    network.eval()
    try:
        if model.arch == "snet":
            return predict_snet(network, image, model.inference.batch_slices)
        return predict_unet(network, image, model.inference.window, model.inference.overlap, model.config.divisor)
    finally:
        network.train(was_training)


@dataclass
class NodeSegmentation:
    """The node probability map on the CT grid, with the crop and working grid it came from and timings (s)."""

    probability: sitk.Image
    crop: CropBox
    grid: dict
    seconds: dict[str, float] = field(default_factory=dict)


def _as_model(model: NodeModel | str | Path, device: str) -> NodeModel:
    if isinstance(model, NodeModel):
        return model
    if isinstance(model, (str, Path)):
        return load_node_model(model, device=device)
    raise UsageError(f"model must be a NodeModel or a checkpoint path, got {type(model).__name__}")


def _check_ct(ct: sitk.Image) -> None:
    if not isinstance(ct, sitk.Image) or ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("ct must be a 3D scalar SimpleITK image (HU)")


def segment(ct: sitk.Image, model: NodeModel | str | Path, anatomy: sitk.Image | None = None,
            stations: sitk.Image | None = None, device: str = "cpu") -> NodeSegmentation:
    """:func:`segment_nodes` with the crop, the working grid and the timings."""
    _check_ct(ct)
    model = _as_model(model, device)
    if stations is not None:
        stations = station_labels(stations, "stations")
    t0 = time.perf_counter()
    box = node_crop(ct, anatomy, stations, model.data.margin_mm)
    grid = working_grid(box, model.data)
    image = ct_on_grid(ct, grid, model.data)
    t1 = time.perf_counter()
    prob = predict_volume(model, image)
    prob[~grid.inside(box)] = 0.0
    t2 = time.perf_counter()
    on_ct = sitk.Resample(grid.image(prob.astype(np.float32)), ct, sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    arr = np.clip(sitk.GetArrayFromImage(on_ct), 0.0, 1.0)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ct)
    t3 = time.perf_counter()
    return NodeSegmentation(out, box, {**grid.to_dict(), "shape_zyx": list(grid.shape)},
                            {"prepare": t1 - t0, "network": t2 - t1, "resample_back": t3 - t2})


def segment_nodes(ct: sitk.Image, model: NodeModel | str | Path, anatomy: sitk.Image | None = None,
                  stations: sitk.Image | None = None, device: str = "cpu") -> sitk.Image:
    """Node probability (float32, 0..1) on the CT grid; 0 outside the crop (station map, else anatomy, else the
    whole CT)."""
    return segment(ct, model, anatomy, stations, device).probability


@dataclass
class NodeDetection:
    """Node instances of one CT: the probability map and the instance map on the CT grid, the instances (id order),
    the threshold used, the crop and timings (s)."""

    probability: sitk.Image
    instances: sitk.Image
    nodes: list[NodeInstance]
    threshold: float
    min_volume_ml: float
    crop: CropBox
    grid: dict
    model: dict
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (no images)."""
        return {"nodes": [n.to_dict() for n in self.nodes], "n_nodes": len(self.nodes), "threshold": self.threshold,
                "min_volume_ml": self.min_volume_ml, "crop": self.crop.to_dict(), "working_grid": self.grid,
                "model": self.model, "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "warnings": list(self.warnings)}


def _region(ct: sitk.Image, box: CropBox, pad: int = 2) -> tuple[list[int], list[int]]:
    """Index and size of the CT voxels covering ``box`` (plus ``pad`` voxels), clipped to the CT."""
    corners = [ct.TransformPhysicalPointToContinuousIndex((float(x), float(y), float(z)))
               for x in (box.lower[0], box.upper[0]) for y in (box.lower[1], box.upper[1])
               for z in (box.lower[2], box.upper[2])]
    idx = np.asarray(corners)
    full = np.asarray(ct.GetSize())
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - pad, 0, full - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + pad + 1, lo + 1, full)
    return [int(v) for v in lo], [int(v) for v in hi - lo]


def instances_in_crop(prob: sitk.Image, ct: sitk.Image, crop: CropBox, pet: sitk.Image | None = None,
                      stations: sitk.Image | None = None, threshold: float = 0.5,
                      min_volume_ml: float = 0.0) -> tuple[sitk.Image, list[NodeInstance]]:
    """``find_nodes`` on the CT voxels of ``crop`` only (a probability map on the CT grid that is 0 outside the crop
    gives the same instances, faster); the instance map covers the whole CT grid."""
    index, size = _region(ct, crop)
    roi = sitk.RegionOfInterest(prob, size, index)
    inst_roi, nodes = find_nodes(roi, ct, pet=pet, stations=stations, threshold=threshold,
                                 min_volume_ml=min_volume_ml)
    arr = np.zeros(sitk.GetArrayViewFromImage(prob).shape, dtype=np.uint16)
    arr[index[2]:index[2] + size[2], index[1]:index[1] + size[1], index[0]:index[0] + size[0]] = \
        sitk.GetArrayFromImage(inst_roi)
    inst = sitk.GetImageFromArray(arr)
    inst.CopyInformation(prob)
    return inst, nodes


def detect_nodes(ct: sitk.Image, model: NodeModel | str | Path, pet: sitk.Image | None = None,
                 anatomy: sitk.Image | None = None, stations: sitk.Image | None = None,
                 threshold: float | None = None, min_volume_ml: float | None = None,
                 device: str = "cpu") -> NodeDetection:
    """Segment the nodes of ``ct`` and measure every instance (``find_nodes``, on the CT voxels of the crop: the
    probability is 0 elsewhere); ``threshold`` and ``min_volume_ml`` default to the model's. ``pet`` must hold
    SUV. The instance map covers the whole CT grid."""
    model = _as_model(model, device)
    if stations is not None:
        stations = station_labels(stations, "stations")
    thr = model.threshold if threshold is None else float(threshold)
    min_vol = model.min_volume_ml if min_volume_ml is None else float(min_volume_ml)
    seg = segment(ct, model, anatomy, stations, device)
    t0 = time.perf_counter()
    inst, nodes = instances_in_crop(seg.probability, ct, seg.crop, pet, stations, thr, min_vol)
    seconds = {**seg.seconds, "instances": time.perf_counter() - t0}
    warnings = []
    if seg.crop.source == "whole CT":
        warnings.append("no station map or anatomy given: the whole CT was searched (the model was trained on "
                        "mediastinal crops)")
    return NodeDetection(seg.probability, inst, nodes, thr, min_vol, seg.crop, seg.grid, model.info(), seconds,
                         warnings)
