"""generate_patient: one synthetic thoracic FDG PET/CT with anatomy, stations, nodes, tumour and ground truth."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import UsageError
from ..staging.rules import DEFAULT_RULES, N_STAGES, load_rules
from ..staging.stations import STATIONS
from . import anatomy as anat
from . import disease as dis
from .formation import Physiology, activity_map, make_ct, make_pet, pet_grid_for, sample_image_max
from .geometry import Canvas, Frame, Grid
from .stations import place_stations

log = logging.getLogger(__name__)

GENERATOR = "lnstaging-phantom"
GENERATOR_VERSION = "1.0"


#: Grid presets: CT spacing (mm), CT box in body millimetres around the carina (x, y, z ranges), PET spacing.
SIZES: dict[str, dict] = {
    "small": {"ct_spacing": (2.0, 2.0, 4.0), "box": ((-90, 90), (-86, 74), (-136, 124)), "pet_spacing": (6.0, 6.0, 6.0)},
    "full": {"ct_spacing": (1.0, 1.0, 3.0), "box": ((-192, 192), (-130, 190), (-235, 131)), "pet_spacing": (4.0, 4.0, 4.0)},
    # atlas: mediastinal crop at 2 mm isotropic (for the bundled synthetic atlas set)
    "atlas": {"ct_spacing": (2.0, 2.0, 2.0), "box": ((-90, 90), (-86, 74), (-136, 124)), "pet_spacing": (6.0, 6.0, 6.0)},
}


@dataclass
class PhantomConfig:
    """Generator parameters; every confounder is switchable and on by default."""

    n_stage_mix: tuple[float, float, float, float] = (0.55, 0.12, 0.23, 0.10)  # N0..N3 (paper's cN distribution)
    rules: str = DEFAULT_RULES
    tumour_side_right: float = 0.55
    disease: bool = True  # False: no tumour, no nodes (atlases)
    partial_volume: bool = True  # small malignant nodes (4.5-8 mm), diluted by the PSF
    inflammatory_nodes: bool = True  # benign high-uptake nodes, symmetric pattern, some calcified
    spill_over: bool = True  # central tumours next to the hilum (myocardial spill-over is always physical)
    physiological_uptake: bool = True  # blood pool, myocardium, esophagus uptake (off: SUV 1.0)
    label_noise: float = 0.05  # fraction of patients whose reported station list has one station flipped
    deformation_mm: float = 4.0  # amplitude of the smooth random displacement field
    ct_noise_hu: float | None = None  # None: random 10-20 HU per patient; 0: noise-free
    pet_noise: bool = True
    psf_fwhm_mm: float = 6.0
    #: 0: the standard ranges. > 0: a shifted cohort (see :class:`Shift`) that moves and widens what a real scanner
    #: and population vary; 1 is the reference strength. Drawn from a stream of its own, so shift 0 gives the same
    #: bytes as before.
    shift: float = 0.0

    def validate(self) -> None:
        mix = np.asarray(self.n_stage_mix, float)
        if mix.shape != (4,) or np.any(mix < 0) or mix.sum() <= 0:
            raise UsageError(f"n_stage_mix must be 4 non-negative weights for N0..N3, got {self.n_stage_mix!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise UsageError(f"label_noise must be a fraction in 0..1, got {self.label_noise!r}")
        if not 0.0 <= self.shift <= 2.0:
            raise UsageError(f"shift must be in 0..2 (0: standard, 1: the reference shifted cohort), got {self.shift!r}")
        if not 0.0 <= self.tumour_side_right <= 1.0:
            raise UsageError(f"tumour_side_right must be in 0..1, got {self.tumour_side_right!r}")
        load_rules(self.rules)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhantomPatient:
    """One synthetic patient: images on the CT grid (PET on its own grid) and the ground truth."""

    patient_id: str
    seed: int
    size: str
    ct: sitk.Image  # HU, int16
    pet: sitk.Image  # SUV, float32, own grid
    anatomy: sitk.Image  # uint8, TotalSegmentator 'total' ids (+ phantom ids >= 200)
    stations: sitk.Image  # uint8, catalogue labels 1..17
    nodes: sitk.Image  # uint16, node instance ids (see truth)
    lesions: sitk.Image  # uint8, 1 = malignant node or tumour
    truth: dict
    manifest: dict = field(default_factory=dict)


def patient_seed(cohort_seed: int, index: int) -> int:
    """Seed of patient ``index`` of a cohort (independent streams, stable across cohort sizes)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1)[0])


