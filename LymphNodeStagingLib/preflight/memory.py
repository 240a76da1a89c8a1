"""The memory one assessment needs, estimated from the image grids before anything large is allocated, and refused
above ``$LNSTAGING_MAX_MEMORY_GB`` (default 16 GB) with the estimate and its parts.

The estimate is a sum of measured terms (peak resident memory of ``lnstaging assess`` under ``/usr/bin/time -v``
and per step, on phantoms of different sizes, atlas sets of different sizes and a phantom stretched in space):

* ``BASE_MB``: the interpreter with torch, SimpleITK and the network;
* ``CT_BYTES`` per CT voxel: the CT in float32, the anatomy label map while it is read, the fused station map and
  the overview;
* ``PET_BYTES`` per PET voxel: the PET in float32 and one copy;
* ``ATLAS_BYTES`` per voxel of every atlas: the atlas images kept in memory and their prepared registration data;
* ``REGISTRATION_BYTES`` per atlas and per voxel of the registration box on the finest registration level (4 mm):
  the batched warped occupancy channels, differences, forces and fields. The box is that of the anatomy's
  registration structures plus 10 mm when an anatomy label map is known, else the CT's extent cut to
  ``THORAX_MAX_MM`` per axis.

The coefficients are a least-squares fit, rounded up, to seven runs (CT of 0.47 to 30 million voxels, PET of 0.04
to 5.8 million, atlas sets of 2.3 and 75 million voxels, registration boxes of 0.15 to 1 million voxels; peaks of
0.87 to 2.4 GB); the estimate was within -8 % and +11 % of every measured peak (the full-size phantom with the
synthetic demo atlas set: 1.83 GB measured, 1.86 GB with these checks, 1.93 GB estimated). TotalSegmentator runs in
its own process and is not counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..paths import ENV_MAX_MEMORY, default_atlas_set_path, max_memory_gb

BASE_MB = 540.0
CT_BYTES = 20.0
PET_BYTES = 8.0
ATLAS_BYTES = 10.0
REGISTRATION_BYTES = 380.0
#: The registration level the estimate counts (the finest default level) and the margin around the structures, mm.
REGISTRATION_MM = 4.0
THORAX_MARGIN_MM = 10.0
#: Without an anatomy label map, the registration box is the CT's extent cut to this many mm per axis.
THORAX_MAX_MM = 450.0
#: Without a readable atlas set, this many atlases of the CT's size are assumed (the synthetic demo set has 5).
ASSUMED_ATLASES = 5

MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size (x, y, z) and spacing in mm."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]

    @classmethod
    def of(cls, image) -> Grid:
        """The grid of a SimpleITK image or of anything with ``size`` and ``spacing`` (an image header)."""
        if isinstance(image, sitk.Image):
            return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()))
        return cls(tuple(int(s) for s in image.size), tuple(float(s) for s in image.spacing))

    @property
    def voxels(self) -> int:
        return int(np.prod(np.asarray(self.size, dtype=np.float64)))

    @property
    def extent_mm(self) -> np.ndarray:
        return np.asarray(self.size, dtype=np.float64) * np.asarray(self.spacing, dtype=np.float64)


@dataclass
class MemoryEstimate:
    """The estimated peak memory of one assessment, its parts (MB) and the limit it is held against (GB)."""

    parts_mb: dict[str, float]
    limit_gb: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return sum(self.parts_mb.values()) / 1024.0

    @property
    def over(self) -> bool:
        return self.total_gb > self.limit_gb

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.parts_mb.items() if v >= 1.0)
        return f"about {self.total_gb:.1f} GB ({parts})"

    def to_dict(self) -> dict:
        return {"total_gb": round(self.total_gb, 3), "limit_gb": self.limit_gb,
                "parts_mb": {k: round(v, 1) for k, v in self.parts_mb.items()}, "notes": list(self.notes)}


def _size(mb: float) -> str:
    return f"{mb / 1024.0:.1f} GB" if mb >= 1024.0 else f"{mb:.0f} MB"


def registration_box_mm(ct: Grid, anatomy: sitk.Image | None = None) -> np.ndarray:
    """Extent (x, y, z, mm) of the box the registration works in: the anatomy's registration structures plus
    THORAX_MARGIN_MM (clipped to the anatomy's extent), else the CT's extent cut to THORAX_MAX_MM per axis."""
    if anatomy is None:
        return np.minimum(ct.extent_mm, THORAX_MAX_MM)
    from ..mapping.registration import DEFAULT_STRUCTURES, bbox_of, structure_lut

    labels = sitk.GetArrayViewFromImage(anatomy)
    if labels.dtype.kind not in "iu":
        labels = np.rint(labels).astype(np.int64)
    top = int(labels.max()) if labels.size else 0
    lut = structure_lut(DEFAULT_STRUCTURES, max(top + 1, 1))
    used = lut[np.clip(labels, 0, len(lut) - 1)] > 0
    box = bbox_of(used)
    grid = Grid.of(anatomy)
    if box is None:
        return np.minimum(grid.extent_mm, THORAX_MAX_MM)
    lo, hi = box
    extent = (np.asarray(hi) - np.asarray(lo)) * np.asarray(grid.spacing) + 2 * THORAX_MARGIN_MM
    return np.minimum(extent, grid.extent_mm)


def atlas_voxels(atlases) -> tuple[int, int] | None:
    """(number of atlases, voxels of all their images' grid) of an atlas set, a folder or None (the default set),
    from the image headers; None when the set cannot be read (the mapping step then says why)."""
    try:
        from ..mapping.atlas import AtlasSet

        if isinstance(atlases, AtlasSet):
            paths = [a.ct_path for a in atlases.atlases]
        else:
            root = Path(atlases) if atlases not in (None, "") else default_atlas_set_path()
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
            paths = [root / entry["ct"] for entry in manifest["atlases"]]
        total = 0
        for path in paths:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            total += int(np.prod(np.asarray(reader.GetSize(), dtype=np.float64)))
        return len(paths), total
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def estimate_memory(ct, pet=None, *, anatomy: sitk.Image | None = None, atlases=None,
                    atlas_count_voxels: tuple[int, int] | None = None, limit_gb: float | None = None
                    ) -> MemoryEstimate:
    """Peak memory of one assessment of a CT and PET grid (images or headers) with an atlas set (see the module)."""
    ct_grid = Grid.of(ct)
    notes: list[str] = []
    counted = atlas_count_voxels if atlas_count_voxels is not None else atlas_voxels(atlases)
    if counted is None:
        counted = (ASSUMED_ATLASES, ASSUMED_ATLASES * ct_grid.voxels)
        notes.append(f"atlas set not readable: {ASSUMED_ATLASES} atlases of the CT's size assumed")
    n_atlases, atlas_total = counted
    box = registration_box_mm(ct_grid, anatomy)
    reg_voxels = float(np.prod(np.floor(box / REGISTRATION_MM) + 1))
    if anatomy is None:
        notes.append(f"registration box from the CT's extent (at most {THORAX_MAX_MM:g} mm per axis)")
    parts = {
        "base": BASE_MB,
        "CT": CT_BYTES * ct_grid.voxels / MB,
        "PET": PET_BYTES * (Grid.of(pet).voxels if pet is not None else 0) / MB,
        "atlases": ATLAS_BYTES * atlas_total / MB,
        "registration": REGISTRATION_BYTES * max(n_atlases, 1) * reg_voxels / MB,
    }
    return MemoryEstimate(parts, max_memory_gb() if limit_gb is None else float(limit_gb), notes)


def check_memory(estimate: MemoryEstimate, what: str, grids: Sequence[str] = ()) -> MemoryEstimate:
    """Refuse a case whose estimate is over the limit, with the estimate, its parts and what to do."""
    if estimate.over:
        detail = f" ({'; '.join(grids)})" if grids else ""
        raise InputError(f"{what}: the assessment would need {estimate.describe()} of memory, more than the limit of "
                         f"{estimate.limit_gb:g} GB{detail}; check the voxel spacing and size in the header, or raise "
                         f"the limit with ${ENV_MAX_MEMORY}")
    return estimate
