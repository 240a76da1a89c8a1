"""One interface to the station map of a case, whatever makes it: ``atlas`` (multi-atlas registration guided by the
anatomy), ``network`` (the station network, from the CT alone) or ``both`` (both run; the atlas map is the one used,
and the per-station Dice between the two maps is reported as a quality check a reviewer can read).

Every method returns a :class:`MappingRun` whose ``mapping`` is a ``mapping.StationMapping`` (fused labels, vote
fractions or probabilities, weight maps, centres), so the classifier, node assignment and every output take it
without knowing the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UsageError
from ..mapping.station_mapping import StationMapping
from ..runtime import ProgressCallback, progress_part
from ..staging.stations import STATION_NAMES

METHODS = ("atlas", "network", "both")
DEFAULT_METHOD = "atlas"


def check_method(method: str, parameter: str = "--method") -> str:
    """``method`` when it is one of METHODS; a UsageError naming ``parameter`` otherwise."""
    if method not in METHODS:
        raise UsageError(f"{parameter} {method!r}: expected one of {', '.join(METHODS)}")
    return method


def needs_anatomy(method: str) -> bool:
    """Whether the method needs an anatomy label map (the atlas registration does; the network does not)."""
    return check_method(method, "method") in ("atlas", "both")


def needs_network(method: str) -> bool:
    return check_method(method, "method") in ("network", "both")


@dataclass
class MappingRun:
    """The station map of a case by ``method``: ``mapping`` is the one to use (the atlas map for "both");
    ``atlas``/``network`` the maps each method made; ``agreement_dice`` (both only) the per-station Dice between
    them (None where neither has the station)."""

    method: str
    mapping: StationMapping
    atlas: StationMapping | None = None
    network: StationMapping | None = None
    agreement_dice: dict[str, float | None] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"method": self.method, "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}
        if self.agreement_dice is not None:
            vals = [v for v in self.agreement_dice.values() if v is not None]
            out["agreement_dice"] = {k: (None if v is None else round(v, 4)) for k, v in self.agreement_dice.items()}
            out["agreement_dice_mean"] = round(float(np.mean(vals)), 4) if vals else None
        return out


def _on_common_grid(a: StationMapping, b: StationMapping) -> tuple[np.ndarray, np.ndarray]:
    """The two label maps on the union of their grids (crops of one CT grid; b is resampled when its grid is not a
    crop of a's)."""
    ga, gb = a.geometry, b.geometry
    same = np.allclose(ga.spacing, gb.spacing) and np.allclose(ga.direction, gb.direction)
    off = (np.linalg.inv(ga.direction @ np.diag(ga.spacing)) @ (gb.origin - ga.origin)) if same else None
    if off is None or not np.allclose(off, np.rint(off), atol=1e-3):
        ref = ga.image(np.zeros(ga.shape[::-1], np.uint8))
        lb = sitk.GetArrayFromImage(sitk.Resample(b.label_image(), ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                  0, sitk.sitkUInt8))
        return a.labels, lb
    off = np.rint(off).astype(int)
    lo = np.minimum(0, off)
    hi = np.maximum(np.asarray(ga.shape), off + np.asarray(gb.shape))
    shape = tuple((hi - lo)[::-1])
    la, lb = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    oa, ob = -lo, off - lo
    la[oa[2]:oa[2] + ga.shape[2], oa[1]:oa[1] + ga.shape[1], oa[0]:oa[0] + ga.shape[0]] = a.labels
    lb[ob[2]:ob[2] + gb.shape[2], ob[1]:ob[1] + gb.shape[1], ob[0]:ob[0] + gb.shape[0]] = b.labels
    return la, lb


def station_agreement(a: StationMapping, b: StationMapping) -> dict[str, float | None]:
    """Per-station Dice between two station maps of one CT (None where neither has the station)."""
    la, lb = _on_common_grid(a, b)
    out: dict[str, float | None] = {}
    for lab, name in enumerate(STATION_NAMES, 1):
        x, y = la == lab, lb == lab
        n = int(x.sum() + y.sum())
        out[name] = 2.0 * float((x & y).sum()) / n if n else None
    return out


def map_case(ct: sitk.Image, method: str = DEFAULT_METHOD, *, anatomy: sitk.Image | None = None, atlas_set=None,
             station_model=None, device: str = "cpu", config=None, progress: ProgressCallback | None = None,
             atlas_mapping: StationMapping | None = None, what: str = "CT") -> MappingRun:
    """The station map of a CT by ``method``. ``anatomy`` and ``atlas_set`` (a loaded AtlasSet) are needed by
    "atlas" and "both"; ``station_model`` (a loaded StationModel, a checkpoint path, or None for the bundled
    network) by "network" and "both". ``atlas_mapping``: an atlas map computed before (e.g. from the station-map
    store), used instead of registering again. ``config``: the RegistrationConfig."""
    check_method(method, "method")
    timings: dict[str, float] = {}
    atlas = network = None
    if needs_anatomy(method):
        if atlas_mapping is not None:
            atlas = atlas_mapping
        else:
            if anatomy is None:
                raise UsageError(f"station mapping by {method!r} needs an anatomy label map (--anatomy); the network "
                                 "method maps from the CT alone")
            if atlas_set is None:
                raise UsageError("station mapping by the atlases needs an atlas set")
            from ..mapping.station_mapping import map_stations

            t0 = time.perf_counter()
            part = progress_part(progress, 0.0, 0.85 if method == "both" else 1.0) if progress else None
            atlas = map_stations(ct, anatomy, atlas_set, device=device, progress=part, config=config)
            timings["atlas"] = time.perf_counter() - t0
    if needs_network(method):
        from .infer import map_stations_network
        from .model import StationModel, load_station_model

        t0 = time.perf_counter()
        model = station_model if isinstance(station_model, StationModel) else load_station_model(
            None if station_model is None else Path(station_model), device)
        threads = getattr(config, "threads", None)
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            part = progress_part(progress, 0.85 if method == "both" else 0.0, 1.0) if progress else None
            network = map_stations_network(ct, model, device, part, what)
        finally:
            torch.set_num_threads(before)
        timings["network"] = time.perf_counter() - t0
    agreement = None
    if method == "both":
        t0 = time.perf_counter()
        agreement = station_agreement(atlas, network)
        timings["agreement"] = time.perf_counter() - t0
    used = atlas if atlas is not None else network
    return MappingRun(method, used, atlas, network, agreement, timings)
