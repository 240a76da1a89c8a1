"""Thoracic anatomy of one phantom patient, in canonical millimetres, painted onto a Canvas.

The canonical frame has the carina at the origin (x: patient left +, y: posterior +, z: superior +). Sizes and
positions are those of an average adult thorax; ``sample_anatomy`` varies them per patient (overall size and
proportions come from the Frame's scale, the rest from jittered control points, radii, heights and orientations).
Airways and vessels are tubes along Catmull-Rom splines, the heart and abdominal organs ellipsoids, bones are
implicit shapes (vertebrae, sternum) or tubes (ribs, clavicles). Lungs are what remains of the thoracic cavity
outside the mediastinal envelope, split into lobes by fissure planes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..anatomy import labels as L
from .geometry import Canvas, rotation_from_axis
from .materials import Material as M


@dataclass
class Tube:
    points: np.ndarray  # (K, 3) canonical control points
    radii: np.ndarray  # (K,)
    label: int | None
    material: int
    env_margin: float = 0.0  # mediastinal-envelope margin around the tube (0: not part of the mediastinum)
    wall: float = 0.0  # airway wall thickness (lumen = air)


@dataclass
class AnatomyModel:
    """All shape parameters of one patient's anatomy (canonical mm) and the landmarks stations are built from."""

    body: dict
    cavity: dict
    diaphragm: dict
    spine: dict
    vertebrae: list[tuple[str, float, float]]  # (name, z_bottom, z_top)
    tubes: dict[str, Tube]
    heart: dict
    sternum: dict
    landmarks: dict = field(default_factory=dict)

    # --- analytic helpers (vectorised) -----------------------------------------------------------------------
    def spine_y(self, z):
        s = self.spine
        return s["y0"] - s["k1"] * z - s["k2"] * z * z

    def spine_r(self, z):
        return np.clip(self.spine["r0"] + (120.0 - z) * 0.02, 13.0, 24.0)

    def cavity_ab(self, z):
        """Half width and half depth of the thoracic cavity at height z (0 above the apex)."""
        c = self.cavity
        w = 0.62 + 0.38 * np.clip((95.0 - z) / 110.0, 0.0, 1.0) ** 0.6
        t = np.clip((z - c["z_taper"]) / (c["apex_z"] - c["z_taper"]), 0.0, 1.0)
        apex = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))
        return c["a"] * w * apex, c["b"] * (0.8 + 0.2 * w) * apex

    def diaphragm_z(self, x, y):
        d = self.diaphragm
        right = d["zR"] - 70.0 * (((x - d["xR"]) / 95.0) ** 2 + ((y - d["yR"]) / 85.0) ** 2)
        left = d["zL"] - 70.0 * (((x - d["xL"]) / 95.0) ** 2 + ((y - d["yL"]) / 85.0) ** 2)
        return np.maximum(right, left)

    def trachea_xy(self, z):
        t = self.tubes["trachea"].points
        order = np.argsort(t[:, 2])
        return np.interp(z, t[order, 2], t[order, 0]), np.interp(z, t[order, 2], t[order, 1])

    def sternum_y(self, z):
        s = self.sternum
        return s["y_mid"] + (z - s["z_mid"]) * s["slope"]


def _jit(rng: np.random.Generator, sd: float, n: int = 3) -> np.ndarray:
    return rng.normal(0.0, sd, n)


