"""The two baselines of the evaluation, computed inside the fused station map of each scan.

- SUVmax threshold: a station is positive when its SUVmax reaches t; t is chosen on the training patients of each
  fold from 2.5, 3.0, ..., 5.5 by station balanced accuracy; the N-stage follows from the rules.
- Lesion overlap (how the paper compared autoPET): every connected component of a lesion mask is assigned to the
  station holding the largest fraction of its voxels, if that fraction reaches o (chosen on the training patients
  from 0.05, 0.1, 0.2); a station is positive when a lesion is assigned to it. The score of a station (for the
  AUC) is the largest fraction of any lesion assigned to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..staging.stations import NUM_STATIONS

SUV_THRESHOLDS: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5)
OVERLAP_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.2)


@dataclass
class LesionOverlap:
    """Per lesion component: the station (0-based index, -1 none) holding most of it and that fraction."""

    station: np.ndarray  # (L,) int
    fraction: np.ndarray  # (L,) float in [0, 1]
    voxels: np.ndarray  # (L,) int

    def station_scores(self) -> np.ndarray:
        """(17,) largest fraction of a lesion assigned to each station (0 where none)."""
        score = np.zeros(NUM_STATIONS)
        for s, f in zip(self.station, self.fraction, strict=True):
            if s >= 0:
                score[s] = max(score[s], f)
        return score

    def positive(self, overlap: float) -> np.ndarray:
        """(17,) bool: a lesion assigned to the station with fraction >= overlap."""
        return self.station_scores() >= overlap if len(self.station) else np.zeros(NUM_STATIONS, bool)

    def to_dict(self) -> dict:
        return {"station": self.station.tolist(), "fraction": self.fraction.tolist(), "voxels": self.voxels.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> LesionOverlap:
        return cls(np.asarray(d["station"], int), np.asarray(d["fraction"], float), np.asarray(d["voxels"], int))


def lesion_overlap(lesion_mask: sitk.Image, station_map: sitk.Image) -> LesionOverlap:
    """Connected components (26-connectivity) of the mask (> 0) against the station map (nearest, onto the mask)."""
    if lesion_mask.GetDimension() != 3:
        raise InputError(f"lesion mask must be 3D, got {lesion_mask.GetDimension()}D")
    stations = sitk.Resample(station_map, lesion_mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             sitk.sitkUInt8)
    mask = sitk.GetArrayViewFromImage(lesion_mask) > 0
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    st = sitk.GetArrayViewFromImage(stations)
    station, fraction, voxels = [], [], []
    if n:
        comp = lab[mask]
        sval = st[mask].astype(np.int64)
        sizes = np.bincount(comp, minlength=n + 1)[1:]
        counts = np.zeros((n + 1, NUM_STATIONS + 1), np.int64)
        np.add.at(counts, (comp, np.clip(sval, 0, NUM_STATIONS)), 1)
        inside = counts[1:, 1:]
        best = inside.argmax(axis=1)
        frac = inside[np.arange(n), best] / np.maximum(sizes, 1)
        station = np.where(frac > 0, best, -1)
        fraction, voxels = frac, sizes
    return LesionOverlap(np.asarray(station, int), np.asarray(fraction, float), np.asarray(voxels, int))
