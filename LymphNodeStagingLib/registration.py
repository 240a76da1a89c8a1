"""Batched, patient-centric multi-atlas registration driven by anatomy label maps (torch, CPU or GPU).

All atlases are registered to one patient at once. Every transform maps patient points to atlas points ("pull"), so
atlas data lands on the patient grid without any inverse:

1. initialisation: a similarity transform fitted to the centroids of robust structures (vertebrae, trachea, aorta,
   heart, sternum, ...) found in both label maps;
2. affine: 12 parameters per atlas, optimised on the occupancy of anatomy channels (partial-volume fractions of
   selected structures, one channel each) at a coarse grid over the thorax;
3. deformable: a stationary velocity field per atlas (exponentiated by scaling and squaring, so the map is
   diffeomorphic), Gaussian-smoothed, optimised by Adam on the sum of squared differences of the anatomy channels,
   multi-resolution on a crop around the atlases' stations.

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

from .errors import LNSError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class RegistrationError(LNSError, ValueError):
    """Anatomy that cannot drive a registration (missing structures, empty label maps, bad parameters)."""


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
    iterations: tuple[int, ...] = (60, 40)
    affine_iterations: int = 60
    affine_lr: float = 0.01
    field_factor: int = 2  # velocity field spacing = level spacing * field_factor
    smooth_sigma: float = 1.0  # Gaussian smoothing of the velocity field, in field voxels
    squarings: int = 5
    lr_mm: float = 1.5  # Adam step of the velocity field, mm
    diffusion: float = 0.05  # weight of the squared-gradient penalty of the displacement
    crop_margin_mm: float = 25.0  # margin around the atlases' stations for the deformable crop
    thorax_margin_mm: float = 10.0
    threads: int | None = None  # torch threads (None: the machine's core count)

    def __post_init__(self) -> None:
        if len(self.levels_mm) != len(self.iterations) or not self.levels_mm:
            raise RegistrationError(
                f"levels_mm {self.levels_mm} and iterations {self.iterations}: expected the same non-zero length")
        if any(s <= 0 for s in self.levels_mm):
            raise RegistrationError(f"levels_mm {self.levels_mm}: expected positive spacings in mm")


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


def occupancy(labels: np.ndarray, geom: Geometry, lut: np.ndarray, n_channels: int,
              spacing_mm: float) -> tuple[np.ndarray, Geometry]:
    """Partial-volume fraction of each channel on blocks of about spacing_mm: (C, z, y, x) float32 and the grid."""
    import torch
    import torch.nn.functional as F

    k = np.maximum(np.round(spacing_mm / geom.spacing).astype(int), 1)  # (x, y, z)
    shape = np.asarray(labels.shape)[::-1] // k * k
    ch = lut[np.minimum(labels[: shape[2], : shape[1], : shape[0]], len(lut) - 1)]
    t = torch.from_numpy(ch)
    out = torch.empty((n_channels, *(shape[::-1] // k[::-1])), dtype=torch.float32)
    kernel = tuple(int(v) for v in k[::-1])
    for c in range(n_channels):
        mask = (t == c + 1).to(torch.float32)[None, None]
        out[c] = F.avg_pool3d(mask, kernel, kernel)[0, 0]
    return out.numpy(), geom.pooled(k)


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
        raise RegistrationError(f"anatomy label map has none of the registration structures ({names})")
    lo, hi = box
    sub = np.ascontiguousarray(labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]])
    sub_geom = geom.crop(lo, hi)
    n = len(config.structures)
    counts = np.bincount(lut[np.minimum(sub, len(lut) - 1)].ravel(), minlength=n + 1)
    present = counts[1:] > 0
    levels = [occupancy(sub, sub_geom, lut, n, s) for s in config.levels_mm]
    corners = np.array([[x, y, z] for x in (0, sub_geom.shape[0] - 1) for y in (0, sub_geom.shape[1] - 1)
                        for z in (0, sub_geom.shape[2] - 1)], float)
    extent = corners @ (geom.direction @ np.diag(geom.spacing)).T + sub_geom.origin
    return PreparedAnatomy(centroids_mm(sub, sub_geom, LANDMARK_IDS), present, levels, extent)


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
        raise RegistrationError("patient and atlas anatomy share no landmark structure "
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


def gaussian_smooth(x, sigma: float):
    """Separable Gaussian smoothing of (N, C, z, y, x) with replicate borders; sigma in voxels."""
    torch = _torch()
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    n, c = x.shape[:2]
    y = x.reshape(1, n * c, *x.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        size = y.shape[2 + axis]
        if size <= r:  # too thin to pad by reflection: leave this axis
            continue
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(1, 1, *shape).expand(n * c, 1, *shape), groups=n * c)
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


def _channel_weights(patient: PreparedAnatomy, atlases: list[PreparedAnatomy]) -> np.ndarray:
    w = np.array([patient.present & a.present for a in atlases], np.float32)
    if not w.any(axis=1).all():
        bad = [i for i in range(len(atlases)) if not w[i].any()]
        raise RegistrationError(f"atlases {bad} share no registration structure with the patient anatomy")
    return w


def register(patient: PreparedAnatomy, atlases: list[PreparedAnatomy], station_points: list[np.ndarray],
             config: RegistrationConfig | None = None, device: str = "cpu",
             progress: Progress | None = None) -> RegistrationResult:
    """Register all atlases to the patient in one batch.

    station_points: per atlas, world points (atlas space) that the deformable crop must cover (e.g. the corners of
    its station bounding box); they are mapped into the patient by the inverse of the affine.
    """
    torch = _torch()
    import torch.nn.functional as F

    config = config or RegistrationConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = torch.device(device)
    n = len(atlases)
    timings: dict[str, float] = {}
    iters: dict[str, int] = {}
    weights = _channel_weights(patient, atlases)
    w_t = torch.as_tensor(weights, device=dev)
    report = progress or (lambda f, m: None)

    # 1. initialisation from landmarks
    t0 = time.perf_counter()
    init = np.stack([initial_transform(patient.landmarks, a.landmarks) for a in atlases])
    timings["initialisation"] = time.perf_counter() - t0

    # 2. affine on the coarse level over the thorax box
    t0 = time.perf_counter()
    pgeom0 = patient.levels[0][1]
    thorax = Box.around(patient.extent_points, pgeom0.direction, 0.0)
    a_stack, a_shape = _pad_stack([a.levels[0][0] for a in atlases])
    a_vol = torch.from_numpy(a_stack).to(dev)
    a_norm = np.stack([_norm_matrix(a.levels[0][1], a_shape) for a in atlases])
    grid0 = thorax.grid(config.levels_mm[0])
    fixed0 = _resample_patient(patient.levels[0], grid0, thorax, dev)
    base = torch.as_tensor(np.einsum("nij,njk->nik", a_norm, init) @ thorax.norm_to_world(), dtype=torch.float32,
                           device=dev)
    ident = identity_grid(grid0.shape[::-1], dev)
    lin = torch.zeros(n, 3, 3, device=dev, requires_grad=True)
    trans = torch.zeros(n, 3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([lin, trans], lr=config.affine_lr)
    report(0.05, "affine")
    for _ in range(config.affine_iterations):
        opt.zero_grad()
        m = torch.eye(4, device=dev).repeat(n, 1, 1)
        m[:, :3, :3] = m[:, :3, :3] + lin
        m[:, :3, 3] = trans
        g = _apply(base @ m, ident.expand(n, *ident.shape[1:]))
        warped = F.grid_sample(a_vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        loss = _ssd(warped, fixed0, w_t).sum()
        loss.backward()
        opt.step()
    iters["affine"] = config.affine_iterations
    with torch.no_grad():
        m = torch.eye(4, device=dev).repeat(n, 1, 1)
        m[:, :3, :3] += lin
        m[:, :3, 3] = trans
        # patient world -> atlas world
        to_norm = np.linalg.inv(thorax.norm_to_world())
        affine_world = np.einsum("nij,njk->nik", init,
                                 thorax.norm_to_world() @ m.cpu().numpy().astype(float) @ to_norm)
    timings["affine"] = time.perf_counter() - t0

    # 3. the deformable crop: atlas station regions mapped into the patient, plus a margin
    pts = [(np.c_[p, np.ones(len(p))] @ np.linalg.inv(affine_world[i]).T)[:, :3] for i, p in enumerate(station_points)]
    box = Box.around(np.concatenate(pts), pgeom0.direction, config.crop_margin_mm)
    box = box.intersect(_geometry_of_extent(patient.extent_points, pgeom0.direction))
    to_world = box.norm_to_world()
    affine_norm = np.einsum("nij,jk->nik", affine_world, to_world)  # box-normalised -> atlas world

    # 4. deformable, coarse to fine
    t0 = time.perf_counter()
    disp = None
    v_param = None
    for level, (spacing, n_it) in enumerate(zip(config.levels_mm, config.iterations, strict=True)):
        grid = box.grid(spacing)
        fixed = _resample_patient(patient.levels[level], grid, box, dev)
        a_stack, a_shape = _pad_stack([a.levels[level][0] for a in atlases])
        a_vol = torch.from_numpy(a_stack).to(dev)
        a_norm = np.stack([_norm_matrix(a.levels[level][1], a_shape) for a in atlases])
        mats = torch.as_tensor(np.einsum("nij,njk->nik", a_norm, affine_norm), dtype=torch.float32, device=dev)
        shape = grid.shape[::-1]
        fshape = tuple(max(2, int(math.ceil((s - 1) / config.field_factor)) + 1) for s in shape)
        if v_param is None:
            v_param = torch.zeros(n, 3, *fshape, device=dev)
        else:
            v_param = F.interpolate(v_param.detach(), size=fshape, mode="trilinear", align_corners=True)
        v_param.requires_grad_(True)
        # step in normalised units per axis, so that lr is in mm
        scale = torch.as_tensor(2.0 / box.size, dtype=torch.float32, device=dev).view(1, 3, 1, 1, 1)
        opt = torch.optim.Adam([v_param], lr=config.lr_mm)
        ident = identity_grid(shape, dev)
        mm_per_norm = torch.as_tensor(box.size / 2.0, dtype=torch.float32, device=dev).view(1, 3, 1, 1, 1)
        best = (math.inf, None)
        report(0.2 + 0.7 * level / len(config.levels_mm), f"deformable level {level + 1} ({spacing:g} mm)")
        for _ in range(n_it):
            opt.zero_grad()
            v = gaussian_smooth(v_param * scale, config.smooth_sigma)
            u = exp_velocity(v, config.squarings)
            u_img = F.interpolate(u, size=shape, mode="trilinear", align_corners=True)
            g = _apply(mats, ident.expand(n, *shape, 3) + u_img.permute(0, 2, 3, 4, 1))
            warped = F.grid_sample(a_vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)
            sim = _ssd(warped, fixed, w_t)
            reg = _diffusion(u * mm_per_norm, box.size / (np.asarray(fshape[::-1]) - 1))
            loss = (sim + config.diffusion * reg).sum()
            loss.backward()
            opt.step()
            total = float(sim.detach().sum())
            if total < best[0]:
                best = (total, u.detach())
        iters[f"level{level + 1}"] = n_it
        disp = F.interpolate(best[1], size=shape, mode="trilinear", align_corners=True)
    timings["deformable"] = time.perf_counter() - t0

    # final per-channel loss at the finest level
    with torch.no_grad():
        g = _apply(mats, ident.expand(n, *shape, 3) + disp.permute(0, 2, 3, 4, 1))
        warped = F.grid_sample(a_vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        per = ((warped - fixed) ** 2).mean(dim=(2, 3, 4)).cpu().numpy()
    per[weights == 0] = np.nan
    report(0.95, "registration done")
    return RegistrationResult(box, affine_norm, disp.detach(), per, weights, timings, iters)


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


def _ssd(warped, fixed, w):
    """Per-atlas weighted mean squared difference over channels and voxels: (N,)."""
    d = ((warped - fixed) ** 2).mean(dim=(2, 3, 4))  # (N, C)
    return (d * w).sum(1) / w.sum(1).clamp(min=1)


def _diffusion(u_mm, spacing_xyz: np.ndarray):
    """Mean squared spatial gradient of a displacement (N, 3, z, y, x) in mm per mm: (N,)."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    dz = (u_mm[:, :, 1:] - u_mm[:, :, :-1]) / sz
    dy = (u_mm[:, :, :, 1:] - u_mm[:, :, :, :-1]) / sy
    dx = (u_mm[..., 1:] - u_mm[..., :-1]) / sx
    return (dz ** 2).mean(dim=(1, 2, 3, 4)) + (dy ** 2).mean(dim=(1, 2, 3, 4)) + (dx ** 2).mean(dim=(1, 2, 3, 4))