def sample_anatomy(rng: np.random.Generator) -> AnatomyModel:
    """Draw one patient's anatomy (canonical frame; global size/proportions live in the Frame's scale)."""
    body = {"a": 155.0 + rng.normal(0, 10), "b": 112.0 + rng.normal(0, 8), "yc": 20.0, "fat": rng.uniform(10, 28),
            "p": 2.4}
    spine = {"y0": 48.0 + rng.normal(0, 3), "k1": 0.15 + rng.normal(0, 0.02), "k2": 0.0005, "r0": 15.0 + rng.normal(0, 1)}
    # vertebrae stacked from the carina level (upper border of T5 near the carina)
    z5 = rng.normal(3.0, 5.0)
    heights = {k: 18.0 + 0.7 * k + rng.normal(0, 0.6) for k in range(1, 13)}
    discs = {k: 3.5 + 0.2 * k for k in range(0, 13)}
    vert: list[tuple[str, float, float]] = []
    top = z5
    for k in range(5, 13):  # downwards
        bottom = top - heights[k]
        vert.append((f"T{k}", bottom, top))
        top = bottom - discs[k]
    bottom = z5
    for k in range(4, 0, -1):  # upwards
        b = bottom + discs[k]
        vert.append((f"T{k}", b, b + heights[k]))
        bottom = b + heights[k]
    b = bottom + discs[0]
    vert.append(("C7", b, b + 16.0))

    body_front = body["yc"] - body["b"]
    sternum = {"z_top": 80.0 + rng.normal(0, 5), "z_manubrium": 45.0 + rng.normal(0, 4), "z_bottom": -105.0 + rng.normal(0, 6),
               "z_mid": -10.0, "slope": 0.11, "half_thick": 6.0}
    sternum["y_mid"] = body_front + body["fat"] * 0.5 + 14.0
    sternum_back = sternum["y_mid"] + 6.0
    cav_post = spine["y0"] + 18.0 + 42.0
    cavity = {"yc": 0.5 * (cav_post + sternum_back), "b": 0.5 * (cav_post - sternum_back),
              "a": body["a"] - body["fat"] - 20.0 + rng.normal(0, 4), "apex_z": 118.0 + rng.normal(0, 6), "z_taper": 55.0}
    zR = -100.0 + rng.normal(0, 10)
    diaphragm = {"zR": zR, "xR": -55.0, "yR": 0.0, "zL": zR - 14.0 + rng.normal(0, 5), "xL": 55.0, "yL": 5.0}

    tubes: dict[str, Tube] = {}

    def tube(name, pts, radii, label, material, env=0.0, wall=0.0, jitter=2.0, shift=None):
        p = np.asarray(pts, float)
        p = p + rng.normal(0, jitter, p.shape) * (np.arange(len(p)) > 0)[:, None]
        if shift is not None:
            p = p + shift
        r = np.asarray(radii, float) * np.exp(rng.normal(0, 0.07))
        tubes[name] = Tube(p, np.broadcast_to(r, (len(p),)).copy(), label, material, env, wall)
        return tubes[name]

    # airways (carina fixed at the origin)
    tr_shift = np.array([rng.normal(0, 2), 0, 0])
    tube("trachea", [[0, -28, 140], [-1, -22, 100], [-2, -14, 55], [-1, -5, 15], [0, 0, 0]], 9.5, L.TRACHEA,
         M.AIRWAY_WALL, env=9.0, wall=2.0, jitter=1.0, shift=np.vstack([np.tile(tr_shift, (4, 1)), [[0, 0, 0]]]))
    tubes["trachea"].points[-1] = 0.0
    tube("bronchus_r", [[0, 0, 0], [-13, 2, -9], [-23, 4, -18], [-30, 6, -34], [-34, 8, -50]], [7.5, 7.5, 7.0, 6.0, 5.5],
         L.MAIN_BRONCHUS_RIGHT, M.AIRWAY_WALL, env=4.0, wall=1.8, jitter=1.0)
    tubes["bronchus_r"].points[0] = 0.0
    tube("bronchus_l", [[0, 0, 0], [17, 2, -11], [33, 4, -24], [43, 6, -33]], [7.0, 6.8, 6.4, 6.0],
         L.MAIN_BRONCHUS_LEFT, M.AIRWAY_WALL, env=4.0, wall=1.8, jitter=1.0)
    tubes["bronchus_l"].points[0] = 0.0
    br, bl = tubes["bronchus_r"].points, tubes["bronchus_l"].points
    tube("rul_bronchus", [br[2], br[2] + [-20, 0, 6], br[2] + [-40, -3, 12]], [5.0, 4.5, 3.5], None, M.AIRWAY_WALL,
         wall=1.5, jitter=1.5)
    tube("rml_bronchus", [br[4], br[4] + [-10, -16, -8], br[4] + [-20, -32, -14]], [4.0, 3.5, 3.0], None, M.AIRWAY_WALL,
         wall=1.2, jitter=1.5)
    tube("rll_bronchus", [br[4], br[4] + [-5, 6, -22], br[4] + [-12, 14, -45]], [5.0, 4.5, 3.5], None, M.AIRWAY_WALL,
         wall=1.5, jitter=1.5)
    tube("lul_bronchus", [bl[3], bl[3] + [14, -12, 4], bl[3] + [28, -22, 10]], [5.0, 4.5, 3.5], None, M.AIRWAY_WALL,
         wall=1.5, jitter=1.5)
    tube("lll_bronchus", [bl[3], bl[3] + [7, 7, -21], bl[3] + [14, 14, -45]], [5.0, 4.5, 3.5], None, M.AIRWAY_WALL,
         wall=1.5, jitter=1.5)

    # esophagus: behind the trachea, slightly left, behind the left atrium, to the hiatus
    tube("esophagus", [[4, -8, 140], [4, -2, 100], [5, 7, 55], [5, 15, 15], [6, 20, -15], [6, 26, -50], [9, 28, -90],
                       [15, 24, -130], [25, 14, -165], [38, 4, -190]], 8.0, L.ESOPHAGUS, M.ESOPHAGUS, env=7.0)

    # aorta: root, ascending, arch over the left main bronchus, descending left of the spine
    arch_dz = rng.normal(0, 5)
    arch = np.array([0, 0, arch_dz])
    tube("aorta", np.array([[5, -26, -58], [-3, -33, -28], [-6, -33, 2], [-2, -28, 21], [9, -15, 30], [20, 0, 28],
                            [25, 13, 18], [26, 24, 0], [25, 34, -30], [22, 40, -80], [17, 42, -130], [10, 40, -180],
                            [4, 36, -240]]) + np.outer([0, 0.5, 1, 1, 1, 1, 1, 0.6, 0.2, 0, 0, 0, 0], arch),
         [15, 14.5, 14, 13.5, 13, 12.5, 12, 12, 11.5, 11.5, 11, 11, 10.5], L.AORTA, M.BLOOD, env=6.0)
    # pulmonary trunk and arteries
    tube("pulmonary_trunk", [[14, -48, -58], [18, -38, -32], [15, -24, -13]], 14.0, L.PULMONARY_ARTERY, M.BLOOD, env=7.0)
    pt = tubes["pulmonary_trunk"].points[-1]
    tube("lpa", [pt, [30, -9, -4], [46, 3, -8], [58, 8, -20], [68, 8, -38]], [12, 11, 10, 8, 6], L.PULMONARY_ARTERY,
         M.BLOOD, env=5.0)
    tube("rpa", [pt, [0, -14, -15], [-18, -9, -17], [-36, -6, -19], [-52, -6, -25], [-64, -3, -38]],
         [12, 11, 11, 10, 8, 6], L.PULMONARY_ARTERY, M.BLOOD, env=5.0)
    # systemic veins
    tube("svc", [[-28, -24, 56], [-29, -22, 22], [-28, -18, -15], [-26, -14, -42]], 10.0, L.SUPERIOR_VENA_CAVA,
         M.BLOOD, env=6.0)
    svc_top = tubes["svc"].points[0]
    lbcv_z = 56.0 + rng.normal(0, 4)
    tube("bcv_r", [[-42, -26, 135], [-36, -26, 90], svc_top], 8.0, L.BRACHIOCEPHALIC_VEIN_RIGHT, M.BLOOD, env=5.0)
    tube("bcv_l", [[78, -24, lbcv_z + 34], [45, -34, lbcv_z + 14], [12, -37, lbcv_z + 2], [-14, -31, lbcv_z - 2], svc_top],
         7.0, L.BRACHIOCEPHALIC_VEIN_LEFT, M.BLOOD, env=5.0)
    tube("ivc", [[-24, -6, -112], [-21, 0, -150], [-18, 6, -240]], 11.0, L.INFERIOR_VENA_CAVA, M.BLOOD)
    az_z = 10.0 + rng.normal(0, 3)
    tube("azygos", [[-8, 36, -240], [-8, 33, -150], [-10, 28, -60], [-12, 24, az_z - 14], [-17, 16, az_z],
                    [-24, 2, az_z + 2], [-28, -10, az_z + 2], [-28, -17, az_z]], 4.5, L.AZYGOS, M.BLOOD, env=3.0,
         jitter=1.0)
    # arch branches
    ap = tubes["aorta"].points
    bt0 = ap[3] + [4, 2, 10]
    tube("brachiocephalic_trunk", [bt0, bt0 + [-8, 4, 24], bt0 + [-16, 8, 46]], 7.0, L.BRACHIOCEPHALIC_TRUNK,
         M.BLOOD, env=5.0)
    split = tubes["brachiocephalic_trunk"].points[-1]
    tube("subclavian_r", [split, split + [-26, 8, 14], split + [-62, 18, 18]], 5.0, L.SUBCLAVIAN_ARTERY_RIGHT,
         M.BLOOD, env=3.0)
    tube("carotid_r", [split, split + [-4, 2, 30], split + [-6, 4, 70]], 4.5, L.COMMON_CAROTID_ARTERY_RIGHT,
         M.BLOOD, env=3.0)
    lc0 = ap[4] + [2, -2, 11]
    tube("carotid_l", [lc0, lc0 + [4, 3, 32], lc0 + [8, 6, 100]], 4.5, L.COMMON_CAROTID_ARTERY_LEFT, M.BLOOD, env=3.0)
    ls0 = ap[5] + [0, 0, 11]
    tube("subclavian_l", [ls0, ls0 + [8, 4, 34], ls0 + [22, 8, 62], ls0 + [58, 10, 72]], 5.0,
         L.SUBCLAVIAN_ARTERY_LEFT, M.BLOOD, env=3.0)

    # heart: ventricles along a long axis towards the apex (left, anterior, inferior), atria
    hs = float(np.exp(rng.normal(0, 0.07)))
    axis = np.array([0.62, -0.45, -0.62]) + rng.normal(0, 0.08, 3)
    heart = {"center": np.array([24, -34, -82]) + _jit(rng, 4), "semi": np.array([62, 46, 42]) * hs,
             "axis": axis / np.linalg.norm(axis), "roll": rng.normal(0, 0.2), "wall": 9.0,
             "la_center": np.array([4, 0, -50]) + _jit(rng, 2), "la_semi": np.array([32, 16, 15]) * hs,
             "ra_center": np.array([-34, -20, -68]) + _jit(rng, 3), "ra_semi": np.array([22, 22, 28]) * hs}
    # pulmonary veins into the left atrium
    la = heart["la_center"]
    for i, (side, dz) in enumerate([(-1, 12), (-1, -8), (1, 12), (1, -8)]):
        start = la + [side * 48, 2 + (dz < 0) * 12, dz + 20]
        tube(f"pv{i}", [start, la + [side * 24, 2, dz * 0.5]], 6.0, L.PULMONARY_VEIN, M.BLOOD, env=0.0)

    # clavicles
    for side, lab in ((1, L.CLAVICULA_LEFT), (-1, L.CLAVICULA_RIGHT)):
        tube(f"clavicle_{side}", [[side * 22, sternum["y_mid"] + 6, sternum["z_top"] + 6],
                                  [side * 60, sternum["y_mid"] + 8, sternum["z_top"] + 18],
                                  [side * 110, sternum["y_mid"] + 20, sternum["z_top"] + 22],
                                  [side * 148, sternum["y_mid"] + 48, sternum["z_top"] + 28]], 7.0, lab, M.BONE_CORTEX)

    model = AnatomyModel(body, cavity, diaphragm, spine, vert, tubes, heart, sternum)
    model.landmarks = _landmarks(model)
    return model


