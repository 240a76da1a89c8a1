"""Batched, patient-centric multi-atlas registration driven by anatomy label maps (torch, CPU or GPU).

All atlases are registered to one patient at once. Every transform maps patient points to atlas points ("pull"), so
atlas data lands on the patient grid without any inverse:

1. initialisation: a similarity transform fitted to the centroids of robust structures (vertebrae, trachea, aorta,
   heart, sternum, ...) found in both label maps;
2. affine: 12 parameters per atlas, Gauss-Newton (Levenberg-Marquardt) on the sum of squared differences of anatomy
   channels (partial-volume fractions of selected structures, one channel each) on a coarse grid over the thorax;
3. deformable: diffeomorphic demons. A stationary velocity field per atlas (exponentiated by scaling and squaring)
   is updated by the normalised multi-channel demons force, computed analytically from the warped channels' finite
   differences (no autograd), Gaussian-smoothed (fluid-like) and smoothed again (diffusion-like); multi-resolution
   on a crop around the atlases' stations, each level stopping when its loss stalls.

Label ids are never used as intensities: each structure is its own channel. Coordinates inside the registration are
the normalised coordinates [-1, 1]^3 of one physical box (the crop), the same at every resolution level, so fields
move between levels by plain interpolation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..runtime import ProgressCallback, reporter

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------------------------
# Anatomy channels (TotalSegmentator v2 'total' ids; ids >= 200 are the phantom's extra structures)

@dataclass(frozen=True)
class Structure:
    """One registration channel: a named union of anatomy label ids."""

    name: str
    ids: tuple[int, ...]


VERTEBRAE_T = {f"vertebrae_T{n}": 44 - n for n in range(1, 13)}  # T1 = 43 ... T12 = 32
DEFAULT_STRUCTURES: tuple[Structure, ...] = (
    Structure("trachea", (16,)),
    Structure("main_bronchi", (202, 203)),
    Structure("esophagus", (15,)),
    Structure("aorta", (52,)),
    Structure("heart", (51, 61)),
    Structure("pulmonary_artery", (200,)),
    Structure("superior_vena_cava", (62,)),
    Structure("brachiocephalic_vessels", (54, 55, 56, 57, 58, 59, 60)),
    Structure("azygos", (201,)),
    Structure("pulmonary_vein", (53,)),
    Structure("spine", tuple(range(32, 45))),
    Structure("sternum", (116,)),
    Structure("lung_left", (10, 11)),
    Structure("lung_right", (12, 13, 14)),
)
#: Structures whose centroids initialise the registration (each id on its own: single vertebrae are landmarks).
LANDMARK_IDS: tuple[int, ...] = (16, 15, 52, 51, 116, 200, 62, *range(32, 45))


@dataclass
class RegistrationConfig:
    """Parameters of the registration; the defaults are tuned for speed on a 2-core CPU (see the mapping benchmark)."""

    structures: tuple[Structure, ...] = DEFAULT_STRUCTURES
    levels_mm: tuple[float, ...] = (8.0, 4.0)  # grid spacing of the deformable levels, coarse to fine
    iterations: tuple[int, ...] = (15, 12)  # most demons iterations per level (fewer when the loss stalls)
    affine_mm: float = 12.0  # grid spacing of the affine stage (over the thorax)
    affine_iterations: int = 30  # most Gauss-Newton iterations of the affine stage
    affine_damping: float = 1e-3  # initial Levenberg-Marquardt damping (relative to the Hessian's diagonal)
    affine_tolerance: float = 1e-4  # stop when the largest affine update is below this (normalised units)
    channel_sigma: float = 0.5  # Gaussian smoothing of the occupancy channels, in level voxels
    fluid_sigma: float = 1.0  # Gaussian smoothing of each demons update, in level voxels
    smooth_sigma: float = 0.5  # Gaussian smoothing of the velocity field after each update, in level voxels
    step: float = 2.5  # demons step, in units of the normalised force (at most half a voxel)
    field_factor: int = 2  # velocity field spacing = level spacing * field_factor
    squarings: int = 4
    channel_margin_mm: float = 16.0  # each channel is matched in the box of its occupancy plus this margin
    tolerance: float = 2e-3  # a level stops when the loss fell by less than this fraction over `window` iterations
    window: int = 5
    crop_margin_mm: float = 25.0  # margin around the atlases' stations for the deformable crop
    thorax_margin_mm: float = 10.0
    threads: int | None = None  # torch threads (None: the machine's core count)

    def __post_init__(self) -> None:
        if len(self.levels_mm) != len(self.iterations) or not self.levels_mm:
            raise InputError(
                f"levels_mm {self.levels_mm} and iterations {self.iterations}: expected the same non-zero length")
        if any(s <= 0 for s in (*self.levels_mm, self.affine_mm)):
            raise InputError(f"levels_mm {self.levels_mm}, affine_mm {self.affine_mm}: expected positive "
                             "spacings in mm")
        if any(int(n) < 0 for n in self.iterations) or self.affine_iterations < 0:
            raise InputError(f"iterations {self.iterations}, affine_iterations {self.affine_iterations}: "
                             "expected non-negative counts")
        if self.step <= 0 or int(self.field_factor) < 1 or self.squarings < 0:
            raise InputError(f"step {self.step}, field_factor {self.field_factor}, squarings {self.squarings}: "
                             "expected step > 0, field_factor >= 1, squarings >= 0")
        if min(self.channel_sigma, self.fluid_sigma, self.smooth_sigma, self.channel_margin_mm) < 0:
            raise InputError("channel_sigma, fluid_sigma, smooth_sigma and channel_margin_mm must be >= 0")


# --------------------------------------------------------------------------------------------------------------------
# Geometry

@dataclass(frozen=True)
class Geometry:
    """A voxel grid in physical space (LPS mm). Index order (x, y, z); arrays are stored (z, y, x)."""

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray  # 3x3, columns = axis directions
    shape: tuple[int, int, int]  # (x, y, z)

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(np.array(image.GetOrigin(), float), np.array(image.GetSpacing(), float),
                   np.array(image.GetDirection(), float).reshape(3, 3), tuple(int(s) for s in image.GetSize()))

    def index_to_world(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def world_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world())

    def crop(self, lo: Sequence[int], hi: Sequence[int]) -> Geometry:
        """Sub-grid of index range [lo, hi) (x, y, z)."""
        lo = np.asarray(lo, int)
        origin = self.origin + self.direction @ (lo * self.spacing)
        return Geometry(origin, self.spacing.copy(), self.direction, tuple(int(v) for v in np.asarray(hi) - lo))

    def pooled(self, k: Sequence[int]) -> Geometry:
        """The grid of non-overlapping k-blocks (block centres), as made by avg_pool3d with stride k."""
        k = np.asarray(k, int)
        origin = self.origin + self.direction @ ((k - 1) / 2.0 * self.spacing)
        return Geometry(origin, self.spacing * k, self.direction, tuple(int(v) for v in np.asarray(self.shape) // k))

    def image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(tuple(self.origin))
        img.SetSpacing(tuple(self.spacing))
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    def points(self) -> np.ndarray:
        """World coordinates of all voxel centres, shape (z, y, x, 3)."""
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape[::-1]], indexing="ij")[::-1], -1)
        return idx.astype(float) @ (self.direction @ np.diag(self.spacing)).T + self.origin


@dataclass(frozen=True)
class Box:
    """A physical box aligned with a direction matrix: origin corner, edge lengths (x, y, z) in mm."""

    origin: np.ndarray
    size: np.ndarray
    direction: np.ndarray

    def norm_to_world(self) -> np.ndarray:
        """4x4 map from normalised coordinates [-1, 1]^3 (x, y, z) to world points."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.size / 2.0)
        m[:3, 3] = self.origin + self.direction @ (self.size / 2.0)
        return m

    def grid(self, spacing_mm: float) -> Geometry:
        """A grid whose first and last voxel centres lie on the box faces (align_corners), spacing close to given."""
        n = np.maximum(np.ceil(self.size / spacing_mm).astype(int) + 1, 2)
        return Geometry(self.origin.copy(), self.size / (n - 1), self.direction, tuple(int(v) for v in n))

    @classmethod
    def around(cls, points: np.ndarray, direction: np.ndarray, margin_mm: float) -> Box:
        """The box (in the frame of direction) around world points, grown by a margin."""
        local = points @ direction  # coordinates along the axes
        lo, hi = local.min(0) - margin_mm, local.max(0) + margin_mm
        return cls(direction @ lo, np.maximum(hi - lo, 1.0), direction)

    def intersect(self, geom: Geometry) -> Box:
        """This box clipped to the extent of a grid with the same direction."""
        lo_g = geom.origin @ geom.direction
        hi_g = lo_g + (np.asarray(geom.shape) - 1) * geom.spacing
        lo_b = self.origin @ self.direction
        lo, hi = np.maximum(lo_b, np.minimum(lo_g, hi_g)), np.minimum(lo_b + self.size, np.maximum(lo_g, hi_g))
        return Box(self.direction @ lo, np.maximum(hi - lo, 1.0), self.direction)