@dataclass
class Shift:
    """What a shifted cohort changes, per patient, at strength ``k`` (``PhantomConfig.shift``): CT and PET voxel
    spacing x U(1 - 0.2k, 1 + 0.5k); CT noise + U(0, 20k) HU; PSF FWHM x U(1, 1 + 0.5k); benign and inflammatory
    node uptake x U(1, 1 + 0.6k); blood pool and liver x U(1 - 0.1k, 1 + 0.4k); body size x U(1 - 0.1k, 1 + 0.15k);
    position in scanner coordinates + U(-150k, 150k) mm per axis."""

    spacing: float = 1.0
    ct_noise_hu: float = 0.0
    psf: float = 1.0
    benign_uptake: float = 1.0
    background_uptake: float = 1.0
    body: float = 1.0
    position_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @staticmethod
    def sample(rng: np.random.Generator, k: float) -> Shift:
        if k <= 0:
            return Shift()
        u = rng.uniform
        return Shift(round(float(u(1 - 0.2 * k, 1 + 0.5 * k)), 4), round(float(u(0, 20 * k)), 2),
                     round(float(u(1, 1 + 0.5 * k)), 4), round(float(u(1, 1 + 0.6 * k)), 4),
                     round(float(u(1 - 0.1 * k, 1 + 0.4 * k)), 4), round(float(u(1 - 0.1 * k, 1 + 0.15 * k)), 4),
                     tuple(round(float(v), 2) for v in u(-150 * k, 150 * k, 3)))


def build_grid(size: str, offset: np.ndarray, spacing_scale: float = 1.0) -> Grid:
    if size not in SIZES:
        raise UsageError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    p = SIZES[size]
    sp = np.asarray(p["ct_spacing"], float) * float(spacing_scale)
    lo = np.array([b[0] for b in p["box"]], float)
    hi = np.array([b[1] for b in p["box"]], float)
    n = np.round((hi - lo) / sp).astype(int)
    origin = lo + 0.5 * sp + offset
    return Grid(tuple(int(v) for v in n), tuple(float(v) for v in sp), tuple(float(round(v, 3)) for v in origin))


def generate_patient(seed: int, size: str = "small", config: PhantomConfig | None = None,
                     patient_id: str | None = None) -> PhantomPatient:
    """Generate one patient deterministically from ``seed`` (same seed and config, same images)."""
    config = config or PhantomConfig()
    config.validate()
    if size not in SIZES:
        raise UsageError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    seed = int(seed)
    if seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed}")
    rules = load_rules(config.rules)
    children = np.random.SeedSequence(seed).spawn(6)  # the first five are the streams of the standard cohort
    rng_anat, rng_dis, rng_geo, rng_ct, rng_pet = (np.random.default_rng(s) for s in children[:5])
    shift = Shift.sample(np.random.default_rng(children[5]), config.shift)

    model = anat.sample_anatomy(rng_anat)
    s = float(np.clip(rng_anat.normal(1.0, 0.06), 0.85, 1.15))
    scale = s * np.clip(rng_anat.normal(1.0, [0.05, 0.06, 0.05]), 0.88, 1.12) * shift.body
    offset = np.array([rng_anat.normal(0, 12), rng_anat.normal(0, 12), rng_anat.uniform(-400, -150)]).round(2)
    offset = offset + np.asarray(shift.position_mm)
    frame = Frame.random(rng_anat, offset, scale, config.deformation_mm)
    grid = build_grid(size, offset, shift.spacing)
    canvas = Canvas(grid, frame)
    env = anat.paint_anatomy(canvas, model)
    lung_space = anat.cavity_mask(canvas, model) & ~env
    stations = place_stations(canvas, model, lung_space)
    anat.assign_lungs(canvas, model, lung_space, exclude=stations > 0)
    del lung_space, env

    nodes_map = np.zeros(grid.shape, np.uint16)
    lesions = np.zeros(grid.shape, np.uint8)
    plan = dis.sample_disease(rng_dis, config, rules)
    if config.disease:
        dis.place_tumour(canvas, plan, stations, lesions, rng_geo)
        dis.place_nodes(canvas, plan, stations, nodes_map, lesions, rng_geo)
    else:
        plan.nodes = []
    physiology = Physiology.sample(rng_pet, config.physiological_uptake)
    if shift.background_uptake != 1.0:
        physiology = dataclasses.replace(physiology, blood_pool=round(physiology.blood_pool * shift.background_uptake, 3),
                                         liver=round(physiology.liver * shift.background_uptake, 3))
    noise_hu = float(rng_ct.uniform(10, 20)) if config.ct_noise_hu is None else float(config.ct_noise_hu)
    noise_hu += shift.ct_noise_hu
    ct = make_ct(canvas, rng_ct, noise_hu)
    for n in plan.nodes:
        if not n.malignant and shift.benign_uptake != 1.0:
            n.true_suvmax = round(n.true_suvmax * shift.benign_uptake, 3)
    node_suv = {n.id: n.true_suvmax for n in plan.nodes if n.voxels > 0}
    t = plan.tumour
    act = activity_map(canvas, physiology, nodes_map, node_suv, t.box if config.disease else None,
                       t.uptake if config.disease else None)
    pet_spacing = tuple(v * shift.spacing for v in SIZES[size]["pet_spacing"])
    pet_grid = pet_grid_for(grid, pet_spacing, rng_pet)
    pet = make_pet(act, grid, pet_grid, rng_pet, config.psf_fwhm_mm * shift.psf, config.pet_noise)
    del act

    pid = patient_id or f"PH{seed:010d}"
    truth = _truth(pid, seed, size, config, rules, plan, physiology, canvas, stations, nodes_map, pet, noise_hu)
    if config.shift > 0:
        truth["shift"] = dataclasses.asdict(shift)
    manifest = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "library_version": __version__,
                "seed": seed, "size": size, "config": config.to_dict(), "shift": dataclasses.asdict(shift),
                "ct_grid": asdict(grid), "pet_grid": asdict(pet_grid)}
    return PhantomPatient(
        patient_id=pid, seed=seed, size=size, ct=ct, pet=pet,
        anatomy=grid.image(canvas.label), stations=grid.image(stations), nodes=grid.image(nodes_map),
        lesions=grid.image(lesions), truth=truth, manifest=manifest,
    )


