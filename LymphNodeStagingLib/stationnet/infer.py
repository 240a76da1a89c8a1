"""Station mapping by the network: the CT alone -> a StationMapping (the same structure the atlas registration
gives), so the classifier, node assignment and outputs take either.

The class probabilities of the working grid (background, 17 stations) are resampled (trilinear) onto a crop of the
CT grid around the predicted station region; a voxel is background where the region probability (1 - background)
is below the model's ``region_threshold``, else the station of the highest probability. In the StationMapping:

- ``votes`` hold each station's probability in steps of 1 / ``PROBABILITY_LEVELS`` and ``n_atlases`` is
  ``PROBABILITY_LEVELS``, so ``votes / n_atlases`` is the probability and the weight maps (Eq. 1) are weighted by
  it exactly as by an atlas vote fraction;
- ``agreement`` of a station is its mean probability over its voxels (the network's confidence);
- ``flags`` are "ok" or "absent"; ``method`` is "network", ``model`` names the checkpoint.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..mapping.fusion import ABSENT, OK
from ..mapping.registration import Geometry
from ..mapping.station_mapping import StationMapping
from ..mapping.weightmap import station_weight_maps
from ..nodes.data import WorkingGrid
from ..runtime import ProgressCallback, reporter
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .data import prepare_ct
from .model import StationModel
from .network import class_probabilities

#: Probability quantisation of the ``votes`` of a network mapping (``n_atlases`` of the StationMapping).
PROBABILITY_LEVELS = 100
#: Margin of the output crop around the predicted station region, mm.
OUTPUT_MARGIN_MM = 4.0


def predict_probabilities(model: StationModel, image: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(18, z, y, x) float32 class probabilities (background, 17 stations) of a prepared (z, y, x) image."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(device)
        return class_probabilities(model.network(x))[0].float().cpu().numpy()


def _output_geometry(ct: sitk.Image, grid: WorkingGrid, region: np.ndarray) -> Geometry:
    """The crop of the CT grid that covers the region (z, y, x bool on ``grid``) plus OUTPUT_MARGIN_MM."""
    full = Geometry.of(ct)
    idx = np.argwhere(region)
    lo_w = np.asarray(grid.origin) + idx.min(0)[::-1] * np.asarray(grid.spacing) - OUTPUT_MARGIN_MM
    hi_w = np.asarray(grid.origin) + idx.max(0)[::-1] * np.asarray(grid.spacing) + OUTPUT_MARGIN_MM
    corners = np.array([[x, y, z, 1.0] for x in (lo_w[0], hi_w[0]) for y in (lo_w[1], hi_w[1])
                        for z in (lo_w[2], hi_w[2])])
    ci = (corners @ full.world_to_index().T)[:, :3]
    lo = np.clip(np.floor(ci.min(0)).astype(int), 0, np.asarray(full.shape))
    hi = np.clip(np.ceil(ci.max(0)).astype(int) + 1, 0, np.asarray(full.shape))
    return full.crop(lo, hi)


def _resample_probabilities(probs: np.ndarray, grid: WorkingGrid, geom: Geometry, device: str) -> np.ndarray:
    """(18, z, y, x) probabilities of ``grid`` resampled (trilinear) onto ``geom``; outside: background."""
    pts = geom.points().reshape(-1, 3)
    size = np.asarray(grid.size, float)
    norm = 2.0 * (pts - np.asarray(grid.origin)) / np.asarray(grid.spacing) / np.maximum(size - 1, 1) - 1.0
    with torch.inference_mode():
        g = torch.as_tensor(norm, dtype=torch.float32, device=device).reshape(1, *geom.shape[::-1], 3)
        src = torch.from_numpy(probs).to(device)[None]
        out = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True)[0]
        inside = ((norm >= -1.0) & (norm <= 1.0)).all(1).reshape(geom.shape[::-1])
        out = out.cpu().numpy()
    out[:, ~inside] = 0.0
    out[0, ~inside] = 1.0
    return out


def map_stations_network(ct: sitk.Image, model: StationModel, device: str = "cpu",
                         progress: ProgressCallback | None = None, what: str = "CT",
                         region_threshold: float | None = None) -> StationMapping:
    """Map the 17 stations onto a CT with the station network (no anatomy); the output grid is a crop of the CT's.
    ``region_threshold``: instead of the model's."""
    threshold = model.region_threshold if region_threshold is None else float(region_threshold)
    report = reporter(progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report(0.05, "station network: lung crop")
    prepared = prepare_ct(ct, model.data, model.config.divisor)
    timings["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(0.3, "station network")
    probs = predict_probabilities(model, prepared.image, device)
    timings["network"] = time.perf_counter() - t0
    region = probs[0] <= 1.0 - threshold
    if not region.any():
        raise InputError(f"{what}: the station network found no mediastinal station region (is it a chest CT? "
                         f"lungs {'found' if prepared.lungs_found else 'not found'} by the HU threshold)")
    t0 = time.perf_counter()
    geom = _output_geometry(ct, prepared.grid, region)
    fine = _resample_probabilities(probs, prepared.grid, geom, device)
    labels = np.where(fine[0] > 1.0 - threshold, 0, np.argmax(fine[1:], axis=0) + 1).astype(np.uint8)
    votes = np.rint(np.clip(fine[1:], 0.0, 1.0) * PROBABILITY_LEVELS).astype(np.uint8)
    timings["resample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = np.bincount(labels.ravel(), minlength=NUM_STATIONS + 1)
    maps = station_weight_maps(labels, geom, votes, 1.0 / PROBABILITY_LEVELS)
    timings["weight_maps"] = time.perf_counter() - t0
    agreement, flags, voxels = {}, {}, {}
    for lab, name in enumerate(STATION_NAMES, 1):
        voxels[name] = int(counts[lab])
        flags[name] = OK if name in maps else ABSENT
        agreement[name] = float(fine[lab][labels == lab].mean()) if counts[lab] else float("nan")
    missing = [n for n in STATION_NAMES if n not in maps]
    warnings = [f"the station network found no voxel of station(s) {', '.join(missing)}"] if missing else []
    report(1.0, "station network done")
    return StationMapping(labels, votes, PROBABILITY_LEVELS, geom, agreement, flags, voxels, maps, [], {}, timings,
                          warnings=warnings, atlas_set={}, method="network", model=model.info())