def _norm_matrix(geom: Geometry, padded_shape: Sequence[int]) -> np.ndarray:
    """4x4 map world -> normalised sample coordinates of a volume of geom padded (at the end) to padded_shape."""
    n = np.asarray(padded_shape, float)
    s = np.eye(4)
    s[:3, :3] = np.diag(2.0 / np.maximum(n - 1, 1))
    s[:3, 3] = -1.0
    return s @ geom.world_to_index()


# --------------------------------------------------------------------------------------------------------------------
# Label-map preparation (numpy)

def structure_lut(structures: Sequence[Structure], max_id: int = 256) -> np.ndarray:
    """Lookup table label id -> channel + 1 (0 = not used)."""
    lut = np.zeros(max(max_id, 1 + max((i for s in structures for i in s.ids), default=0)), np.uint8)
    for c, s in enumerate(structures):
        lut[list(s.ids)] = c + 1
    return lut


def centroids_mm(labels: np.ndarray, geom: Geometry, ids: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Centroid (world mm) of every label id present (or of the given ids), one bincount pass per axis."""
    flat = labels.ravel().astype(np.int64)
    counts = np.bincount(flat)
    present = [i for i in (ids if ids is not None else range(1, len(counts))) if 0 < i < len(counts) and counts[i]]
    if not present:
        return {}
    nz, ny, nx = labels.shape
    sums = []
    for axis_len, reps_inner, reps_outer in ((nx, 1, nz * ny), (ny, nx, nz), (nz, nx * ny, 1)):
        coord = np.tile(np.repeat(np.arange(axis_len, dtype=np.float64), reps_inner), reps_outer)
        sums.append(np.bincount(flat, weights=coord, minlength=len(counts)))
    idx = np.stack([s[present] / counts[present] for s in sums], 1)  # (n, 3) x, y, z
    world = idx @ (geom.direction @ np.diag(geom.spacing)).T + geom.origin
    return {i: world[k] for k, i in enumerate(present)}


def channel_voxels(labels: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (x, y, z) int32 (P, 3) and channel (0-based, P) of every voxel that belongs to a registration channel."""
    ch = lut[np.minimum(labels, len(lut) - 1)]
    flat = np.flatnonzero(ch)
    nz, ny, nx = labels.shape
    z, rest = np.divmod(flat, ny * nx)
    y, x = np.divmod(rest, nx)
    return np.stack([x, y, z], 1).astype(np.int32), ch.ravel()[flat].astype(np.int64) - 1


def occupancy(labels: np.ndarray, geom: Geometry, lut: np.ndarray, n_channels: int, spacing_mm: float,
              voxels: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, Geometry]:
    """Partial-volume fraction of each channel on blocks of about spacing_mm: (C, z, y, x) float32 and the grid
    (blocks start at index 0; an incomplete last block is left out). voxels: channel_voxels(labels, lut), if known.
    One bincount over the channel voxels, whatever the number of channels."""
    k = np.maximum(np.round(spacing_mm / geom.spacing).astype(int), 1)  # (x, y, z)
    nb = np.asarray(labels.shape)[::-1] // k  # blocks (x, y, z)
    idx, ch = voxels if voxels is not None else channel_voxels(labels, lut)
    b = idx // k.astype(np.int32)
    keep = (b < nb).all(1)
    key = ((b[keep, 2].astype(np.int64) * nb[1] + b[keep, 1]) * nb[0] + b[keep, 0]) * n_channels + ch[keep]
    counts = np.bincount(key, minlength=int(np.prod(nb)) * n_channels)
    out = counts.reshape(nb[2], nb[1], nb[0], n_channels).transpose(3, 0, 1, 2).astype(np.float32)
    out /= np.float32(np.prod(k))
    return np.ascontiguousarray(out), geom.pooled(k)


def bbox_of(labels: np.ndarray, margin_vox: Sequence[int] = (0, 0, 0)) -> tuple[np.ndarray, np.ndarray] | None:
    """Index bounding box [lo, hi) (x, y, z) of the non-zero voxels, grown by a margin and clipped."""
    nz = [np.flatnonzero(labels.any(axis=a)) for a in ((0, 1), (0, 2), (1, 2))]  # x, y, z
    if any(len(v) == 0 for v in nz):
        return None
    shape = np.asarray(labels.shape)[::-1]
    lo = np.maximum(np.array([v[0] for v in nz]) - margin_vox, 0)
    hi = np.minimum(np.array([v[-1] + 1 for v in nz]) + margin_vox, shape)
    return lo, hi


@dataclass
class PreparedAnatomy:
    """Registration-ready data of one label map: channel occupancy per level, landmarks, channel presence."""

    landmarks: dict[int, np.ndarray]
    present: np.ndarray  # (C,) bool
    levels: list[tuple[np.ndarray, Geometry]]  # per level: (C, z, y, x) occupancy and its grid
    extent_points: np.ndarray  # world corners of the bounding box of the channel structures
    affine_level: tuple[np.ndarray, Geometry] | None = None  # occupancy on the affine stage's grid
    cache: dict = field(default_factory=dict, repr=False)  # smoothed occupancies, keyed by (level, sigma)


def prepare_anatomy(anatomy: sitk.Image, config: RegistrationConfig) -> PreparedAnatomy:
    """Channel occupancies at every level spacing, landmark centroids and the presence of each channel."""
    labels = sitk.GetArrayViewFromImage(anatomy)
    if labels.dtype.kind not in "iu":
        labels = np.rint(labels).astype(np.int32)
    geom = Geometry.of(anatomy)
    lut = structure_lut(config.structures, int(labels.max()) + 1)
    used = lut[np.minimum(labels, len(lut) - 1)] > 0
    box = bbox_of(used, np.ceil(config.thorax_margin_mm / geom.spacing).astype(int))
    if box is None:
        names = ", ".join(s.name for s in config.structures)
        raise InputError(f"anatomy label map has none of the registration structures ({names})")
    lo, hi = box
    sub = np.ascontiguousarray(labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]])
    sub_geom = geom.crop(lo, hi)
    n = len(config.structures)
    present = np.zeros(n, bool)
    voxels = channel_voxels(sub, lut)
    present[np.unique(voxels[1])] = True
    levels = [occupancy(sub, sub_geom, lut, n, s, voxels) for s in config.levels_mm]
    corners = np.array([[x, y, z] for x in (0, sub_geom.shape[0] - 1) for y in (0, sub_geom.shape[1] - 1)
                        for z in (0, sub_geom.shape[2] - 1)], float)
    extent = corners @ (geom.direction @ np.diag(geom.spacing)).T + sub_geom.origin
    affine = occupancy(sub, sub_geom, lut, n, config.affine_mm, voxels)
    return PreparedAnatomy(centroids_mm(sub, sub_geom, LANDMARK_IDS), present, levels, extent, affine)