def _landmarks(m: AnatomyModel) -> dict:
    """Landmark heights and positions used by the IASLC station definitions."""
    t = m.tubes
    az = t["azygos"]
    arch_pts = t["aorta"].points[3:8]
    lbcv = t["bcv_l"]
    xs = lbcv.points[:, 0]
    order = np.argsort(xs)
    lbcv_z_at_trachea = float(np.interp(0.0, xs[order], lbcv.points[order, 2]))
    lpa = t["lpa"]
    return {
        "carina": np.zeros(3),
        "z_azygos_lower": float(az.points[4:, 2].min() - az.radii[-1]),
        "z_lbcv_caudal": lbcv_z_at_trachea - float(lbcv.radii[0]),
        "z_arch_top": float(arch_pts[:, 2].max() + t["aorta"].radii[4]),
        "z_arch_bottom": float(arch_pts[:, 2].max() - t["aorta"].radii[4]),
        "z_lpa_top": float(lpa.points[:3, 2].max() + lpa.radii[1]),
        "z_manubrium_top": float(m.sternum["z_top"]),
        "z_la_top": float(m.heart["la_center"][2] + m.heart["la_semi"][2]),
        "trachea_radius": float(t["trachea"].radii[0]),
        "rul_origin": t["bronchus_r"].points[2].copy(),
        "rml_origin": t["bronchus_r"].points[4].copy(),
        "left_split": t["bronchus_l"].points[3].copy(),
    }


