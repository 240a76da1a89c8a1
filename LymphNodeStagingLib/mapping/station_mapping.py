"""Station mapping of one patient: register all atlases (batched), warp their station maps onto a crop of the patient's
CT grid, fuse them, derive the per-station weight maps and inference centres, and check that the map is plausible.

Plausibility (docs/explanation/station-mapping.md#plausibility): a mapped station whose atlas agreement is below
``MIN_AGREEMENT`` is flagged ``low_agreement``; one whose fused volume lies below ``1 / VOLUME_FACTOR`` of the smallest
or above ``VOLUME_FACTOR`` times the largest volume of that station in the atlases is flagged ``volume_below_atlases``
or ``volume_above_atlases``; more than ``MAX_LOST_STATIONS`` stations that the atlases have but the fused map lacks
make a case-level warning. These checks catch registrations that went wrong; they cannot catch an atlas set whose
station definitions differ from the patient's (the atlases then agree with each other on the wrong place).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.files import write_figure, write_image, write_json
from ..runtime import ProgressCallback, progress_part, reporter
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from .atlas import AtlasSet
from .fusion import OK, fuse
from .registration import Geometry, RegistrationConfig, RegistrationResult, bbox_of, prepare_anatomy, register
from .weightmap import WeightMap, station_weight_maps

log = logging.getLogger(__name__)

#: A mapped station whose atlas agreement (mean pairwise Dice of the warped atlas masks) is below this is flagged.
#: Measured on phantoms (6 small and 2 full-size patients, 5 atlases of other seeds): good maps (matching atlases,
#: also with 4x the usual anatomical deformation) have a lowest station agreement of 0.38 (median 0.65); atlases
#: that disagree by 15 mm give a median of 0.20 (99 % of stations below 0.33), a mirrored patient 0.04-0.07 (92-100 %).
MIN_AGREEMENT = 0.33
#: A mapped station whose volume is below (smallest atlas volume) / VOLUME_FACTOR or above (largest atlas volume)
#: * VOLUME_FACTOR is flagged. Good phantom maps stay within 0.78x the smallest to 2.0x the largest atlas volume.
VOLUME_FACTOR = 3.0
#: More stations than this present in the atlases but missing from the fused map: a case-level warning.
MAX_LOST_STATIONS = 3
LOW_AGREEMENT, VOLUME_LOW, VOLUME_HIGH = "low_agreement", "volume_below_atlases", "volume_above_atlases"
#: Separates the flags of one station in ``StationMapping.flags`` (e.g. "fallback_union,low_agreement").
FLAG_SEPARATOR = ","


@dataclass
class PreparedAtlas:
    """Registration data of one atlas plus its station map cropped to the stations (kept in the atlas set's cache)."""

    id: str
    anatomy: object  # registration.PreparedAnatomy
    stations: np.ndarray  # (z, y, x) uint8, cropped
    stations_geom: Geometry
    anatomy_crop: np.ndarray  # the anatomy on the same crop (for the anatomy Dice)
    corners: np.ndarray  # world corners of the station bounding box


@dataclass
class StationMapping:
    """Result of map_stations; every map lies on `geometry`, a crop of the patient's CT grid."""

    labels: np.ndarray  # (z, y, x) uint8 fused station map, catalogue labels
    votes: np.ndarray  # (17, z, y, x) uint8 vote counts
    n_atlases: int
    geometry: Geometry
    agreement: dict[str, float]
    flags: dict[str, str]
    voxels: dict[str, int]
    weight_maps: dict[str, WeightMap]
    atlas_ids: list[str]
    atlas_loss: dict[str, float]  # final anatomy-channel mean squared difference per atlas (lower is better)
    timings: dict[str, float] = field(default_factory=dict)
    anatomy_dice: dict[str, dict[str, float]] | None = None  # structure -> atlas id -> Dice (with "mean")
    registration: RegistrationResult | None = field(default=None, repr=False)
    warped: np.ndarray | None = field(default=None, repr=False)  # (N, z, y, x) warped atlas station maps
    warnings: list[str] = field(default_factory=list)  # case-level plausibility warnings
    atlas_set: dict = field(default_factory=dict)  # name and "synthetic" of the atlas set mapped with ({}: unknown)
    #: "atlas" (registration + fusion) or "network" (stationnet: votes are probabilities in 1 / n_atlases steps)
    method: str = "atlas"
    model: dict = field(default_factory=dict)  # the station network that made a "network" map ({} for atlases)

    def station_flags(self, name: str) -> list[str]:
        """The flags of one station (fusion fallback, plausibility); [] when it is "ok"."""
        return [f for f in self.flags.get(name, OK).split(FLAG_SEPARATOR) if f and f != OK]

    @property
    def centroids_mm(self) -> dict[str, list[float]]:
        """Inference centre of each mapped station: the maximum of its weight map (world LPS mm)."""
        return {k: [float(v) for v in m.centre_mm] for k, m in self.weight_maps.items()}

    def label_image(self) -> sitk.Image:
        return self.geometry.image(self.labels)

    def vote_fraction_image(self) -> sitk.Image:
        """17-component vector image of the vote fractions (component i = label i + 1)."""
        frac = np.moveaxis(self.votes.astype(np.float32) / self.n_atlases, 0, -1)
        img = sitk.GetImageFromArray(frac, isVector=True)
        g = self.geometry
        img.SetOrigin(tuple(g.origin))
        img.SetSpacing(tuple(g.spacing))
        img.SetDirection(tuple(g.direction.ravel()))
        return img

    def to_dict(self) -> dict:
        stations = {}
        for name in STATION_NAMES:
            wm = self.weight_maps.get(name)
            stations[name] = {
                "flag": self.flags[name], "voxels": self.voxels[name],
                "agreement": None if np.isnan(self.agreement[name]) else round(self.agreement[name], 4),
                "centre_mm": None if wm is None else [round(float(v), 2) for v in wm.centre_mm],
                "centroid_mm": None if wm is None else [round(float(v), 2) for v in wm.centroid_mm],
            }
        out = {"atlases": self.atlas_ids, "atlas_loss": {k: round(v, 6) for k, v in self.atlas_loss.items()},
               "stations": stations, "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
               "grid": {"size": list(self.geometry.shape), "spacing": [float(s) for s in self.geometry.spacing],
                        "origin": [float(s) for s in self.geometry.origin]}}
        out["warnings"] = list(self.warnings)
        out["atlas_set"] = dict(self.atlas_set)
        out["method"] = self.method
        if self.model:
            out["model"] = dict(self.model)
        if self.anatomy_dice is not None:
            out["anatomy_dice"] = self.anatomy_dice
        return out

    def write(self, out_dir: str | Path, overlay_ct: sitk.Image | None = None) -> dict[str, Path]:
        """Write stations.nii.gz, vote_fractions.nii.gz, centroids.json, mapping.json and (with a CT) overlay.png."""
        out = Path(out_dir)
        paths = {"stations": write_image(self.label_image(), out / "stations.nii.gz"),
                 "vote_fractions": write_image(self.vote_fraction_image(), out / "vote_fractions.nii.gz"),
                 "centroids": write_json(out / "centroids.json", {"frame": "LPS", "unit": "mm",
                                                                  "centres": self.centroids_mm}),
                 "mapping": write_json(out / "mapping.json", self.to_dict())}
        if overlay_ct is not None:
            paths["overlay"] = write_overlay(overlay_ct, self, out / "overlay.png")
        return paths


def _prepare_atlases(atlas_set: AtlasSet, config: RegistrationConfig) -> list[PreparedAtlas]:
    key = ("prepared", config.structures, config.levels_mm, config.affine_mm, config.thorax_margin_mm)
    if key not in atlas_set.cache:
        prepared = []
        for atlas in atlas_set.atlases:
            anat_img, st_img = atlas.anatomy(), atlas.stations()
            st = sitk.GetArrayViewFromImage(st_img)
            geom = Geometry.of(st_img)
            box = bbox_of(st > 0, np.ceil(10.0 / geom.spacing).astype(int))
            if box is None:
                raise InputError(f"atlas {atlas.id}: station map {atlas.stations_path} is empty")
            lo, hi = box
            sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
            sub_geom = geom.crop(lo, hi)
            corners = np.array([[x, y, z] for x in (0, hi[0] - lo[0] - 1) for y in (0, hi[1] - lo[1] - 1)
                                for z in (0, hi[2] - lo[2] - 1)], float)
            corners = corners @ (geom.direction @ np.diag(geom.spacing)).T + sub_geom.origin
            prepared.append(PreparedAtlas(atlas.id, prepare_anatomy(anat_img, config), np.array(st[sl], np.uint8),
                                          sub_geom, np.array(sitk.GetArrayViewFromImage(anat_img)[sl]), corners))
        atlas_set.cache[key] = prepared
    return atlas_set.cache[key]


def atlas_station_volumes(atlas_set: AtlasSet) -> dict[str, list[float]]:
    """Volume (ml) of every station in every atlas that has it (station name -> volumes), computed once per set."""
    key = "station_volumes_ml"
    if key not in atlas_set.cache:
        volumes: dict[str, list[float]] = {name: [] for name in STATION_NAMES}
        for atlas in atlas_set.atlases:
            img = atlas.stations()
            counts = np.bincount(sitk.GetArrayViewFromImage(img).ravel().astype(np.int64), minlength=NUM_STATIONS + 1)
            ml = float(np.prod(img.GetSpacing())) / 1000.0
            for label, name in enumerate(STATION_NAMES, start=1):
                if counts[label]:
                    volumes[name].append(float(counts[label]) * ml)
        atlas_set.cache[key] = volumes
    return atlas_set.cache[key]


@dataclass
class Plausibility:
    """Result of check_plausibility: extra flags per station and the case-level warning lines."""

    flags: dict[str, list[str]]  # station -> [LOW_AGREEMENT, VOLUME_LOW | VOLUME_HIGH] (only flagged stations)
    lost: list[str]  # stations present in the atlases but missing from the fused map
    warnings: list[str]


def check_plausibility(agreement: dict[str, float], volumes_ml: dict[str, float],
                       atlas_volumes_ml: dict[str, list[float]], *, min_agreement: float = MIN_AGREEMENT,
                       volume_factor: float = VOLUME_FACTOR, max_lost: int = MAX_LOST_STATIONS) -> Plausibility:
    """Check a fused station map against the atlas set: atlas agreement and volume of each mapped station, and the
    number of stations lost in fusion (see the module docstring for the thresholds)."""
    flags: dict[str, list[str]] = {}
    low, volume, lost = [], [], []
    for name in STATION_NAMES:
        vol = float(volumes_ml.get(name, 0.0) or 0.0)
        ref = [v for v in atlas_volumes_ml.get(name, []) if v > 0]
        if vol <= 0.0:
            if ref:
                lost.append(name)
            continue
        a = agreement.get(name)
        if a is not None and np.isfinite(a) and a < min_agreement:
            flags.setdefault(name, []).append(LOW_AGREEMENT)
            low.append(f"{name} ({a:.2f})")
        if ref and not min(ref) / volume_factor <= vol <= max(ref) * volume_factor:
            flags.setdefault(name, []).append(VOLUME_LOW if vol < min(ref) / volume_factor else VOLUME_HIGH)
            volume.append(f"{name} ({_ml(vol)} ml; atlases {_ml(min(ref))}-{_ml(max(ref))} ml)")
    warnings = []
    if low:
        warnings.append(f"implausible station map: low atlas agreement (below {min_agreement:.2f}) at "
                        f"{', '.join(low)}; check where these stations lie")
    if volume:
        warnings.append(f"implausible station map: station volume outside 1/{volume_factor:g} to {volume_factor:g} "
                        f"times the atlas range at {', '.join(volume)}")
    if len(lost) > max_lost:
        warnings.append(f"implausible station map: {len(lost)} stations of the atlases are missing from the fused map "
                        f"({', '.join(lost)}); the registration has probably failed")
    return Plausibility(flags, lost, warnings)


def _ml(v: float) -> str:
    return f"{v:.1f}" if v >= 1.0 else f"{v:.2g}"


def _with_plausibility(flags: dict[str, str], plausibility: Plausibility) -> dict[str, str]:
    """The fusion flags with the plausibility flags added (joined by FLAG_SEPARATOR; "ok" only when none)."""
    out = {}
    for name, flag in flags.items():
        parts = [f for f in (flag,) if f and f != OK] + plausibility.flags.get(name, [])
        out[name] = FLAG_SEPARATOR.join(parts) if parts else OK
    return out


def _output_grid(reference: Geometry, result: RegistrationResult) -> Geometry:
    """The crop of the patient's grid that covers the deformable box."""
    corners = np.array([[x, y, z, 1.0] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    world = (corners @ result.box.norm_to_world().T)[:, :3]
    idx = (world - reference.origin) @ np.linalg.inv(reference.direction @ np.diag(reference.spacing)).T
    lo = np.clip(np.floor(idx.min(0)).astype(int), 0, np.asarray(reference.shape))
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 1, 0, np.asarray(reference.shape))
    if (hi - lo <= 0).any():
        raise InputError("the registered station region lies outside the patient's CT grid")
    return reference.crop(lo, hi)


def _as_label_image(anatomy: sitk.Image, reference: sitk.Image | None) -> sitk.Image:
    if anatomy.GetDimension() != 3:
        raise InputError(f"anatomy label map has {anatomy.GetDimension()} dimensions; expected 3")
    if reference is None:
        return anatomy
    same = (anatomy.GetSize() == reference.GetSize()
            and np.allclose(anatomy.GetSpacing(), reference.GetSpacing(), atol=1e-3)
            and np.allclose(anatomy.GetOrigin(), reference.GetOrigin(), atol=1e-2)
            and np.allclose(anatomy.GetDirection(), reference.GetDirection(), atol=1e-4))
    if same:
        return anatomy
    log.info("resampling the anatomy label map onto the CT grid (nearest neighbour)")
    return sitk.Resample(anatomy, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, anatomy.GetPixelID())


def map_stations(ct: sitk.Image | None, anatomy: sitk.Image, atlas_set: AtlasSet, device: str = "cpu",
                 progress: ProgressCallback | None = None, config: RegistrationConfig | None = None,
                 evaluate_anatomy: bool = False, keep_warped: bool = False) -> StationMapping:
    """Map the 17 stations onto a patient from its anatomy label map (TotalSegmentator 'total' ids).

    ct gives the output grid (None: the anatomy's grid); the anatomy is resampled onto it when the grids differ.
    evaluate_anatomy adds the Dice of every registration structure per atlas (warped atlas anatomy vs patient).
    """
    import torch

    if len(atlas_set) == 0:
        raise InputError(f"atlas set {atlas_set.name!r} has no atlas")
    config = config or RegistrationConfig()
    report = reporter(progress)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        atlases = _prepare_atlases(atlas_set, config)
        timings["atlas_preparation"] = time.perf_counter() - t0
        report(0.02, "patient anatomy")
        t0 = time.perf_counter()
        anatomy = _as_label_image(anatomy, ct)
        patient = prepare_anatomy(anatomy, config)
        timings["patient_preparation"] = time.perf_counter() - t0

        result = register(patient, [a.anatomy for a in atlases], [a.corners for a in atlases], config, device,
                          progress_part(progress, 0.05, 0.80))
        timings.update(result.timings)

        report(0.82, "warping station maps")
        t0 = time.perf_counter()
        grid = _output_grid(Geometry.of(anatomy), result)
        warped = result.warp([a.stations for a in atlases], [a.stations_geom for a in atlases], grid, "nearest",
                             device)
        timings["warp_stations"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        loss = np.nanmean(result.channel_loss, axis=1)
        ranking = [int(i) for i in np.argsort(loss, kind="stable")]
        fused = fuse(warped, ranking)
        timings["fusion"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        maps = station_weight_maps(fused.labels, grid, fused.votes, 1.0 / fused.n_atlases)
        timings["weight_maps"] = time.perf_counter() - t0

        voxel_ml = float(np.prod(grid.spacing)) / 1000.0
        plausibility = check_plausibility(fused.agreement, {k: v * voxel_ml for k, v in fused.voxels.items()},
                                          atlas_station_volumes(atlas_set))
        for line in plausibility.warnings:
            log.warning("%s", line)

        dice = None
        if evaluate_anatomy:
            t0 = time.perf_counter()
            dice = _anatomy_dice(result, atlases, anatomy, grid, config, device)
            timings["anatomy_dice"] = time.perf_counter() - t0
        report(1.0, "station mapping done")
        return StationMapping(
            fused.labels, fused.votes, fused.n_atlases, grid, fused.agreement,
            _with_plausibility(fused.flags, plausibility), fused.voxels, maps,
            [a.id for a in atlases], {a.id: float(v) for a, v in zip(atlases, loss, strict=True)}, timings, dice,
            result, warped if keep_warped else None, plausibility.warnings,
            {"name": atlas_set.name, "synthetic": bool(atlas_set.synthetic)})
    finally:
        torch.set_num_threads(threads_before)


def _anatomy_dice(result: RegistrationResult, atlases: list[PreparedAtlas], anatomy: sitk.Image, grid: Geometry,
                  config: RegistrationConfig, device: str) -> dict[str, dict[str, float]]:
    """Dice per registration structure between each warped atlas anatomy and the patient, on the output grid."""
    # shifted by one so that 0 marks points outside the atlas crop; only those with data are compared
    warped = result.warp([a.anatomy_crop.astype(np.int32) + 1 for a in atlases], [a.stations_geom for a in atlases],
                         grid, "nearest", device).astype(np.int32)
    full = Geometry.of(anatomy)
    lo = np.rint((grid.origin - full.origin) @ np.linalg.inv(full.direction @ np.diag(full.spacing)).T).astype(int)
    hi = lo + np.asarray(grid.shape)
    patient = sitk.GetArrayViewFromImage(anatomy)[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    out: dict[str, dict[str, float]] = {}
    for s in config.structures:
        ids = np.array(s.ids)
        p = np.isin(patient, ids)
        if not p.any():
            continue
        row = {}
        for i, a in enumerate(atlases):
            valid = warped[i] > 0
            w = np.isin(warped[i] - 1, ids)
            pv = p & valid
            if not w.any() or not pv.any():
                continue
            row[a.id] = round(float(2 * np.count_nonzero(pv & w) / (pv.sum() + w.sum())), 4)
        if row:
            row["mean"] = round(float(np.mean(list(row.values()))), 4)
            out[s.name] = row
    means = [r["mean"] for r in out.values()]
    out["mean"] = {"mean": round(float(np.mean(means)), 4) if means else float("nan")}
    return out


def write_overlay(ct: sitk.Image, mapping: StationMapping, path: str | Path) -> Path:
    """PNG overlay of the fused stations on the CT: coronal, sagittal and two axial slices, centres labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..staging.stations import STATIONS

    g = mapping.geometry
    ref = g.image(np.zeros(g.shape[::-1], np.float32))
    ct_crop = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), ref, sitk.Transform(),
                                                   sitk.sitkLinear, -1000.0))
    labels = mapping.labels
    lut = np.zeros((NUM_STATIONS + 1, 4))
    for st in STATIONS:
        lut[st.label, :3] = np.array(st.color) / 255.0
        lut[st.label, 3] = 0.55
    to_idx = np.linalg.inv(g.direction @ np.diag(g.spacing))
    centres = {k: np.rint((np.asarray(v) - g.origin) @ to_idx.T).astype(int) for k, v in mapping.centroids_mm.items()}
    present = np.argwhere(labels > 0)
    mid = present.mean(0).astype(int) if len(present) else np.asarray(labels.shape) // 2  # (z, y, x)
    if "7" in centres:  # coronal and sagittal planes through the subcarinal station
        mid = np.clip(centres["7"][::-1], 0, np.asarray(labels.shape) - 1)
    z_a = centres.get("4R", centres.get("2R", mid[::-1]))[2]
    z_b = centres.get("7", mid[::-1])[2]
    sx, sy, sz = g.spacing
    views = [("coronal", (slice(None), mid[1], slice(None)), sz / sx, ("x", "z")),
             ("sagittal", (slice(None), slice(None), mid[2]), sz / sy, ("y", "z")),
             (f"axial z={z_a}", (z_a, slice(None), slice(None)), sy / sx, ("x", "y")),
             (f"axial z={z_b}", (z_b, slice(None), slice(None)), sy / sx, ("x", "y"))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 5.5))
    for ax, (title, sl, aspect, (ha, va)) in zip(axes, views, strict=True):
        ct2, lab2 = ct_crop[sl], labels[sl]
        origin = "lower" if va == "z" else "upper"
        ax.imshow(ct2, cmap="gray", vmin=-200, vmax=400, aspect=aspect, origin=origin, interpolation="nearest")
        ax.imshow(lut[lab2], aspect=aspect, origin=origin, interpolation="nearest")
        axis = {"x": 0, "y": 1, "z": 2}
        fixed_axis = ({"x", "y", "z"} - {ha, va}).pop()
        fixed = {"coronal": mid[1], "sagittal": mid[2]}.get(title, z_a if "z=" + str(z_a) in title else z_b)
        for name, c in centres.items():
            if abs(c[axis[fixed_axis]] - fixed) <= 2:
                ax.plot(c[axis[ha]], c[axis[va]], "w+", ms=8)
                ax.text(c[axis[ha]] + 1, c[axis[va]], name, color="white", fontsize=8)
        ax.set_title(title)
        ax.set_axis_off()
    fig.suptitle("Station map of the station network" if mapping.method == "network" else
                 f"Fused station map ({mapping.n_atlases} atlases)")
    fig.tight_layout()
    return write_figure(fig, path, dpi=90)


__all__ = ["StationMapping", "atlas_station_volumes", "check_plausibility", "map_stations", "write_overlay"]


def write_station_mapping(mapping, folder: str | Path) -> None:
    """The files of the stations step: the mapping's own files plus station_info.json with the exact figures."""
    folder = Path(folder)
    mapping.write(folder)
    write_json(folder / "station_info.json", {
        "n_atlases": mapping.n_atlases, "atlas_ids": list(mapping.atlas_ids),
        "agreement": {k: (None if v != v else float(v)) for k, v in mapping.agreement.items()},
        "flags": dict(mapping.flags), "voxels": {k: int(v) for k, v in mapping.voxels.items()},
        "atlas_loss": {k: float(v) for k, v in mapping.atlas_loss.items()},
        "timings": {k: float(v) for k, v in mapping.timings.items()},
        "warnings": list(mapping.warnings), "atlas_set": dict(mapping.atlas_set), "method": mapping.method,
        "model": dict(mapping.model)})


def read_station_mapping(folder: str | Path):
    """A StationMapping rebuilt from the files the stations step wrote (weight maps derived again)."""
    import json

    folder = Path(folder)
    info = json.loads((folder / "station_info.json").read_text(encoding="utf-8"))
    lab_img = sitk.ReadImage(str(folder / "stations.nii.gz"))
    labels = sitk.GetArrayFromImage(lab_img).astype(np.uint8)
    geom = Geometry.of(lab_img)
    n = int(info["n_atlases"])
    frac = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "vote_fractions.nii.gz")))
    votes = np.rint(np.moveaxis(frac, -1, 0) * n).astype(np.uint8)
    agreement = {k: (float("nan") if v is None else float(v)) for k, v in info["agreement"].items()}
    maps = station_weight_maps(labels, geom, votes.astype(np.float32) / n)
    return StationMapping(labels, votes, n, geom, agreement, dict(info["flags"]),
                          {k: int(v) for k, v in info["voxels"].items()}, maps, list(info["atlas_ids"]),
                          {k: float(v) for k, v in info["atlas_loss"].items()}, dict(info.get("timings", {})),
                          warnings=list(info.get("warnings", [])), atlas_set=dict(info.get("atlas_set", {})),
                          method=str(info.get("method", "atlas")), model=dict(info.get("model", {})))
