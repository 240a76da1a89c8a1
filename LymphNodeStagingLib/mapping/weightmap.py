"""Station weight maps (Eq. 1 of Engelson et al.), centroids and weighted sampling of patch centres.

For station l with mask M_l (the fused map) and centroid c_l (physical mm, true spacing):

    w_l(x) = p_l(x) * (1 - d(x) / D_l)   for x in M_l,   0 elsewhere,

with d(x) = |x - c_l| in mm (float, never truncated), D_l = max over M_l of d + the smallest voxel spacing (so every
voxel of the mask, the farthest included, keeps a positive weight and the voxel at the centroid has weight ~1), and
p_l the atlas vote fraction (1 when no votes are given). The maximum of w_l is the inference centre: the mask voxel
nearest the centroid (the centroid itself when it lies inside the mask).

Weight maps are stored sparsely (flat voxel indices and weights of the mask) and sampled with a numpy Generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .registration import Geometry


@dataclass
class WeightMap:
    """Sparse weight map of one station on a grid."""

    label: int
    geometry: Geometry
    indices: np.ndarray  # flat indices into the (z, y, x) array of the grid
    weights: np.ndarray  # float32, > 0
    centroid_mm: np.ndarray  # (3,) world LPS, mean of the mask voxel centres
    centre_mm: np.ndarray  # (3,) world LPS, the voxel of maximal weight

    @property
    def station(self) -> str:
        return STATION_NAMES[self.label - 1]

    def dense(self) -> np.ndarray:
        out = np.zeros(self.geometry.shape[::-1], np.float32)
        out.reshape(-1)[self.indices] = self.weights
        return out

    def image(self) -> sitk.Image:
        return self.geometry.image(self.dense())

    def value_at(self, points_mm: np.ndarray) -> np.ndarray:
        """Weight at the voxels containing world points (P, 3); 0 outside the grid or the mask."""
        flat = _flat_index(self.geometry, np.atleast_2d(points_mm))
        pos = np.clip(np.searchsorted(self.indices, flat), 0, len(self.indices) - 1)  # indices are sorted
        hit = (flat >= 0) & (self.indices[pos] == flat)
        return np.where(hit, self.weights[pos], 0.0).astype(np.float32)


def _index_to_world(geom: Geometry, idx_xyz: np.ndarray) -> np.ndarray:
    return idx_xyz @ (geom.direction @ np.diag(geom.spacing)).T + geom.origin


def _flat_index(geom: Geometry, points_mm: np.ndarray) -> np.ndarray:
    """Flat (z, y, x) index of the voxel containing each point, -1 outside the grid."""
    idx = np.rint((points_mm - geom.origin) @ np.linalg.inv(geom.direction @ np.diag(geom.spacing)).T).astype(int)
    shape = np.asarray(geom.shape)
    inside = ((idx >= 0) & (idx < shape)).all(1)
    flat = idx[:, 2] * shape[1] * shape[0] + idx[:, 1] * shape[0] + idx[:, 0]
    return np.where(inside, flat, -1)


def weight_map(mask: np.ndarray, geom: Geometry, label: int = 0, votes: np.ndarray | None = None) -> WeightMap:
    """Eq. 1 weight map of a boolean (z, y, x) mask; votes: optional vote fraction (z, y, x) in [0, 1]."""
    return _weight_map_at(np.flatnonzero(np.asarray(mask).ravel()), geom, label,
                          None if votes is None else np.asarray(votes).ravel())


def _weight_map_at(flat: np.ndarray, geom: Geometry, label: int, votes: np.ndarray | None,
                   indexed: bool = False) -> WeightMap:
    """Eq. 1 weight map of the mask given by its sorted flat voxel indices; votes: vote fractions of the whole
    flattened grid, or of the mask's voxels only (indexed), or None."""
    if flat.size == 0:
        name = STATION_NAMES[label - 1] if 1 <= label <= NUM_STATIONS else str(label)
        raise InputError(f"station {name} has no voxel in the label map: no weight map or centroid")
    nx, ny = geom.shape[0], geom.shape[1]
    idx = np.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], 1).astype(float)
    pts = _index_to_world(geom, idx)
    centroid = pts.mean(0)
    d = np.linalg.norm(pts - centroid, axis=1)
    w = 1.0 - d / (d.max() + float(np.min(geom.spacing)))
    if votes is not None:
        w = w * np.asarray(votes if indexed else votes[flat], np.float32)
    keep = w > 0
    if not keep.any():
        raise InputError(f"station label {label}: all weights are zero (vote fractions are zero on its mask)")
    flat, w, pts = flat[keep], w[keep].astype(np.float32), pts[keep]
    return WeightMap(label, geom, flat, w, centroid, pts[int(np.argmax(w))])


def station_weight_maps(labels: np.ndarray, geom: Geometry, votes: np.ndarray | None = None,
                        vote_scale: float = 1.0) -> dict[str, WeightMap]:
    """Weight maps of every station present in a fused (z, y, x) label map; votes: (17, z, y, x) fractions, or
    vote counts with vote_scale = 1 / number of atlases."""
    out: dict[str, WeightMap] = {}
    flat = np.flatnonzero(labels.ravel())
    labs = labels.ravel()[flat].astype(np.int64)
    order = np.argsort(labs, kind="stable")  # flat indices stay sorted within each label
    counts = np.bincount(labs, minlength=NUM_STATIONS + 1)
    ends = np.cumsum(counts)
    for lab in range(1, NUM_STATIONS + 1):
        if counts[lab] == 0:
            continue
        idx = flat[order[ends[lab] - counts[lab]:ends[lab]]]
        v = None if votes is None else votes[lab - 1].reshape(-1)[idx].astype(np.float32) * np.float32(vote_scale)
        out[STATION_NAMES[lab - 1]] = _weight_map_at(idx, geom, lab, v, indexed=True)
    return out


def assign_points(points_mm: np.ndarray, maps: dict[str, WeightMap] | Sequence[WeightMap]) -> list[str | None]:
    """The station with the highest weight at each world point (None where every weight is zero)."""
    maps = list(maps.values()) if isinstance(maps, dict) else list(maps)
    pts = np.atleast_2d(np.asarray(points_mm, float))
    if not maps:
        return [None] * len(pts)
    values = np.stack([m.value_at(pts) for m in maps])  # (S, P)
    best = values.argmax(0)
    return [maps[b].station if values[b, i] > 0 else None for i, b in enumerate(best)]