def paint_anatomy(canvas: Canvas, m: AnatomyModel) -> np.ndarray:
    """Paint everything except the lungs; returns the mediastinal envelope (bool) used to carve the lungs."""
    env = np.zeros(canvas.grid.shape, bool)
    _paint_body(canvas, m)
    _paint_abdomen(canvas, m)
    _paint_spine(canvas, m)
    _paint_heart(canvas, m, env)
    _paint_mediastinal_slab(canvas, m, env)
    order = ["ivc", "azygos", "pv0", "pv1", "pv2", "pv3", "aorta", "brachiocephalic_trunk", "subclavian_r", "carotid_r",
             "carotid_l", "subclavian_l", "svc", "bcv_r", "bcv_l", "pulmonary_trunk", "lpa", "rpa", "esophagus",
             "trachea", "bronchus_r", "bronchus_l", "rul_bronchus", "rml_bronchus", "rll_bronchus", "lul_bronchus",
             "lll_bronchus"]
    for name in order:
        tb = m.tubes[name]
        if tb.env_margin > 0:
            sl, sdf = canvas.tube_sdf(tb.points, tb.radii, pad=tb.env_margin)
            if sl is None:
                continue
            env[sl] |= sdf <= tb.env_margin
            canvas.paint(sl, sdf <= 0, tb.label, tb.material)
        else:
            sl, sdf = canvas.paint_tube(tb.points, tb.radii, tb.label, tb.material)
        if sl is None:
            continue
        if tb.wall > 0:
            canvas.paint(sl, sdf <= -tb.wall, None, M.AIR)
        elif name == "esophagus":  # a thin collapsed air line in the lumen
            canvas.paint(sl, sdf <= -(tb.radii.min() - 1.6), None, M.AIR)
    _paint_thyroid(canvas, m)
    _paint_sternum_ribs(canvas, m)
    for side in (1, -1):
        tb = m.tubes[f"clavicle_{side}"]
        canvas.paint_tube(tb.points, tb.radii, tb.label, M.BONE_CORTEX, lumen=2.5, lumen_material=M.BONE_MARROW)
    return env