# --------------------------------------------------------------------------------------------------------------------
# Transforms

def fit_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity (rotation, isotropic scale, translation) with dst ~ T(src) (Umeyama); 4x4."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    cov = (b * w[:, None]).T @ a
    u, sv, vt = np.linalg.svd(cov)
    d = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[2, 2] = -1
    r = u @ d @ vt
    var = (w * (a ** 2).sum(1)).sum()
    scale = float(np.trace(np.diag(sv) @ d) / var) if var > 0 else 1.0
    scale = float(np.clip(scale, 0.7, 1.4))
    m = np.eye(4)
    m[:3, :3] = scale * r
    m[:3, 3] = mu_d - scale * r @ mu_s
    return m


def initial_transform(patient: dict[int, np.ndarray], atlas: dict[int, np.ndarray]) -> np.ndarray:
    """Patient -> atlas world transform from shared landmark centroids: similarity if >= 3 landmarks (not collinear),
    otherwise the translation of their mean."""
    common = [i for i in patient if i in atlas]
    if not common:
        raise InputError("patient and atlas anatomy share no landmark structure "
                         f"(expected some of the ids {list(LANDMARK_IDS)})")
    src = np.array([patient[i] for i in common])
    dst = np.array([atlas[i] for i in common])
    m = np.eye(4)
    m[:3, 3] = dst.mean(0) - src.mean(0)
    if len(common) >= 3:
        sv = np.linalg.svd(src - src.mean(0), compute_uv=False)
        if sv[1] > 5.0:  # not collinear (a spine alone is almost a line)
            m = fit_similarity(src, dst)
    return m


