"""Grids, the patient frame (scale + smooth random deformation) and vectorised shape painting.

Coordinates: SimpleITK LPS millimetres (x: right -> left, y: anterior -> posterior, z: inferior -> superior).
Arrays are indexed [z, y, x]. Shapes are defined in *canonical* millimetres (carina at the origin, average adult);
a patient's frame maps physical points to canonical ones:

    body b = p - offset            (table position)
    u = b + d(b)                   (smooth random displacement field, a few mm)
    c = u / scale                  (per-axis size and proportions)

Every shape is evaluated only inside its bounding box, on precomputed canonical coordinate arrays, so that the
cost of a shape is proportional to its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """An axis-aligned image grid (identity direction)."""

    size: tuple[int, int, int]  # (nx, ny, nz), SimpleITK order
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # physical point of voxel (0, 0, 0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape (nz, ny, nx)."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def nvox(self) -> int:
        return int(np.prod(self.size))

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical coordinates along x, y, z (1-D float64 arrays)."""
        return tuple(self.origin[i] + self.spacing[i] * np.arange(self.size[i]) for i in range(3))  # type: ignore

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of this grid from a [z, y, x] array."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        return img

    def index_of(self, point: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) index of physical points (..., 3)."""
        return (np.asarray(point, float) - np.asarray(self.origin)) / np.asarray(self.spacing)

    def point_of(self, index_xyz: np.ndarray) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(index_xyz, float) * np.asarray(self.spacing)

    @staticmethod
    def from_image(img: sitk.Image) -> Grid:
        return Grid(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()))  # type: ignore


@dataclass
class Frame:
    """Patient frame: physical -> canonical coordinates (see the module docstring).

    The displacement field is smooth, low-frequency and separable by construction: d_x(x, z), d_y(y, z), d_z(z)
    (lateral and antero-posterior bending and widening that vary with height, non-uniform stretching along the
    body axis). That keeps canonical x a function of (x, z), y of (y, z) and z of z alone, so shape functions are
    evaluated on broadcast (z, 1, x) / (z, y, 1) / (z, 1, 1) arrays and only the final masks are full 3-D.
    """

    offset: np.ndarray  # (3,) physical position of the canonical origin (the carina)
    scale: np.ndarray  # (3,) per-axis scale
    # per component: list of (amplitude, k_in_plane, phase_in_plane, k_z, phase_z)
    terms: list[list[tuple[float, float, float, float, float]]] = field(default_factory=list)

    @staticmethod
    def random(rng: np.random.Generator, offset: np.ndarray, scale: np.ndarray, amplitude_mm: float) -> Frame:
        """A frame with a smooth random displacement field (wavelengths 200-500 mm, peak about amplitude_mm)."""
        terms: list[list[tuple]] = []
        for comp in range(3):
            items = []
            for _ in range(3):
                a = float(rng.normal(0.0, amplitude_mm / 2.0))
                k1, k2 = 2 * np.pi / rng.uniform(200.0, 500.0, size=2)
                p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
                if comp == 2:
                    k1, p1 = 0.0, np.pi / 2  # d_z depends on z only
                items.append((a, float(k1), float(p1), float(k2), float(p2)))
            terms.append(items)
        return Frame(np.asarray(offset, float), np.asarray(scale, float), terms)

    @property
    def max_displacement(self) -> float:
        return float(max(sum(abs(t[0]) for t in comp) for comp in self.terms)) if self.terms else 0.0

    def _d(self, comp: int, u: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(z)))
        if self.terms:
            for a, k1, p1, k2, p2 in self.terms[comp]:
                out = out + a * np.sin(k1 * u + p1) * np.sin(k2 * z + p2)
        return out

    def displacement_points(self, b: np.ndarray) -> np.ndarray:
        """Displacement at body points (..., 3)."""
        b = np.asarray(b, float)
        return np.stack([self._d(k, b[..., k], b[..., 2]) for k in range(3)], axis=-1)

    def canonical_to_physical(self, c: np.ndarray) -> np.ndarray:
        """Inverse map (fixed-point iteration) of canonical points (..., 3) to physical points."""
        u = np.asarray(c, float) * self.scale
        b = u.copy()
        for _ in range(8):
            b = u - self.displacement_points(b)
        return b + self.offset

    def physical_to_canonical(self, p: np.ndarray) -> np.ndarray:
        b = np.asarray(p, float) - self.offset
        return (b + self.displacement_points(b)) / self.scale


class Canvas:
    """Label and material maps on a grid, with the canonical coordinates of every voxel."""

    def __init__(self, grid: Grid, frame: Frame):
        self.grid = grid
        self.frame = frame
        bx, by, bz = (a - frame.offset[i] for i, a in enumerate(grid.axes()))  # body coordinates
        zc = bz[:, None, None]
        self.cx = ((bx[None, None, :] + frame._d(0, bx[None, None, :], zc)) / frame.scale[0]).astype(np.float32)
        self.cy = ((by[None, :, None] + frame._d(1, by[None, :, None], zc)) / frame.scale[1]).astype(np.float32)
        self.cz = ((zc + frame._d(2, zc, zc)) / frame.scale[2]).astype(np.float32)
        self.label = np.zeros(grid.shape, np.uint8)
        self.material = np.zeros(grid.shape, np.uint8)
        self.margin = frame.max_displacement + 2.0 * max(grid.spacing)

    # --- bounding boxes ---------------------------------------------------------------------------------------
    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Array slices [z, y, x] covering the canonical box lo..hi (None when outside the grid)."""
        lo = np.asarray(lo, float) * self.frame.scale + self.frame.offset - self.margin
        hi = np.asarray(hi, float) * self.frame.scale + self.frame.offset + self.margin
        ilo = np.floor(self.grid.index_of(lo)).astype(int)
        ihi = np.ceil(self.grid.index_of(hi)).astype(int) + 1
        ilo = np.maximum(ilo, 0)
        ihi = np.minimum(ihi, np.asarray(self.grid.size))
        if np.any(ihi <= ilo):
            return None
        return (slice(ilo[2], ihi[2]), slice(ilo[1], ihi[1]), slice(ilo[0], ihi[0]))

    def full_coords(self, sl):
        """Canonical coordinates of the voxels in sl, broadcastable to the box shape."""
        return self.cx[:, :, sl[2]][sl[0]], self.cy[:, sl[1], :][sl[0]], self.cz[sl[0]]

    # --- painting ---------------------------------------------------------------------------------------------
    def paint(self, sl, mask: np.ndarray, label: int | None, material: int | None, only_empty: bool = False) -> None:
        if sl is None or not mask.any():
            return
        lab = self.label[sl]
        mat = self.material[sl]
        if only_empty:
            mask = mask & (lab == 0)
        mask = np.broadcast_to(mask, lab.shape)
        if label is not None:
            lab[mask] = label
        if material is not None:
            mat[mask] = material

    def ellipsoid_mask(self, center, semi, rotation: np.ndarray | None = None):
        """(slices, mask) of an ellipsoid (canonical centre, semi-axes, optional 3x3 rotation: columns = axes)."""
        center = np.asarray(center, float)
        semi = np.asarray(semi, float)
        r = float(semi.max())
        sl = self.box(center - r, center + r)
        if sl is None:
            return None, None
        x, y, z = self.full_coords(sl)
        dx, dy, dz = x - center[0], y - center[1], z - center[2]
        if rotation is None:
            q = (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2
        else:
            q = 0
            for k in range(3):
                proj = dx * rotation[0, k] + dy * rotation[1, k] + dz * rotation[2, k]
                q = q + (proj / semi[k]) ** 2
        return sl, q <= 1.0

    def paint_ellipsoid(self, center, semi, label, material, rotation=None, only_empty=False):
        sl, m = self.ellipsoid_mask(center, semi, rotation)
        if sl is not None:
            self.paint(sl, m, label, material, only_empty)
        return sl, m

    def tube_samples(self, points, radii, step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dense samples of a Catmull-Rom spline through control points, with linearly interpolated radii."""
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),)).astype(float)
        if len(pts) > 2:
            ext = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
            segs = []
            rs = []
            for i in range(len(pts) - 1):
                p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
                n = 24
                t = np.linspace(0, 1, n, endpoint=False)[:, None]
                seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                             + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
                segs.append(seg)
                rs.append(rad[i] + (rad[i + 1] - rad[i]) * t[:, 0])
            segs.append(pts[-1:])
            rs.append(rad[-1:])
            curve = np.vstack(segs)
            crad = np.concatenate(rs)
        else:
            curve, crad = pts, rad
        # resample by arc length
        seglen = np.linalg.norm(np.diff(curve, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seglen)])
        if step is None:
            step = float(min(0.6 * crad.min(), max(min(self.grid.spacing), 0.8)))
        n = max(2, int(np.ceil(s[-1] / max(step, 0.3))) + 1)
        si = np.linspace(0, s[-1], n)
        out = np.stack([np.interp(si, s, curve[:, k]) for k in range(3)], axis=1)
        return out, np.interp(si, s, crad)

    def tube_sdf(self, points, radii, pad: float = 0.0, step=None):
        """Signed distance (canonical mm, negative inside) to the surface of a swept-sphere tube, evaluated in the
        tube's bounding box widened by ``pad``; returns (slices, sdf) or (None, None) outside the grid."""
        if step is None:
            step = float(np.clip(0.9 * np.min(radii), min(self.grid.spacing), 8.0))
        samples, rad = self.tube_samples(points, radii, step)
        sc, off, sp = self.frame.scale, self.frame.offset, np.asarray(self.grid.spacing)
        # capsules between consecutive samples
        a_pts, b_pts, ra, rb = samples[:-1], samples[1:], rad[:-1], rad[1:]
        ext = (np.maximum(ra, rb) + pad) * (np.max(sc) / np.min(sc))
        lo_all = (np.minimum(a_pts, b_pts) - ext[:, None]) * sc + off - self.margin
        hi_all = (np.maximum(a_pts, b_pts) + ext[:, None]) * sc + off + self.margin
        ilo = np.maximum(np.floor((lo_all - self.grid.origin) / sp).astype(int), 0)
        ihi = np.minimum(np.ceil((hi_all - self.grid.origin) / sp).astype(int) + 1, np.asarray(self.grid.size))
        ok = np.all(ihi > ilo, axis=1)
        if not ok.any():
            return None, None
        a_pts, b_pts, ra, rb, ilo, ihi = a_pts[ok], b_pts[ok], ra[ok], rb[ok], ilo[ok], ihi[ok]
        blo, bhi = ilo.min(axis=0), ihi.max(axis=0)
        box = (slice(blo[2], bhi[2]), slice(blo[1], bhi[1]), slice(blo[0], bhi[0]))
        sdf = np.full((bhi[2] - blo[2], bhi[1] - blo[1], bhi[0] - blo[0]), np.inf, np.float32)
        cx, cy, cz = self.full_coords(box)
        ilo = ilo - blo
        ihi = ihi - blo
        for i in range(len(a_pts)):
            a, b, lo, hi = a_pts[i], b_pts[i], ilo[i], ihi[i]
            sub = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
            ab = b - a
            L2 = float(ab @ ab) or 1e-9
            dx = cx[sub[0], :, sub[2]] - np.float32(a[0])
            dy = cy[sub[0], sub[1], :] - np.float32(a[1])
            dz = cz[sub[0]] - np.float32(a[2])
            t = np.clip((dx * np.float32(ab[0]) + dy * np.float32(ab[1]) + dz * np.float32(ab[2])) / np.float32(L2), 0, 1)
            d = np.sqrt((dx - t * np.float32(ab[0])) ** 2 + (dy - t * np.float32(ab[1])) ** 2
                        + (dz - t * np.float32(ab[2])) ** 2) - (np.float32(ra[i]) + t * np.float32(rb[i] - ra[i]))
            np.minimum(sdf[sub], d, out=sdf[sub])
        return box, sdf

    def paint_tube(self, points, radii, label, material, only_empty=False, step=None, lumen: float = 0.0,
                   lumen_material: int | None = None):
        """Paint a tube; with ``lumen`` > 0, the inner part (wall thickness ``lumen``) gets ``lumen_material``."""
        sl, sdf = self.tube_sdf(points, radii, step=step)
        if sl is None:
            return None, None
        self.paint(sl, sdf <= 0, label, material, only_empty)
        if lumen > 0:
            self.paint(sl, sdf <= -lumen, None, lumen_material)
        return sl, sdf


def rotation_from_axis(axis, roll: float = 0.0) -> np.ndarray:
    """A rotation matrix whose first column is the unit vector along ``axis``."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    helper = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    b = np.cross(a, helper)
    b /= np.linalg.norm(b)
    c = np.cross(a, b)
    if roll:
        b, c = np.cos(roll) * b + np.sin(roll) * c, -np.sin(roll) * b + np.cos(roll) * c
    return np.stack([a, b, c], axis=1)


def segment_distance(x, y, z, polyline) -> np.ndarray:
    """Distance (canonical mm) of points to a polyline of a few control points (vectorised over voxels)."""
    pts = np.asarray(polyline, float)
    best = None
    for a, b in zip(pts[:-1], pts[1:], strict=False):
        ab = b - a
        L2 = float(ab @ ab)
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / L2
        t = np.clip(t, 0.0, 1.0)
        d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best)