def _paint_body(c: Canvas, m: AnatomyModel) -> None:
    b = m.body
    sl = c.box([-b["a"], b["yc"] - b["b"], -400], [b["a"], b["yc"] + b["b"], 400])
    if sl is None:
        return
    x, y, z = c.full_coords(sl)
    p = b["p"]
    r_body = (np.abs(x) / b["a"]) ** p + (np.abs(y - b["yc"]) / b["b"]) ** p
    inner = (np.abs(x) / (b["a"] - b["fat"])) ** p + (np.abs(y - b["yc"]) / (b["b"] - b["fat"] * 0.8)) ** p
    lab, mat = c.label[sl], c.material[sl]
    body = r_body <= 1.0
    mat[body] = M.FAT
    mat[(inner <= 1.0) & body] = M.MUSCLE
    # thoracic cavity content (mediastinal fat for now; lungs are carved later)
    ca, cb = m.cavity_ab(z)
    cav = ((x / np.maximum(ca, 1e-3)) ** 2 + ((y - m.cavity["yc"]) / np.maximum(cb, 1e-3)) ** 2 <= 1.0) & body
    mat[cav] = M.FAT
    # back muscles (autochthon) beside the spinous processes
    ys = m.spine_y(z)
    back = body & (np.abs(x) > 6) & (np.abs(x) < 58) & (y > ys + m.spine_r(z) + 6) & ~cav
    back &= ((np.abs(x) - 32) / 26.0) ** 2 + ((y - (ys + m.spine_r(z) + 36)) / 28.0) ** 2 <= 1.0
    lab[back & (x > 0)] = L.AUTOCHTHON_LEFT
    lab[back & (x < 0)] = L.AUTOCHTHON_RIGHT
    mat[back] = M.MUSCLE
    # neck / shoulder soft tissue above the lung apices stays muscle/fat