# --------------------------------------------------------------------------------------------------------------------
# Torch engine

def _torch():
    import torch

    return torch


def identity_grid(shape_zyx: Sequence[int], device) -> object:
    """Normalised coordinates (1, z, y, x, 3), last axis (x, y, z), align_corners=True convention."""
    torch = _torch()
    axes = [torch.linspace(-1, 1, n, device=device) for n in shape_zyx]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((xx, yy, zz), -1)[None]


def _smoothing_matrix(n: int, sigma: float, dtype, device):
    """(n, n) matrix of a truncated Gaussian (radius 2.5 sigma) with replicate borders, rows summing to one."""
    torch = _torch()

    r = max(1, int(math.ceil(2.5 * sigma)))
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (taps / sigma) ** 2)
    k = k / k.sum()
    rows = torch.arange(n)[:, None].expand(n, 2 * r + 1)
    cols = (rows + torch.arange(-r, r + 1)[None]).clamp(0, n - 1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows.reshape(-1), cols.reshape(-1)), k.repeat(n), accumulate=True)
    return m.to(dtype=dtype, device=device)


def gaussian_smooth(x, sigma: float):
    """Separable Gaussian smoothing of (N, C, z, y, x) with replicate borders; sigma in voxels. Each axis is one
    batched matrix product with a banded smoothing matrix (much faster than depthwise convolutions on a CPU)."""
    if sigma <= 0:
        return x
    n, c, nz, ny, nx = x.shape
    y = x.contiguous() @ _smoothing_matrix(nx, sigma, x.dtype, x.device).T
    y = _smoothing_matrix(ny, sigma, x.dtype, x.device) @ y
    y = _smoothing_matrix(nz, sigma, x.dtype, x.device) @ y.reshape(n * c, nz, ny * nx)
    return y.reshape(x.shape)


def exp_velocity(v, squarings: int):
    """Displacement (N, 3, z, y, x) of exp(v) for a stationary velocity field, by scaling and squaring."""
    torch = _torch()
    import torch.nn.functional as F

    ident = identity_grid(v.shape[2:], v.device)
    u = v / (2 ** squarings)
    for _ in range(squarings):
        grid = ident + u.permute(0, 2, 3, 4, 1)
        u = u + F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.nan_to_num(u)


def _apply(m, pts):
    """Apply (N, 4, 4) matrices to (N, ..., 3) points."""
    n = pts.shape[0]
    flat = pts.reshape(n, -1, 3)
    out = flat @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]
    return out.reshape(pts.shape)


