"""Disease model of a phantom patient: primary tumour, lymph nodes, metastatic spread and image-level labels.

Spread follows lymphatic drainage: ipsilateral hilar/interlobar stations first (N1), then ipsilateral mediastinal
stations preferred by the tumour's lobe (N2; a share without N1 = skip metastases), then contralateral or
supraclavicular stations (N3). The station groups come from the rule set, so the stated N-stage is always the one
the rule set gives for the positive stations. Confounders (switchable): small malignant nodes (partial volume),
benign inflammatory nodes with high uptake in a symmetric hilar/mediastinal pattern (some calcified), central
tumours next to the hilum (spill-over), and label noise in the reported station list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from ..anatomy import labels as L
from ..staging.rules import RuleSet
from ..staging.stations import STATION_NAMES, parse_station
from .geometry import Canvas
from .materials import Material as M

#: Relative preference of ipsilateral mediastinal (N2-group) stations by tumour lobe (lymphatic drainage).
DRAINAGE: dict[str, dict[str, float]] = {
    "RUL": {"4R": 0.40, "2R": 0.20, "7": 0.12, "3A": 0.08, "3P": 0.06, "8": 0.04, "9": 0.02, "5": 0.01, "6": 0.01},
    "RML": {"7": 0.30, "4R": 0.30, "2R": 0.10, "8": 0.10, "9": 0.08, "3A": 0.06, "3P": 0.04, "5": 0.01, "6": 0.01},
    "RLL": {"7": 0.35, "4R": 0.20, "8": 0.15, "9": 0.14, "2R": 0.08, "3P": 0.05, "3A": 0.02, "5": 0.005, "6": 0.005},
    "LUL": {"5": 0.30, "6": 0.15, "4L": 0.22, "7": 0.12, "2L": 0.10, "3A": 0.06, "8": 0.03, "9": 0.01, "3P": 0.01},
    "LLL": {"7": 0.33, "4L": 0.18, "5": 0.12, "8": 0.14, "9": 0.13, "2L": 0.05, "6": 0.02, "3A": 0.02, "3P": 0.01},
}
LOBE_IDS: dict[str, int] = {"RUL": L.LUNG_UPPER_LOBE_RIGHT, "RML": L.LUNG_MIDDLE_LOBE_RIGHT,
                            "RLL": L.LUNG_LOWER_LOBE_RIGHT, "LUL": L.LUNG_UPPER_LOBE_LEFT, "LLL": L.LUNG_LOWER_LOBE_LEFT}
#: Stations of the symmetric benign inflammatory pattern (reactive / granulomatous nodes).
INFLAMMATORY_PATTERN: tuple[str, ...] = ("10R", "10L", "11R", "11L", "7", "4R", "4L")


@dataclass
class Node:
    id: int
    station: str
    kind: str  # "malignant", "benign" or "inflammatory"
    short_axis_mm: float
    long_axis_mm: float
    true_suvmax: float
    calcified: bool = False
    centre_mm: list[float] | None = None  # physical LPS point
    voxels: int = 0
    pet_suvmax: float | None = None  # measured on the PET image within the node

    @property
    def malignant(self) -> bool:
        return self.kind == "malignant"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["malignant"] = self.malignant
        return d


@dataclass
class Tumour:
    lobe: str
    diameter_mm: float
    true_suvmax: float
    central: bool
    centre_mm: list[float] | None = None
    voxels: int = 0
    pet_suvmax: float | None = None
    box: tuple | None = field(default=None, repr=False)  # array slices of the tumour's uptake map
    uptake: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("box", "uptake")}


@dataclass
class DiseasePlan:
    side: str
    lobe: str
    n_stage: int
    positive: list[str]
    nodes: list[Node]
    tumour: Tumour
    inflammatory_pattern: bool
    reported_positive: list[str] = field(default_factory=list)
    reported_n_stage: int = 0
    label_noise_applied: bool = False


def _pick(rng: np.random.Generator, weights: dict[str, float], allowed: list[str], k: int) -> list[str]:
    names = [s for s in weights if s in allowed and weights[s] > 0]
    if not names:
        names = list(allowed)
        w = np.ones(len(names))
    else:
        w = np.array([weights[s] for s in names])
    k = min(k, len(names))
    return [str(v) for v in rng.choice(names, size=k, replace=False, p=w / w.sum())]


def _positive_stations(rng: np.random.Generator, n: int, side: str, lobe: str, rules: RuleSet) -> list[str]:
    groups = {k: [STATION_NAMES[i] for i in np.flatnonzero(rules.group_of[side] == k)] for k in (1, 2, 3)}
    pos: set[str] = set()
    n1_w = {f"10{side}": 0.55, f"11{side}": 0.45}
    if n == 1:
        pos.update(_pick(rng, n1_w, groups[1], 1 + int(rng.random() < 0.35)))
    if n >= 2:
        k2 = int(rng.choice([1, 2, 3], p=[0.55, 0.32, 0.13]))
        pos.update(_pick(rng, DRAINAGE[lobe], groups[2], k2))
        if rng.random() < 0.75:  # otherwise a skip metastasis (N2 without N1)
            pos.update(_pick(rng, n1_w, groups[1], 1 + int(rng.random() < 0.4)))
    if n == 3:
        contra = "L" if side == "R" else "R"
        w3 = {f"4{contra}": 0.30, f"10{contra}": 0.22, f"2{contra}": 0.14, f"1{side}": 0.14, f"1{contra}": 0.10,
              f"11{contra}": 0.10}
        pos.update(_pick(rng, w3, groups[3], 1 + int(rng.random() < 0.35)))
        if rng.random() < 0.15:  # N3 without N2 involvement
            pos = {s for s in pos if rules.group(s, side) != 2}
    return sorted(pos, key=lambda s: parse_station(s).label)


def sample_disease(rng: np.random.Generator, config, rules: RuleSet) -> DiseasePlan:
    """Draw tumour, N-stage, positive stations and the nodes of every station (no geometry yet)."""
    side = "R" if rng.random() < config.tumour_side_right else "L"
    lobe = (str(rng.choice(["RUL", "RML", "RLL"], p=[0.5, 0.1, 0.4])) if side == "R"
            else str(rng.choice(["LUL", "LLL"], p=[0.55, 0.45])))
    mix = np.asarray(config.n_stage_mix, float)
    n_target = int(rng.choice(4, p=mix / mix.sum())) if config.disease else 0
    positive = _positive_stations(rng, n_target, side, lobe, rules) if n_target else []
    n_stage = rules.stage(positive, side).n_stage
    inflammatory = bool(config.inflammatory_nodes and rng.random() < 0.3)

    nodes: list[Node] = []
    for name in STATION_NAMES:
        is_pos = name in positive
        count = int(rng.choice([0, 1, 2, 3], p=[0.30, 0.38, 0.22, 0.10]))
        if is_pos:
            count = max(1, count)
        if inflammatory and name in INFLAMMATORY_PATTERN:
            count = max(1, count)
        n_malignant = 0
        if is_pos:
            n_malignant = 1 + int(rng.binomial(count - 1, 0.5)) if count > 1 else 1
        for j in range(count):
            if j < n_malignant:
                kind = "malignant"
            elif config.inflammatory_nodes and ((inflammatory and name in INFLAMMATORY_PATTERN and rng.random() < 0.8)
                                               or rng.random() < 0.06):
                kind = "inflammatory"
            else:
                kind = "benign"
            nodes.append(_node(rng, len(nodes) + 1, name, kind, config))
    d_t = float(np.clip(rng.lognormal(np.log(30.0), 0.35), 14.0, 65.0))
    suv_t = float(np.clip(rng.lognormal(np.log(9.0), 0.35), 4.5, 22.0))
    central = bool(config.spill_over and rng.random() < 0.3)
    tumour = Tumour(lobe, d_t, suv_t, central)
    plan = DiseasePlan(side, lobe, n_stage, positive, nodes, tumour, inflammatory)
    _report(rng, plan, config, rules)
    return plan


def _node(rng: np.random.Generator, nid: int, station: str, kind: str, config) -> Node:
    if kind == "malignant":
        if config.partial_volume and rng.random() < 0.3:
            short = rng.uniform(4.5, 8.0)  # small metastasis: partial-volume diluted
        else:
            short = np.clip(rng.lognormal(np.log(13.0), 0.35), 8.0, 30.0)
        suv = np.clip(rng.lognormal(np.log(3.8 + 0.28 * short), 0.3), 2.5, 18.0)
    elif kind == "inflammatory":
        short = np.clip(rng.lognormal(np.log(9.0), 0.3), 5.0, 18.0)
        suv = np.clip(rng.lognormal(np.log(3.6), 0.3), 2.2, 7.5)
    else:
        short = np.clip(rng.lognormal(np.log(6.0), 0.3), 4.0, 12.0)
        suv = np.clip(rng.lognormal(np.log(1.4), 0.25), 0.8, 2.6)
    long = short * rng.uniform(1.1, 1.7)
    calcified = bool(kind == "inflammatory" and rng.random() < 0.4) or bool(kind == "benign" and rng.random() < 0.05)
    return Node(nid, station, kind, round(float(short), 2), round(float(long), 2), round(float(suv), 3), calcified)


def _report(rng: np.random.Generator, plan: DiseasePlan, config, rules: RuleSet) -> None:
    """Image-level labels as a routine report gives them: with probability label_noise one station is flipped."""
    reported = list(plan.positive)
    flipped = False
    if config.label_noise > 0 and rng.random() < config.label_noise:
        flipped = True
        if reported and rng.random() < 0.5:
            reported.remove(str(rng.choice(reported)))
        else:
            candidates = [s for s in STATION_NAMES if s not in reported]
            reported.append(str(rng.choice(candidates)))
    plan.reported_positive = sorted(reported, key=lambda s: parse_station(s).label)
    plan.reported_n_stage = rules.stage(plan.reported_positive, plan.side).n_stage
    plan.label_noise_applied = flipped


def _ellipsoid_phys(grid, centre, semi, axes):
    """(slices, mask) of an ellipsoid given in physical mm on a grid."""
    sl, q = _ellipsoid_q(grid, centre, semi, axes)
    return sl, (None if q is None else q <= 1.0)


def _ellipsoid_q(grid, centre, semi, axes, sl=None):
    """(slices, quadratic form q) of an ellipsoid in physical mm (q <= 1 inside), on its own box or on ``sl``."""
    sp = np.asarray(grid.spacing)
    if sl is None:
        r = float(max(semi))
        lo = np.maximum(np.floor(grid.index_of(centre - r) - 1).astype(int), 0)
        hi = np.minimum(np.ceil(grid.index_of(centre + r) + 2).astype(int), np.asarray(grid.size))
        if np.any(hi <= lo):
            return None, None
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    x = (grid.origin[0] + sp[0] * np.arange(sl[2].start, sl[2].stop) - centre[0])[None, None, :]
    y = (grid.origin[1] + sp[1] * np.arange(sl[1].start, sl[1].stop) - centre[1])[None, :, None]
    z = (grid.origin[2] + sp[2] * np.arange(sl[0].start, sl[0].stop) - centre[2])[:, None, None]
    q = 0
    for k in range(3):
        proj = x * axes[0, k] + y * axes[1, k] + z * axes[2, k]
        q = q + (proj / semi[k]) ** 2
    return sl, q


def _random_axes(rng: np.random.Generator, tilt: float = 0.35) -> np.ndarray:
    """Orthonormal axes whose third (long) axis is near the body axis."""
    v = np.array([rng.normal(0, tilt), rng.normal(0, tilt), 1.0])
    v /= np.linalg.norm(v)
    a = np.cross(v, [1.0, 0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(v, a)
    phi = rng.uniform(0, np.pi)
    a, b = np.cos(phi) * a + np.sin(phi) * b, -np.sin(phi) * a + np.cos(phi) * b
    return np.stack([a, b, v], axis=1)


def place_tumour(c: Canvas, plan: DiseasePlan, stations: np.ndarray, lesions: np.ndarray,
                 rng: np.random.Generator) -> None:
    """Draw the primary tumour (lobulated, heterogeneous) in its lobe; central tumours next to the hilum."""
    t = plan.tumour
    lobe_id = LOBE_IDS[t.lobe]
    lobe = c.label == lobe_id
    idx = np.flatnonzero(lobe.ravel()[:: max(1, lobe.size // 400000)])
    if idx.size == 0:
        return
    step = max(1, lobe.size // 400000)
    idx = idx * step
    zyx = np.stack(np.unravel_index(idx, lobe.shape), axis=1)
    pts = c.grid.point_of(zyx[:, ::-1])
    radius = t.diameter_mm / 2
    if t.central:
        hil = stations == parse_station(f"10{plan.side}").label
        if hil.any():
            centroid = c.grid.point_of(np.mean(np.argwhere(hil), axis=0)[::-1])
            d = np.linalg.norm(pts - centroid, axis=1)
            ok = (d > radius + 4) & (d < radius + 22)
            if ok.any():
                pts = pts[ok]
    else:
        # peripheral: stay away from the lobe's border so most of the tumour is inside the lobe
        dist = ndimage.distance_transform_edt(lobe[::2, ::2, ::2], sampling=np.asarray(c.grid.spacing)[::-1] * 2)
        deep = dist[tuple((zyx // 2).T)] > min(radius * 0.8, dist.max() * 0.7)
        if deep.any():
            pts = pts[deep]
    centre = pts[rng.integers(len(pts))]
    axes = _random_axes(rng, 0.6)
    lobes = [(centre, np.array([radius, radius * rng.uniform(0.8, 1.0), radius * rng.uniform(0.85, 1.15)]))]
    for _ in range(int(rng.integers(1, 4))):
        lobes.append((centre + rng.normal(0, radius * 0.45, 3), np.full(3, radius * rng.uniform(0.4, 0.7))))
    sl_total, q_main = _ellipsoid_q(c.grid, centre, np.full(3, radius * 1.8), np.eye(3))
    if sl_total is None:
        return
    mask_total = np.zeros(c.label[sl_total].shape, bool)
    for cen, semi in lobes:
        _, q = _ellipsoid_q(c.grid, cen, semi, axes, sl=sl_total)
        mask_total |= q <= 1.0
    _, q_main = _ellipsoid_q(c.grid, centre, lobes[0][1], axes, sl=sl_total)
    lab = c.label[sl_total]
    mask_total &= lab == lobe_id
    c.material[sl_total][mask_total] = M.TUMOUR
    lesions[sl_total][mask_total] = 1
    # uptake: rim-enhanced, a necrotic core in large tumours
    uptake = np.clip(0.75 + 0.35 * np.sqrt(np.clip(q_main, 0, 1)), 0, 1.0) * t.true_suvmax
    if t.diameter_mm > 35:
        uptake = np.where(q_main < 0.12, 1.2, uptake)
    t.box = sl_total
    t.uptake = np.where(mask_total, uptake, 0.0).astype(np.float32)
    t.centre_mm = [round(float(v), 2) for v in centre]
    t.voxels = int(mask_total.sum())


def place_nodes(c: Canvas, plan: DiseasePlan, stations: np.ndarray, nodes_map: np.ndarray, lesions: np.ndarray,
                rng: np.random.Generator) -> None:
    """Draw every node inside its station; a node may push its station into free fat or lung, never into an organ,
    another station or another node. Node voxels join the station."""
    free_mat = np.isin(c.material, (M.FAT, M.MUSCLE, M.SOFT, M.LUNG))
    sp = np.asarray(c.grid.spacing)
    by_station: dict[str, list[Node]] = {}
    for n in plan.nodes:
        by_station.setdefault(n.station, []).append(n)
    objs = ndimage.find_objects(stations, max_label=17)
    for name, nodes in by_station.items():
        lab = parse_station(name).label
        box = objs[lab - 1]
        if box is None:
            continue
        pad = 8
        box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, stations.shape, strict=False))
        st_box = stations[box]
        own = st_box == lab
        depth = ndimage.distance_transform_edt(own, sampling=sp[::-1])
        for node in sorted(nodes, key=lambda n: -n.short_axis_mm):
            want = node.short_axis_mm / 2
            avail = own & (nodes_map[box] == 0)
            if not avail.any():
                continue
            dmax = float(depth[avail].max())
            cand = np.argwhere(avail & (depth >= min(want, 0.8 * dmax)))
            if cand.size == 0:
                cand = np.argwhere(avail)
            pick = cand[rng.integers(len(cand))]
            centre = c.grid.point_of((pick + [s.start for s in box])[::-1]) + rng.uniform(-0.5, 0.5, 3) * sp
            semi = np.array([node.short_axis_mm / 2, node.short_axis_mm / 2 * rng.uniform(1.0, 1.2),
                             node.long_axis_mm / 2])
            sl, q = _ellipsoid_q(c.grid, centre, semi, _random_axes(rng))
            if sl is None:
                continue
            m = q <= 1.0
            st = stations[sl]
            ok = m & (nodes_map[sl] == 0) & ((st == lab) | ((st == 0) & free_mat[sl] &
                                                              ((c.label[sl] == 0) | np.isin(c.label[sl], L.LUNG_IDS))))
            if not ok.any():
                continue
            nodes_map[sl][ok] = node.id
            st[ok] = lab
            c.label[sl][ok] = 0
            c.material[sl][ok] = M.NODE
            if node.calcified:
                core = ok & (q <= rng.uniform(0.2, 0.6))  # central or complete calcification
                c.material[sl][core] = M.NODE_CALCIFIED
            if node.malignant:
                lesions[sl][ok] = 1
            node.centre_mm = [round(float(v), 2) for v in centre]
            node.voxels = int(ok.sum())
            own = stations[box] == lab