def _paint_abdomen(c: Canvas, m: AnatomyModel) -> None:
    d = m.diaphragm
    top = max(d["zR"], d["zL"]) + 2
    sl = c.box([-m.body["a"], m.body["yc"] - m.body["b"], -400], [m.body["a"], m.body["yc"] + m.body["b"], top])
    if sl is None:
        return
    x, y, z = c.full_coords(sl)
    ca, cb = m.cavity_ab(np.minimum(z, 0))
    inside = (x / ca) ** 2 + ((y - m.cavity["yc"]) / cb) ** 2 <= 1.0
    below = z < m.diaphragm_z(x, y)
    region = inside & below
    lab, mat = c.label[sl], c.material[sl]
    liver = region & (x < 28 - 0.25 * (y + 20))
    lab[liver] = L.LIVER
    mat[liver] = M.LIVER
    other = region & ~liver
    mat[other] = M.SOFT
    # stomach with a gas cap, spleen posterior-left
    zs = d["zL"] - 42
    q = ((x - 62) / 42) ** 2 + ((y + 8) / 38) ** 2 + ((z - zs) / 34) ** 2
    st = region & (q <= 1)
    lab[st] = L.STOMACH
    mat[st] = M.STOMACH
    mat[st & (q <= 0.55) & (z > zs + 8)] = M.AIR
    q = ((x - 88) / 24) ** 2 + ((y - 58) / 38) ** 2 + ((z - (d["zL"] - 48)) / 45) ** 2
    sp = region & (q <= 1) & ~st
    lab[sp] = L.SPLEEN
    mat[sp] = M.SPLEEN


def _paint_spine(c: Canvas, m: AnatomyModel) -> None:
    for name, zb, zt in m.vertebrae:
        lab_id = L.vertebra_id(name)
        zc = 0.5 * (zb + zt)
        r = float(m.spine_r(zc))
        ysc = float(m.spine_y(zc))
        sl = c.box([-1.2 * r - 30, ysc - r - 6, zb - 12], [1.2 * r + 30, ysc + r + 55, zt + 4])
        if sl is None:
            continue
        x, y, z = c.full_coords(sl)
        ys = m.spine_y(z)
        inz = (z >= zb) & (z <= zt)
        q = (x / (1.2 * r)) ** 2 + ((y - ys) / r) ** 2
        body = (q <= 1.0) & inz
        marrow = body & ((x / (1.2 * r - 2.2)) ** 2 + ((y - ys) / (r - 2.2)) ** 2 <= 1.0) & (z > zb + 1.5) & (z < zt - 1.5)
        yc = ys + r + 8.0
        rc2 = x * x + (y - yc) ** 2
        canal = rc2 <= 8.0**2
        arch = (rc2 <= 13.5**2) & ~canal & (y > ys + r - 3) & (z > zb + 2) & (z < zt - 1)
        spinous = (np.abs(x) < 4.0) & (y > yc + 8) & (y < yc + 38) & (z < zt - 6 - 0.35 * (y - yc)) & \
                  (z > zb - 10 - 0.35 * (y - yc))
        transverse = (np.abs(y - yc + 2) < 4.5) & (np.abs(x) > 8) & (np.abs(x) < 1.2 * r + 12) & (z > zb + 6) & (z < zt - 5)
        bone = body | arch | spinous | transverse
        lab, mat = c.label[sl], c.material[sl]
        lab[bone] = lab_id
        mat[bone] = M.BONE_CORTEX
        mat[marrow] = M.BONE_MARROW
    # spinal cord through the canal over the whole field
    sl = c.box([-12, -20, -400], [12, 120, 400])
    if sl is not None:
        x, y, z = c.full_coords(sl)
        yc = m.spine_y(z) + m.spine_r(z) + 8.0
        rc2 = x * x + (y - yc) ** 2
        lab, mat = c.label[sl], c.material[sl]
        mat[rc2 <= 7.5**2] = M.SOFT
        cord = rc2 <= 4.8**2
        lab[cord] = L.SPINAL_CORD
        mat[cord] = M.CORD


