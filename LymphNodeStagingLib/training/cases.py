"""Cohort rows turned into training/evaluation cases: images, cached station maps and patch-centre samplers.

The station map of a scan comes from the shared station-map store (``mapping/store.py``), which ``lnstaging batch``
fills too, so a scan mapped once by any command is not registered again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..cohort.table import CohortRow
from ..errors import InputError
from ..runtime import Progress, ProgressCallback
from ..staging.stations import NUM_STATIONS

log = logging.getLogger(__name__)


@dataclass
class PreparedCase:
    row: CohortRow
    ct: sitk.Image
    pet: sitk.Image
    station_map: sitk.Image
    vote_fractions: np.ndarray  # (17, z, y, x) float32 on the station map's grid
    sampler: object  # patches.StationSampler
    from_cache: bool

    def station_features(self) -> np.ndarray:
        """(17, 3) SUVmax, SUVpeak, volume ml of every station in the fused map (NaN absent): the hybrid inputs."""
        from ..suv.statistics import station_feature_array, station_suv_stats

        return station_feature_array(station_suv_stats(self.pet, self.station_map))


def prepare_case(row: CohortRow, atlas_set, cache_dir: str | Path | None = None, *, device: str = "cpu",
                 pet_is_suv: bool | str | None = None) -> PreparedCase:
    """Images, station map and sampler of one cohort row. The inputs are checked first (files complete, values,
    grids, and the memory estimate when the row must be mapped). The station map comes from the shared station-map
    store (``cache_dir``, default the user cache's, the one ``lnstaging batch`` fills) when this CT, anatomy and
    atlas set were mapped before; otherwise it is registered and filed there."""
    from ..classifier.patches import StationSampler
    from ..mapping.station_mapping import map_stations
    from ..mapping.store import StationMapStore, atlas_set_identity, station_map_key
    from ..preflight.case import check_row, row_where

    if row.anatomy_path is None:
        raise InputError(f"{row_where(row)}: anatomy_path is needed for training and evaluation "
                         "(run `lnstaging anatomy` or `lnstaging batch --steps anatomy` first)")
    store = StationMapStore(cache_dir)
    key = station_map_key(row.ct_path, row.anatomy_path,
                          atlas_set_identity(atlas_set.root, [a.id for a in atlas_set.atlases]))
    mapping = store.get(key)
    from_cache = mapping is not None
    checked = check_row(row, pet_is_suv=pet_is_suv, atlases=atlas_set, read_anatomy=not from_cache,
                        mapping=not from_cache)
    ct, pet = checked.ct, checked.pet
    if mapping is None:
        mapping = map_stations(ct, checked.anatomy, atlas_set, device=device)
        store.put(key, mapping)
    return PreparedCase(row, ct, pet, mapping.label_image(), mapping.votes.astype(np.float32) / mapping.n_atlases,
                        StationSampler.from_sparse_maps(mapping.weight_maps), from_cache)


def case_samples(rows: Sequence[CohortRow], atlas_set, cache_dir: str | Path | None = None, *, device: str = "cpu",
                 pet_is_suv: bool | str | None = None, crop_margin_mm: float = 48.0,
                 progress: ProgressCallback | None = None) -> list:
    """training.CaseSample for each row (cropped around the stations to save memory)."""
    from .loops import CaseSample

    out = []
    for i, row in enumerate(rows):
        if progress:
            progress(Progress(i, len(rows), f"preparing case {i + 1}/{len(rows)} {row.scan_id}"))
        prep = prepare_case(row, atlas_set, cache_dir, device=device, pet_is_suv=pet_is_suv)
        labels = row.station_labels() if row.has_station_labels else np.full(NUM_STATIONS, -1, dtype=np.int64)
        sample = CaseSample(patient_id=row.patient_id, ct=prep.ct, pet=prep.pet, sampler=prep.sampler,
                            side=row.tumour_side, n_stage=row.n_stage if row.n_stage is not None else -1,
                            station_labels=labels, study=row.study, features=prep.station_features())
        out.append(sample.cropped(crop_margin_mm))
    if progress:
        progress(Progress(len(rows), len(rows), "cases prepared"))
    return out