def _points(grid: Grid, mask_idx: np.ndarray) -> np.ndarray:
    return grid.point_of(mask_idx[:, ::-1])


def _truth(pid, seed, size, config, rules, plan, physiology, canvas, stations, nodes_map, pet, noise_hu) -> dict:
    grid = canvas.grid
    from scipy import ndimage

    node_objs = ndimage.find_objects(nodes_map)
    for n in plan.nodes:
        if n.voxels and n.id - 1 < len(node_objs) and node_objs[n.id - 1] is not None:
            sl = node_objs[n.id - 1]
            idx = np.argwhere(nodes_map[sl] == n.id) + [s.start for s in sl]
            n.pet_suvmax = round(sample_image_max(pet, _points(grid, idx)), 3)
    if plan.tumour.voxels and plan.tumour.box is not None:
        sl = plan.tumour.box
        idx = np.argwhere(plan.tumour.uptake > 0) + [s.start for s in sl]
        plan.tumour.pet_suvmax = round(sample_image_max(pet, _points(grid, idx)), 3)
    st_objs = ndimage.find_objects(stations, max_label=17)
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    per_station = {}
    for st in STATIONS:
        sl = st_objs[st.label - 1]
        nodes = [n.to_dict() for n in plan.nodes if n.station == st.name and n.voxels > 0]
        entry = {"label": st.label, "status": "positive" if st.name in plan.positive else "negative",
                 "volume_ml": 0.0, "pet_suvmax": None, "centroid_mm": None, "nodes": nodes}
        if sl is not None:
            idx = np.argwhere(stations[sl] == st.label) + [s.start for s in sl]
            pts = _points(grid, idx)
            entry["volume_ml"] = round(len(idx) * vox_ml, 3)
            entry["pet_suvmax"] = round(sample_image_max(pet, pts), 3)
            entry["centroid_mm"] = [round(float(v), 2) for v in pts.mean(axis=0)]
        per_station[st.name] = entry
    staging = rules.stage(plan.positive, plan.side)
    return {
        "patient_id": pid, "seed": seed, "size": size, "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
        "rules": rules.name, "tumour_side": plan.side, "tumour_lobe": plan.lobe if config.disease else None,
        "n_stage": N_STAGES[plan.n_stage] if config.disease else "N0", "tnm9": staging.tnm9,
        "positive_stations": list(plan.positive),
        "reported": {"n_stage": N_STAGES[plan.reported_n_stage], "positive_stations": list(plan.reported_positive),
                     "label_noise_applied": plan.label_noise_applied},
        "tumour": plan.tumour.to_dict() if config.disease else None,
        "inflammatory_pattern": plan.inflammatory_pattern,
        "physiology": asdict(physiology), "ct_noise_hu": round(noise_hu, 2),
        "stations": per_station,
        "nodes": len([n for n in plan.nodes if n.voxels > 0]),
    }