def _paint_heart(c: Canvas, m: AnatomyModel, env: np.ndarray) -> None:
    h = m.heart
    rot = rotation_from_axis(h["axis"], h["roll"])
    for center, semi, mat_outer in ((h["la_center"], h["la_semi"], M.BLOOD), (h["ra_center"], h["ra_semi"], M.BLOOD),
                                    (h["center"], h["semi"], M.MYOCARDIUM)):
        r = rot if mat_outer == M.MYOCARDIUM else None
        sl, mask = c.ellipsoid_mask(center, np.asarray(semi) + 9.0, r)
        if sl is not None:
            env[sl] |= mask
        c.paint_ellipsoid(center, semi, L.HEART, mat_outer, r)
    inner = np.asarray(h["semi"]) - np.array([h["wall"] * 1.4, h["wall"], h["wall"]])
    c.paint_ellipsoid(h["center"] - 6.0 * h["axis"], inner, L.HEART, M.BLOOD, rot)


def _paint_mediastinal_slab(c: Canvas, m: AnatomyModel, env: np.ndarray) -> None:
    """Mediastinal fat between the lungs: a midline slab from sternum to spine and the prevascular space."""
    sl = c.box([-45, -110, -260], [45, 110, 150])
    if sl is None:
        return
    x, y, z = c.full_coords(sl)
    xt, _ = m.trachea_xy(np.clip(z, 0, 140))
    ys = m.spine_y(z) - m.spine_r(z)
    st = m.sternum_y(z) + m.sternum["half_thick"]
    slab = (np.abs(x - xt) < 16.0) & (y > st - 4) & (y < ys + 8) & (z > m.diaphragm_z(x, y))
    prevasc = (np.abs(x - 2) < 32.0 - np.clip(-z, 0, 60) * 0.2) & (y > st - 4) & (y < -28) & (z > -40) & \
              (z < m.sternum["z_top"] + 10)
    env[sl] |= slab | prevasc


def _paint_thyroid(c: Canvas, m: AnatomyModel) -> None:
    xt, yt = m.trachea_xy(np.array(118.0))
    for side in (1, -1):
        c.paint_ellipsoid([float(xt) + side * 17, float(yt) - 2, 122], [9, 9, 20], L.THYROID_GLAND, M.THYROID,
                          only_empty=True)


