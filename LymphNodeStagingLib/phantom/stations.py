"""Placement of the 17 IASLC lymph node stations relative to the phantom's anatomy.

Each station is an implicit region in canonical millimetres bounded by the landmarks of its IASLC definition
(e.g. 4R: right of the left tracheal border, between the lower border of the azygos arch and the caudal margin of
the left brachiocephalic vein). A station only takes voxels that are fat or unlabelled soft tissue: never an airway,
vessel, the heart, the esophagus or bone. Mediastinal stations stay inside the mediastinal envelope; the hilar and
interlobar stations (10, 11) and the pulmonary ligament (9) may take lung voxels (they are carved out of the lung).
Stations are built in a fixed priority order and each takes only free voxels, so they never overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..staging.stations import parse_station
from .anatomy import AnatomyModel
from .geometry import Canvas, segment_distance
from .materials import Material as M

#: Build order (earlier stations win contested voxels).
PRIORITY: tuple[str, ...] = ("7", "10R", "10L", "11R", "11L", "4R", "4L", "2R", "2L", "5", "6", "3P", "3A", "8", "9",
                             "1R", "1L")
#: Stations that may take lung voxels (hilum, interlobar, pulmonary ligament).
LUNG_STATIONS: frozenset[str] = frozenset({"10R", "10L", "11R", "11L", "9"})
_FREE_MATERIALS = (M.FAT, M.MUSCLE, M.SOFT)


def _definitions(m: AnatomyModel) -> dict[str, tuple[list, list, Callable]]:
    """name -> (canonical box lo, hi, mask function f(x, y, z) -> bool)."""
    lm = m.landmarks
    rt = lm["trachea_radius"]
    z_az, z_bcv, z_man = lm["z_azygos_lower"], lm["z_lbcv_caudal"], lm["z_manubrium_top"]
    z_at, z_ab, z_lpa, z_la = lm["z_arch_top"], lm["z_arch_bottom"], lm["z_lpa_top"], lm["z_la_top"]
    tr = m.trachea_xy
    br = m.tubes["bronchus_r"].points
    bl = m.tubes["bronchus_l"].points
    eso = m.tubes["esophagus"].points
    eso_o = np.argsort(eso[:, 2])

    def eso_xy(z):
        return np.interp(z, eso[eso_o, 2], eso[eso_o, 0]), np.interp(z, eso[eso_o, 2], eso[eso_o, 1])

    def zr(z, lo, hi):
        return (z >= lo) & (z < hi)

    def para_r(x, y, z):  # right paratracheal / pretracheal, up to the left tracheal border
        xt, yt = tr(np.clip(z, 0, 150))
        return (x >= xt - 38) & (x < xt + rt) & (y > yt - 24) & (y < yt + 6)

    def para_l(x, y, z, width):
        xt, yt = tr(np.clip(z, 0, 150))
        return (x >= xt + rt) & (x < xt + rt + width) & (y > yt - 20) & (y < yt + 8)

    defs: dict[str, tuple[list, list, Callable]] = {}
    defs["1R"] = ([-60, -60, z_man - 5], [0, 30, z_man + 40],
                  lambda x, y, z: zr(z, z_man, z_man + 38) & (x < tr(z)[0] - rt - 2) & (x > tr(z)[0] - 52)
                  & (np.abs(y - tr(z)[1]) < 22))
    defs["1L"] = ([0, -60, z_man - 5], [60, 30, z_man + 40],
                  lambda x, y, z: zr(z, z_man, z_man + 38) & (x > tr(z)[0] + rt + 2) & (x < tr(z)[0] + 52)
                  & (np.abs(y - tr(z)[1]) < 22))
    defs["2R"] = ([-50, -50, z_bcv - 2], [15, 20, z_man + 2], lambda x, y, z: zr(z, z_bcv, z_man) & para_r(x, y, z))
    defs["2L"] = ([0, -45, z_at - 2], [45, 25, z_man + 2], lambda x, y, z: zr(z, z_at, z_man) & para_l(x, y, z, 28))
    defs["4R"] = ([-50, -50, z_az - 2], [15, 20, z_bcv + 2], lambda x, y, z: zr(z, z_az, z_bcv) & para_r(x, y, z))
    defs["4L"] = ([0, -40, z_lpa - 2], [35, 25, z_at + 2], lambda x, y, z: zr(z, z_lpa, z_at) & para_l(x, y, z, 14))

    def st3a(x, y, z):
        st = m.sternum_y(z) + m.sternum["half_thick"]
        return zr(z, 0, z_man) & (y > st) & (y < -38) & (np.abs(x - 2) < 24)

    defs["3A"] = ([-35, -110, -2], [40, -30, z_man + 2], st3a)

    def st3p(x, y, z):
        xt, yt = tr(np.clip(z, 0, 150))
        return zr(z, 0, z_man + 20) & (np.abs(x - xt) < 15) & (y >= yt + rt - 1) & (y < yt + rt + 22)

    defs["3P"] = ([-25, -40, -2], [25, 50, z_man + 22], st3p)
    defs["5"] = ([5, -40, z_lpa - 4], [65, 15, z_ab + 4],
                 lambda x, y, z: zr(z, z_lpa - 2, z_ab + 2) & (x >= tr(np.clip(z, 0, 150))[0] + rt + 14)
                 & (x < tr(np.clip(z, 0, 150))[0] + rt + 48) & (y > -32) & (y < 8))
    defs["6"] = ([10, -75, z_ab - 12], [65, -15, z_at + 6],
                 lambda x, y, z: zr(z, z_ab - 10, z_at + 5) & (x >= 14) & (x < 56) & (y > -64) & (y < -20))
    defs["7"] = ([-25, -15, z_la - 4], [25, 25, 0],
                 lambda x, y, z: zr(z, z_la - 2, -3) & (np.abs(x) < 22) & (y > -10) & (y < 22))

    def st8(x, y, z):
        ex, ey = eso_xy(z)
        d = np.sqrt((x - ex) ** 2 + (y - ey) ** 2)
        return zr(z, -115, z_la - 2) & (d < 17)

    defs["8"] = ([-30, -10, -118], [50, 60, z_la], st8)

    def st9(x, y, z):
        ex, ey = eso_xy(z)
        dx = np.abs(x - ex)
        return zr(z, -140, -85) & (dx >= 13) & (dx < 30) & (y > ey - 4) & (y < ey + 16)

    defs["9"] = ([-60, -20, -148], [80, 70, -72], st9)
    defs["10R"] = ([-55, -20, -32], [0, 25, z_az + 2],
                   lambda x, y, z: zr(z, -28, z_az) & (x < -9) & (segment_distance(x, y, z, br[:3]) < 16))
    defs["10L"] = ([5, -20, -40], [65, 25, z_lpa + 2],
                   lambda x, y, z: zr(z, -36, z_lpa) & (x > 12) & (segment_distance(x, y, z, bl) < 16))
    rul, rml, ls = lm["rul_origin"], lm["rml_origin"], lm["left_split"]
    defs["11R"] = ([rml[0] - 30, -30, rml[2] - 22], [rul[0] + 5, 30, rul[2] + 2],
                   lambda x, y, z: (z < rul[2] - 4) & (x < rul[0] + 2)
                   & (segment_distance(x, y, z, [rul + [-6, 0, -4], rml + [-4, 0, -8]]) < 14))
    defs["11L"] = ([ls[0] - 12, ls[1] - 30, ls[2] - 30], [ls[0] + 30, ls[1] + 30, ls[2] + 20],
                   lambda x, y, z: (x > ls[0] - 6) & (segment_distance(x, y, z, [ls + [4, 0, 2], ls + [12, 2, -10]]) < 15))
    return defs


def place_stations(canvas: Canvas, m: AnatomyModel, lung_space: np.ndarray) -> np.ndarray:
    """The station label map (uint8, values = catalogue labels 1..17) on the canvas grid.

    ``lung_space`` marks the future lungs (cavity outside the mediastinal envelope); only LUNG_STATIONS enter it.
    """
    out = np.zeros(canvas.grid.shape, np.uint8)
    free = (canvas.label == 0) & np.isin(canvas.material, _FREE_MATERIALS)
    defs = _definitions(m)
    for name in PRIORITY:
        lo, hi, fn = defs[name]
        sl = canvas.box(lo, hi)
        if sl is None:
            continue
        x, y, z = canvas.full_coords(sl)
        mask = np.broadcast_to(fn(x, y, z), out[sl].shape) & free[sl] & (out[sl] == 0)
        if name not in LUNG_STATIONS:
            mask &= ~lung_space[sl]
        out[sl][mask] = parse_station(name).label
    canvas.material[out > 0] = M.FAT
    return out