def _pad_stack(volumes: list[np.ndarray]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Stack (C, z, y, x) arrays zero-padded at the end to a common shape; returns the stack and the shape (x, y, z)."""
    shape = np.max([v.shape[1:] for v in volumes], axis=0)
    out = np.zeros((len(volumes), volumes[0].shape[0], *shape), volumes[0].dtype)
    for i, v in enumerate(volumes):
        out[i, :, : v.shape[1], : v.shape[2], : v.shape[3]] = v
    return out, tuple(int(s) for s in shape[::-1])


@dataclass
class RegistrationResult:
    """Transforms of N atlases into one patient: sample(atlas) at atlas_world(x) for patient world points x."""

    box: Box  # the deformable crop (patient world)
    affine: np.ndarray  # (N, 4, 4) box-normalised patient coordinates -> atlas world (affine part)
    displacement: object  # torch (N, 3, z, y, x), box-normalised units, on the finest level grid of the box
    channel_loss: np.ndarray  # (N, C) final mean squared difference per channel (nan: channel not used)
    weights: np.ndarray  # (N, C) channel weights used
    timings: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)

    @property
    def n_atlases(self) -> int:
        return self.affine.shape[0]

    def atlas_points(self, points_world: np.ndarray, device="cpu"):
        """Atlas world points (N, P, 3) (torch) for patient world points (P, 3)."""
        torch = _torch()
        import torch.nn.functional as F

        to_norm = np.linalg.inv(self.box.norm_to_world())
        p = torch.as_tensor(points_world @ to_norm[:3, :3].T + to_norm[:3, 3], dtype=torch.float32, device=device)
        disp = self.displacement.to(device)
        n = disp.shape[0]
        grid = p.view(1, 1, 1, -1, 3).expand(n, 1, 1, -1, 3)
        u = F.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)  # (N, 3, 1, 1, P)
        q = p[None] + u[:, :, 0, 0].transpose(1, 2)
        return _apply(torch.as_tensor(self.affine, dtype=torch.float32, device=device), q)

    def warp(self, volumes: list[np.ndarray], geoms: list[Geometry], target: Geometry, mode: str = "nearest",
             device="cpu", chunk: int = 2_000_000) -> np.ndarray:
        """Resample one (z, y, x) volume per atlas onto a patient grid: (N, z, y, x) float32 (0 outside)."""
        torch = _torch()
        import torch.nn.functional as F

        if mode == "nearest" and np.allclose(target.direction, self.box.direction, atol=1e-6):
            return self._warp_nearest_aligned(volumes, geoms, target, device)
        stack, pshape = _pad_stack([v[None].astype(np.float32) for v in volumes])
        vol = torch.from_numpy(stack).to(device)
        norms = torch.as_tensor(np.stack([_norm_matrix(g, pshape) for g in geoms]), dtype=torch.float32,
                                device=device)
        pts = target.points().reshape(-1, 3)
        out = np.zeros((len(volumes), pts.shape[0]), np.float32)
        for s in range(0, pts.shape[0], chunk):
            q = self.atlas_points(pts[s:s + chunk], device)  # (N, P, 3) atlas world
            g = _apply(norms, q).view(len(volumes), 1, 1, -1, 3)
            out[:, s:s + chunk] = F.grid_sample(vol, g, mode=mode, padding_mode="zeros",
                                                align_corners=True)[:, 0, 0, 0].cpu().numpy()
        return out.reshape(len(volumes), *target.shape[::-1])


    def _warp_nearest_aligned(self, volumes: list[np.ndarray], geoms: list[Geometry], target: Geometry,
                              device) -> np.ndarray:
        """warp() for a target grid aligned with the box: the displacement is brought onto the target grid by
        separable linear interpolation (three matrix products) and the volumes are read by index."""
        torch = _torch()

        box_to_norm = np.linalg.inv(self.box.norm_to_world()) @ target.index_to_world()  # diagonal for aligned grids
        disp = self.displacement.to(device=device, dtype=torch.float32)
        n_in = disp.shape[2:][::-1]  # (x, y, z)
        coords, mats = [], []
        for a in range(3):
            p = box_to_norm[a, a] * np.arange(target.shape[a]) + box_to_norm[a, 3]
            coords.append(torch.as_tensor(p, dtype=torch.float32, device=device))
            mats.append(_interpolation_matrix(p, n_in[a]).to(device))
        cx, cy, cz = coords
        out = np.zeros((len(volumes), *target.shape[::-1]), np.float32)
        for i, (vol, geom) in enumerate(zip(volumes, geoms, strict=True)):
            u = disp[i] @ mats[0].T  # (3, z, y, X)
            u = mats[1] @ u
            u = (mats[2] @ u.reshape(3, u.shape[1], -1)).reshape(3, *target.shape[::-1])
            m = torch.as_tensor(geom.world_to_index() @ self.affine[i], dtype=torch.float32, device=device)
            moved = (m[:3, :3] @ u.reshape(3, -1)).reshape(u.shape)  # the displacement in atlas voxels
            shape = target.shape[::-1]
            flat = torch.zeros(shape, dtype=torch.int32, device=device)
            inside = torch.ones(shape, dtype=torch.bool, device=device)
            stride = 1
            for k in range(3):  # atlas index k = m[k] . (p + u, 1)
                idx = moved[k].add_(m[k, 0] * cx[None, None, :] + m[k, 1] * cy[None, :, None]
                                    + (m[k, 2] * cz + m[k, 3])[:, None, None]).round_().to(torch.int32)
                inside &= (idx >= 0) & (idx < int(geom.shape[k]))
                flat += idx.clamp_(0, int(geom.shape[k]) - 1) * stride
                stride *= int(geom.shape[k])
            values = torch.as_tensor(np.ascontiguousarray(vol)).to(device).reshape(-1)
            out[i] = torch.where(inside, values[flat.long()], 0).to(torch.float32).cpu().numpy()
        return out


def _interpolation_matrix(positions: np.ndarray, n: int):
    """(len(positions), n) matrix of linear interpolation at normalised positions in [-1, 1] (align_corners, border
    clamping) of a 1-D signal of n samples."""
    torch = _torch()

    x = np.clip((np.asarray(positions, float) + 1.0) * 0.5 * (n - 1), 0.0, n - 1.0)
    lo = np.minimum(np.floor(x).astype(int), max(n - 2, 0))
    frac = x - lo if n > 1 else np.zeros_like(x)
    m = np.zeros((len(x), n), np.float32)
    rows = np.arange(len(x))
    m[rows, lo] = 1.0 - frac
    if n > 1:
        m[rows, lo + 1] += frac
    return torch.from_numpy(m)

def _channel_weights(patient: PreparedAnatomy, atlases: list[PreparedAnatomy]) -> np.ndarray:
    w = np.array([patient.present & a.present for a in atlases], np.float32)
    if not w.any(axis=1).all():
        bad = [i for i in range(len(atlases)) if not w[i].any()]
        raise InputError(f"atlases {bad} share no registration structure with the patient anatomy")
    return w


def register(patient: PreparedAnatomy, atlases: list[PreparedAnatomy], station_points: list[np.ndarray],
             config: RegistrationConfig | None = None, device: str = "cpu",
             progress: ProgressCallback | None = None) -> RegistrationResult:
    """Register all atlases to the patient in one batch.

    station_points: per atlas, world points (atlas space) that the deformable crop must cover (e.g. the corners of
    its station bounding box); they are mapped into the patient by the inverse of the affine.
    """
    torch = _torch()

    config = config or RegistrationConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = torch.device(device)
    timings: dict[str, float] = {}
    iters: dict[str, int] = {}
    weights = _channel_weights(patient, atlases)
    w_t = torch.as_tensor(weights, device=dev)
    report = reporter(progress)

    with torch.no_grad():
        # 1. initialisation from landmarks
        t0 = time.perf_counter()
        init = np.stack([initial_transform(patient.landmarks, a.landmarks) for a in atlases])
        timings["initialisation"] = time.perf_counter() - t0

        # 2. affine (Gauss-Newton) on the coarse level over the thorax box
        t0 = time.perf_counter()
        report(0.05, "affine")
        pgeom0 = patient.levels[0][1]
        thorax = Box.around(patient.extent_points, pgeom0.direction, 0.0)
        m, iters["affine"] = _affine_gauss_newton(patient, atlases, init, thorax, w_t, config, dev)
        to_norm = np.linalg.inv(thorax.norm_to_world())
        affine_world = np.einsum("nij,njk->nik", init, thorax.norm_to_world() @ m @ to_norm)  # patient -> atlas
        timings["affine"] = time.perf_counter() - t0

        # 3. the deformable crop: atlas station regions mapped into the patient, plus a margin
        pts = [(np.c_[p, np.ones(len(p))] @ np.linalg.inv(affine_world[i]).T)[:, :3]
               for i, p in enumerate(station_points)]
        box = Box.around(np.concatenate(pts), pgeom0.direction, config.crop_margin_mm)
        box = box.intersect(_geometry_of_extent(patient.extent_points, pgeom0.direction))
        affine_norm = np.einsum("nij,jk->nik", affine_world, box.norm_to_world())  # box-normalised -> atlas world

        # 4. deformable (diffeomorphic demons on the anatomy channels), coarse to fine
        t0 = time.perf_counter()
        disp, per = _demons(patient, atlases, affine_norm, box, w_t, config, dev, iters, report)
        timings["deformable"] = time.perf_counter() - t0

    per[weights == 0] = np.nan
    report(0.95, "registration done")
    return RegistrationResult(box, affine_norm, disp, per, weights, timings, iters)


def _atlas_level(atlases: list[PreparedAnatomy], level: int | str, weights, sigma: float, device):
    """Atlas occupancies of one level ("affine" or a deformable level index), smoothed (kept in each atlas's cache,
    so a prepared atlas set smooths once), stacked (N, C, z, y, x) with the channels not shared with the patient
    zeroed; and the per-atlas map atlas world -> normalised sample coordinates."""
    torch = _torch()

    levels = []
    for a in atlases:
        if (level, sigma) not in a.cache:
            vol, geom = a.affine_level if level == "affine" else a.levels[level]
            smooth = gaussian_smooth(torch.from_numpy(vol)[None], sigma)[0].numpy()
            a.cache[(level, sigma)] = (np.ascontiguousarray(smooth, np.float32), geom)
        levels.append(a.cache[(level, sigma)])
    stack, shape = _pad_stack([vol for vol, _ in levels])
    vol = torch.from_numpy(stack).to(device) * weights[:, :, None, None, None]
    norm = np.stack([_norm_matrix(geom, shape) for _, geom in levels])
    return vol.contiguous(memory_format=torch.channels_last_3d), norm


def _sample(vol, mats, points):
    """Sample (N, C, ...) volumes at (N, z, y, x, 3) points mapped by (N, 4, 4) matrices: (N, C, z, y, x)."""
    import torch.nn.functional as F

    out = F.grid_sample(vol, _apply(mats, points), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.contiguous()


def _central_differences(w, spacing_xyz: Sequence[float]):
    """Central differences of (N, C, z, y, x) along x, y, z per mm (0 on the border planes): three tensors."""
    torch = _torch()

    out = []
    for axis, h in zip((4, 3, 2), spacing_xyz, strict=True):
        d = torch.zeros_like(w)
        n = w.shape[axis]
        if n > 2:
            d.narrow(axis, 1, n - 2).copy_((w.narrow(axis, 2, n - 2) - w.narrow(axis, 0, n - 2)) / (2.0 * h))
        out.append(d)
    return out


def _demons_force(warped, diff, den, spacing_xyz: Sequence[float]):
    """Normalised multi-channel demons force (N, 3, z, y, x) in mm: -sum_c D_c grad W_c / (sum_c |grad W_c|^2 +
    sum_c D_c^2 / kappa), with D = W - F, grad W by central differences (0 on the border planes); den holds the
    second sum on entry."""
    torch = _torch()

    num = torch.zeros(den.shape[0], 3, *den.shape[1:], dtype=den.dtype, device=den.device)
    for k, (axis, h) in enumerate(zip((4, 3, 2), spacing_xyz, strict=True)):
        size = warped.shape[axis]
        if size <= 2:
            continue
        d = (warped.narrow(axis, 2, size - 2) - warped.narrow(axis, 0, size - 2)) * (0.5 / h)
        num[:, k].narrow(axis - 1, 1, size - 2).sub_((diff.narrow(axis, 1, size - 2) * d).sum(1))
        den.narrow(axis - 1, 1, size - 2).add_((d * d).sum(1))
    return num / den.clamp(min=1e-6)[:, None]


def _affine_gauss_newton(patient: PreparedAnatomy, atlases: list[PreparedAnatomy], init: np.ndarray, thorax: Box,
                         w_t, config: RegistrationConfig, dev) -> tuple[np.ndarray, int]:
    """Levenberg-Marquardt on the channel SSD of a compositional affine update in the thorax box's normalised
    coordinates: T <- T o (I + delta). The Jacobian uses the gradient of the warped channels. Returns the (N, 4, 4)
    correction in normalised coordinates and the number of iterations run."""
    torch = _torch()

    n = len(atlases)
    a_vol, a_norm = _atlas_level(atlases, "affine", w_t, config.channel_sigma, dev)
    grid0 = thorax.grid(config.affine_mm)
    fixed = gaussian_smooth(_resample_patient(patient.affine_level, grid0, thorax, dev), config.channel_sigma)
    fixed = fixed * w_t[:, :, None, None, None]  # (N, C, ...): channels not shared are left out
    base = torch.as_tensor(np.einsum("nij,njk->nik", a_norm, init) @ thorax.norm_to_world(), dtype=torch.float32,
                           device=dev)
    shape = grid0.shape[::-1]
    ident = identity_grid(shape, dev).expand(n, *shape, 3)
    x = torch.cat([ident[0].reshape(-1, 3), torch.ones(int(np.prod(shape)), 1, device=dev)], 1)  # (V, 4)
    h_norm = [2.0 / max(s - 1, 1) for s in grid0.shape]  # voxel size in normalised units (x, y, z)
    eye = torch.eye(4, device=dev, dtype=torch.float64)
    m = eye.repeat(n, 1, 1)
    m_try = m.clone()
    lam = torch.full((n,), config.affine_damping, dtype=torch.float64, device=dev)
    best = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
    hess = torch.zeros(n, 12, 12, dtype=torch.float64, device=dev)
    grad = torch.zeros(n, 12, dtype=torch.float64, device=dev)
    wsum = w_t.sum(1).clamp(min=1).double()
    it = 0
    for it in range(1, config.affine_iterations + 1):  # noqa: B007
        warped = _sample(a_vol, (base @ m_try.float()), ident)
        diff = warped - fixed
        loss = (diff * diff).mean(dim=(2, 3, 4)).sum(1).double() / wsum
        better = loss < best
        if better.any():  # new Jacobian at the accepted atlases
            # rows of the Jacobian per (channel, voxel): d warped / d (3x4 update) = grad (x) [x, y, z, 1]
            g = torch.stack(_central_differences(warped, h_norm), -1).flatten(2, 4)  # (N, C, V, 3)
            jac = (g[..., :, None] * x[None, None, :, None, :]).reshape(n, -1, 12)
            h_new = torch.bmm(jac.transpose(1, 2), jac).double()
            g_new = torch.bmm(jac.transpose(1, 2), diff.reshape(n, -1, 1))[..., 0].double()
            hess[better], grad[better], best[better] = h_new[better], g_new[better], loss[better]
            m[better] = m_try[better]
            lam[better] = lam[better] / 3.0
        lam[~better] = lam[~better] * 10.0
        damp = hess + lam[:, None, None] * torch.diag_embed(hess.diagonal(dim1=1, dim2=2) + 1e-9)
        delta = -torch.linalg.solve(damp, grad[..., None])[..., 0].reshape(n, 3, 4)
        step = eye.repeat(n, 1, 1)
        step[:, :3, :] += delta
        m_try = m @ step
        if float(delta.abs().max()) < config.affine_tolerance:
            break
    return m.cpu().numpy(), it


def _demons(patient: PreparedAnatomy, atlases: list[PreparedAnatomy], affine_norm: np.ndarray, box: Box, w_t,
            config: RegistrationConfig, dev, iters: dict[str, int], report: Callable[..., None]):
    """Diffeomorphic demons on the anatomy channels: a stationary velocity field (mm) per atlas, updated by the
    normalised multi-channel demons force (Gaussian-smoothed, fluid-like) and smoothed again (diffusion-like); the
    field of the lowest loss per atlas is kept. Returns the displacement (N, 3, z, y, x) in box-normalised units on
    the finest level's grid and the final per-channel mean squared difference (N, C)."""
    torch = _torch()
    import torch.nn.functional as F

    n = len(atlases)
    to_norm = torch.as_tensor(2.0 / box.size, dtype=torch.float32, device=dev).view(1, 3, 1, 1, 1)
    wsum = w_t.sum(1).clamp(min=1)
    v = None
    for level, (spacing, n_it) in enumerate(zip(config.levels_mm, config.iterations, strict=True)):
        report(0.2 + 0.7 * level / len(config.levels_mm), f"deformable level {level + 1} ({spacing:g} mm)")
        grid = box.grid(spacing)
        shape = grid.shape[::-1]
        fshape = tuple(max(2, int(math.ceil((s - 1) / config.field_factor)) + 1) for s in shape)
        h = [float(s) for s in grid.spacing]  # mm (x, y, z)
        kappa = float(np.mean(np.square(h)))
        a_vol, a_norm = _atlas_level(atlases, level, w_t, config.channel_sigma, dev)
        mats = torch.as_tensor(np.einsum("nij,njk->nik", a_norm, affine_norm), dtype=torch.float32, device=dev)
        fixed = gaussian_smooth(_resample_patient(patient.levels[level], grid, box, dev), config.channel_sigma)
        fixed = fixed * w_t[:, :, None, None, None]
        warp = _Warper(a_vol, mats, shape, config.squarings, to_norm)
        if v is None:
            v = torch.zeros(n, 3, *fshape, device=dev)
        else:
            v = F.interpolate(v, size=fshape, mode="trilinear", align_corners=True)
        best_loss = torch.full((n,), math.inf, device=dev)
        best_v = v.clone()
        history: list = []
        it = 0
        for it in range(1, n_it + 1):  # noqa: B007
            if it == 1:  # all channels everywhere once, which also fixes each channel's region for this level
                warped = warp(v)
                diff = warped - fixed
                sq = diff * diff
                loss = sq.mean(dim=(2, 3, 4)).sum(1) / wsum
                force = _demons_force(warped, diff, sq.sum(1) / kappa, h)
                regions = _channel_regions(warped, fixed, config.channel_margin_mm, h)
                del warped, sq, diff
            else:
                loss, force = warp.boxed(v, fixed, regions, kappa, h)
                loss = loss / wsum
            improved = loss < best_loss
            best_loss = torch.where(improved, loss, best_loss)
            best_v[improved] = v[improved]
            history.append(best_loss)
            if _converged(history, config.window, config.tolerance):
                break
            force = gaussian_smooth(force, config.fluid_sigma)
            if fshape != shape:
                force = F.interpolate(force, size=fshape, mode="trilinear", align_corners=True)
            v = gaussian_smooth(v + config.step * force, config.smooth_sigma / config.field_factor)
        iters[f"level{level + 1}"] = it
        if history:
            log.debug("level %d: %d iterations, loss %s -> %s", level + 1, it, history[0].tolist(), best_loss.tolist())
        v = best_v
    warped = warp(v)
    per = ((warped - fixed) ** 2).mean(dim=(2, 3, 4)).cpu().numpy()
    return warp.displacement(v), per


class _Warper:
    """Atlas channels warped by the affine and exp(v) onto a level grid of the box; v (N, 3, ...) in mm on the
    velocity grid (at most as fine as the level grid)."""

    def __init__(self, vol, mats, shape, squarings: int, to_norm) -> None:
        self.vol, self.shape, self.squarings, self.to_norm = vol, tuple(shape), squarings, to_norm
        self.channels = None
        n = mats.shape[0]
        self.linear = mats[:, :3, :3].contiguous()
        self.base = _apply(mats, identity_grid(shape, vol.device).expand(n, *shape, 3)).contiguous()

    def displacement(self, v):
        """exp(v) in box-normalised units on the level grid (N, 3, z, y, x)."""
        import torch.nn.functional as F

        u = exp_velocity(v * self.to_norm, self.squarings)
        if tuple(u.shape[2:]) != self.shape:
            u = F.interpolate(u, size=self.shape, mode="trilinear", align_corners=True)
        return u

    def grid(self, v):
        """Atlas sample coordinates of the level grid's points (N, z, y, x, 3)."""
        u = self.displacement(v)
        moved = self.linear @ u.reshape(u.shape[0], 3, -1)  # (N, 3, V): the displacement in atlas sample units
        return self.base + moved.transpose(1, 2).reshape(self.base.shape)

    def __call__(self, v):
        import torch.nn.functional as F

        return F.grid_sample(self.vol, self.grid(v), mode="bilinear", padding_mode="zeros",
                             align_corners=True).contiguous()

    def boxed(self, v, fixed, regions: list[tuple[int, tuple[slice, ...]]], kappa: float,
              spacing_xyz: Sequence[float]):
        """Sum of squared differences per atlas (N,) and the demons force (N, 3, z, y, x), each channel sampled
        only inside its region (outside it both the warped and the fixed channel are taken as 0)."""
        torch = _torch()
        import torch.nn.functional as F

        if self.channels is None:
            self.channels = [self.vol[:, c:c + 1].contiguous() for c in range(self.vol.shape[1])]
        grid = self.grid(v)
        n = grid.shape[0]
        num = torch.zeros(n, 3, *self.shape, dtype=grid.dtype, device=grid.device)
        den = torch.zeros(n, *self.shape, dtype=grid.dtype, device=grid.device)
        total = torch.zeros(n, dtype=grid.dtype, device=grid.device)
        for c, region in regions:
            w = F.grid_sample(self.channels[c], grid[(slice(None), *region)], mode="bilinear", padding_mode="zeros",
                              align_corners=True)[:, 0]
            d = w - fixed[(slice(None), c, *region)]
            sq = d * d
            total += sq.sum(dim=(1, 2, 3))
            den[(slice(None), *region)] += sq / kappa
            for k, (axis, h) in enumerate(zip((3, 2, 1), spacing_xyz, strict=True)):
                size = w.shape[axis]
                if size <= 2:
                    continue
                g = (w.narrow(axis, 2, size - 2) - w.narrow(axis, 0, size - 2)) * (0.5 / h)
                inner = list(region)
                sl = inner[axis - 1]
                inner[axis - 1] = slice(sl.start + 1, sl.stop - 1)
                num[(slice(None), k, *inner)] -= d.narrow(axis, 1, size - 2) * g
                den[(slice(None), *inner)] += g * g
        return total / float(np.prod(self.shape)), num / den.clamp(min=1e-6)[:, None]


def _channel_regions(warped, fixed, margin_mm: float, spacing_xyz: Sequence[float]
                     ) -> list[tuple[int, tuple[slice, ...]]]:
    """Per channel, the index box (z, y, x slices) holding its warped and fixed occupancy (any atlas), grown by a
    margin; channels empty everywhere are left out."""
    support = ((warped > 1e-3) | (fixed > 1e-3)).any(0)  # (C, z, y, x)
    margin = [int(math.ceil(margin_mm / h)) for h in spacing_xyz[::-1]]  # z, y, x
    regions = []
    for c in range(support.shape[0]):
        box = bbox_of(support[c].cpu().numpy())
        if box is None:
            continue
        lo, hi = box[0][::-1], box[1][::-1]  # z, y, x
        size = support.shape[1:]
        regions.append((c, tuple(slice(max(int(a) - m, 0), min(int(b) + m, n))
                                 for a, b, m, n in zip(lo, hi, margin, size, strict=True))))
    return regions


def _converged(history: list, window: int, tolerance: float) -> bool:
    """True when every atlas's best loss fell by less than tolerance (relative) over the last window iterations."""
    if window <= 0 or len(history) <= window:
        return False
    old, new = history[-window - 1], history[-1]
    return bool(((old - new) <= tolerance * old.clamp(min=1e-12)).all())


def _geometry_of_extent(points: np.ndarray, direction: np.ndarray) -> Geometry:
    b = Box.around(points, direction, 0.0)
    return Geometry(b.origin, b.size / 10.0, direction, (11, 11, 11))


def _resample_patient(level: tuple[np.ndarray, Geometry], grid: Geometry, box: Box, device):
    """Patient occupancy (C, z, y, x) on a level grid of the box: (1, C, z, y, x) torch."""
    torch = _torch()
    import torch.nn.functional as F

    vol, geom = level
    shape = grid.shape[::-1]
    m = torch.as_tensor(_norm_matrix(geom, geom.shape) @ box.norm_to_world(), dtype=torch.float32, device=device)
    g = _apply(m[None], identity_grid(shape, device))
    return F.grid_sample(torch.from_numpy(vol)[None].to(device), g, mode="bilinear", padding_mode="zeros",
                         align_corners=True)