def _paint_sternum_ribs(c: Canvas, m: AnatomyModel) -> None:
    s = m.sternum
    sl = c.box([-30, -200, s["z_bottom"]], [30, 100, s["z_top"]])
    if sl is not None:
        x, y, z = c.full_coords(sl)
        yc = m.sternum_y(z)
        half_w = np.where(z > s["z_manubrium"], 26.0 - (z - s["z_manubrium"]) * 0.15, 15.0)
        ht = np.where(z > s["z_manubrium"], s["half_thick"] + 1.5, s["half_thick"])
        bone = (np.abs(x) <= half_w) & (np.abs(y - yc) <= ht) & (z >= s["z_bottom"]) & (z <= s["z_top"])
        marrow = bone & (np.abs(x) <= half_w - 2) & (np.abs(y - yc) <= ht - 2)
        lab, mat = c.label[sl], c.material[sl]
        lab[bone] = L.STERNUM
        mat[bone] = M.BONE_CORTEX
        mat[marrow] = M.BONE_MARROW
    verts = {name: (zb, zt) for name, zb, zt in m.vertebrae}
    yc_cav = m.cavity["yc"]
    for k in range(1, 13):
        zb, zt = verts[f"T{k}"]
        z0 = 0.5 * (zb + zt)
        drop = 35.0 + 9.0 * k
        theta_end = 2.55 if k <= 7 else (2.3 if k <= 10 else (1.8 if k == 11 else 1.3))
        for side in (1, -1):
            a0, _ = m.cavity_ab(np.array(z0))
            r_sp = float(m.spine_r(z0))
            th0 = float(np.arcsin(np.clip((1.2 * r_sp + 16) / (float(a0) + 7), 0, 0.95)))
            thetas = np.linspace(th0, theta_end, 10)
            pts = []
            for th in thetas:
                z = z0 - drop * (th / np.pi) ** 1.4
                a, b = m.cavity_ab(np.array(max(z, -60.0)))
                a = max(float(a), 30.0)
                b = max(float(b), 30.0)
                pts.append([side * (a + 7) * np.sin(th), yc_cav + (b + 6) * np.cos(th), z])
            pts = np.array(pts)
            rid = L.rib_id("L" if side > 0 else "R", k)
            c.paint_tube(pts, 4.8, rid, M.BONE_CORTEX, lumen=2.2, lumen_material=M.BONE_MARROW)
            if k <= 7:  # costal cartilage to the sternum
                zs = min(s["z_top"] - 8 - 22 * (k - 1), s["z_top"] - 8)
                zs = max(zs, s["z_bottom"] + 6)
                end = [side * (15 if zs < s["z_manubrium"] else 24), float(m.sternum_y(np.array(zs))), zs]
                c.paint_tube([pts[-1], end], 4.0, L.COSTAL_CARTILAGES, M.CARTILAGE, only_empty=True)


def cavity_mask(c: Canvas, m: AnatomyModel) -> np.ndarray:
    """Thoracic cavity above the diaphragm (lungs and mediastinum), not behind the vertebral bodies."""
    x, y, z = c.cx, c.cy, c.cz
    ca, cb = m.cavity_ab(z)
    cav = (x / np.maximum(ca, 1e-3)) ** 2 + ((y - m.cavity["yc"]) / np.maximum(cb, 1e-3)) ** 2 <= 1.0
    cav &= z > m.diaphragm_z(x, y) + 1.0
    cav &= ~((np.abs(x) < 1.2 * m.spine_r(z) + 6) & (y > m.spine_y(z) - m.spine_r(z) - 4))
    return cav


def assign_lungs(c: Canvas, m: AnatomyModel, lung_space: np.ndarray, exclude: np.ndarray | None = None) -> None:
    """Lung lobes = ``lung_space`` (cavity outside the mediastinal envelope) minus all other labels and ``exclude``."""
    x, y, z = c.cx, c.cy, c.cz
    lab, mat = c.label, c.material
    lung = lung_space & (lab == 0)
    if exclude is not None:
        lung &= ~exclude
    right = x < m.trachea_xy(np.clip(z, 0, 140))[0]
    oblique_r = z < -45.0 + 0.93 * y
    oblique_l = z < -38.0 + 0.93 * y
    horizontal = z < -22.0
    lobe = np.where(right, np.where(oblique_r, L.LUNG_LOWER_LOBE_RIGHT,
                                    np.where(horizontal, L.LUNG_MIDDLE_LOBE_RIGHT, L.LUNG_UPPER_LOBE_RIGHT)),
                    np.where(oblique_l, L.LUNG_LOWER_LOBE_LEFT, L.LUNG_UPPER_LOBE_LEFT)).astype(np.uint8)
    lab[lung] = lobe[lung]
    keep = (mat == M.AIR) | (mat == M.AIRWAY_WALL)
    mat[lung & ~keep] = M.LUNG
