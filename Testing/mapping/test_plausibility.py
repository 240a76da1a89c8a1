"""Plausibility of a station map: low atlas agreement, a volume outside the atlas range, stations lost in fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.mapping.atlas import Atlas, AtlasSet
from LymphNodeStagingLib.mapping.fusion import fuse
from LymphNodeStagingLib.mapping.registration import Geometry
from LymphNodeStagingLib.mapping.station_mapping import (
    LOW_AGREEMENT,
    MAX_LOST_STATIONS,
    MIN_AGREEMENT,
    VOLUME_FACTOR,
    VOLUME_HIGH,
    VOLUME_LOW,
    StationMapping,
    _with_plausibility,
    atlas_station_volumes,
    check_plausibility,
    read_station_mapping,
    write_station_mapping,
)
from LymphNodeStagingLib.mapping.weightmap import station_weight_maps
from LymphNodeStagingLib.staging.stations import STATION_NAMES

ATLAS_ML = {name: [2.0, 4.0] for name in STATION_NAMES}  # every station 2-4 ml in the atlases


def _good() -> tuple[dict[str, float], dict[str, float]]:
    return {name: 0.7 for name in STATION_NAMES}, {name: 3.0 for name in STATION_NAMES}


def test_thresholds_are_the_documented_ones():
    assert (MIN_AGREEMENT, VOLUME_FACTOR, MAX_LOST_STATIONS) == (0.33, 3.0, 3)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "explanation" / "station-mapping.md").read_text("utf-8")
    assert "## Plausibility" in doc and "0.33" in doc


def test_a_plausible_map_has_no_flag():
    agreement, volumes = _good()
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.flags == {} and p.lost == [] and p.warnings == []


def test_low_agreement_is_flagged_and_named():
    agreement, volumes = _good()
    agreement["4R"] = MIN_AGREEMENT - 0.01
    agreement["7"] = MIN_AGREEMENT  # at the threshold: not low
    agreement["9"] = float("nan")  # fewer than two atlases map it: nothing to judge
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.flags == {"4R": [LOW_AGREEMENT]}
    assert len(p.warnings) == 1 and "low atlas agreement" in p.warnings[0] and "4R (0.32)" in p.warnings[0]
    assert "7" not in p.warnings[0].split("at ", 1)[1]


def test_volume_outside_the_atlas_range():
    agreement, volumes = _good()
    volumes["2R"] = 2.0 / VOLUME_FACTOR - 0.01  # below a third of the smallest atlas volume
    volumes["2L"] = 4.0 * VOLUME_FACTOR + 0.01  # above three times the largest
    volumes["4L"] = 2.0 / VOLUME_FACTOR + 0.01  # inside the range: fine
    volumes["5"] = 4.0 * VOLUME_FACTOR  # on the edge: fine
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.flags == {"2R": [VOLUME_LOW], "2L": [VOLUME_HIGH]}
    assert len(p.warnings) == 1 and "2R (0.66 ml; atlases 2.0-4.0 ml)" in p.warnings[0]
    assert "2L (12.0 ml" in p.warnings[0]


def test_a_station_can_have_both_flags():
    agreement, volumes = _good()
    agreement["10R"], volumes["10R"] = 0.1, 40.0
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.flags == {"10R": [LOW_AGREEMENT, VOLUME_HIGH]} and len(p.warnings) == 2


def test_stations_lost_in_fusion():
    agreement, volumes = _good()
    for name in ("1L", "1R", "3A"):
        volumes[name] = 0.0
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.lost == ["1L", "1R", "3A"] and p.warnings == []  # up to MAX_LOST_STATIONS: no case-level warning
    volumes["9"] = 0.0
    p = check_plausibility(agreement, volumes, ATLAS_ML)
    assert p.lost == ["1L", "1R", "3A", "9"]
    assert len(p.warnings) == 1 and "4 stations" in p.warnings[0] and "1L, 1R, 3A, 9" in p.warnings[0]
    assert p.flags == {}  # a lost station has no volume or position to judge
    # a station no atlas has is not lost
    atlas = {**ATLAS_ML, "9": []}
    assert check_plausibility(agreement, volumes, atlas).lost == ["1L", "1R", "3A"]


def test_flags_join_the_fusion_flags():
    fusion = {name: "ok" for name in STATION_NAMES}
    fusion["5"] = "fallback_union"
    agreement, volumes = _good()
    agreement["5"] = agreement["7"] = 0.1
    merged = _with_plausibility(fusion, check_plausibility(agreement, volumes, ATLAS_ML))
    assert merged["5"] == "fallback_union,low_agreement" and merged["7"] == "low_agreement" and merged["4R"] == "ok"


def _atlas_set(volumes_voxels: list[dict[int, int]], spacing=(2.0, 2.0, 2.5)) -> AtlasSet:
    atlases = []
    for k, counts in enumerate(volumes_voxels):
        arr = np.zeros((10, 20, 20), np.uint8).ravel()
        start = 0
        for label, n in counts.items():
            arr[start:start + n] = label
            start += n
        img = sitk.GetImageFromArray(arr.reshape(10, 20, 20))
        img.SetSpacing(spacing)
        atlas = Atlas(f"a{k}", Path("ct"), Path("anatomy"), Path("stations"))
        atlas._cache["stations"] = img
        atlases.append(atlas)
    return AtlasSet(Path("."), "hand-made", False, "", atlases)


def test_atlas_station_volumes_once_per_set():
    aset = _atlas_set([{8: 100, 11: 40}, {8: 300}])  # voxel 10 mm^3
    vols = atlas_station_volumes(aset)
    assert vols["4R"] == pytest.approx([1.0, 3.0]) and vols["7"] == pytest.approx([0.4]) and vols["1L"] == []
    assert atlas_station_volumes(aset) is vols  # cached in the atlas set


def _mapping(**extra) -> StationMapping:
    warped = np.zeros((3, 12, 14, 16), np.uint8)
    for a in range(3):
        warped[a, 2:8, 3 + a:9, 4:12] = 11
        warped[a, 6:11, 2:7, 1 + a:6] = 8
    img = sitk.Image(16, 14, 12, sitk.sitkUInt8)
    img.SetSpacing((1.5, 1.5, 3.0))
    geom = Geometry.of(img)
    fused = fuse(warped)
    maps = station_weight_maps(fused.labels, geom, fused.vote_fraction())
    flags = {**fused.flags, "7": "low_agreement,volume_above_atlases"}
    return StationMapping(fused.labels, fused.votes, fused.n_atlases, geom, fused.agreement, flags, fused.voxels,
                          maps, ["a1", "a2", "a3"], {"a1": 0.1, "a2": 0.2, "a3": 0.3}, **extra)


def test_station_flags_and_files_keep_plausibility(tmp_path):
    m = _mapping(warnings=["implausible station map: low atlas agreement (below 0.33) at 7 (0.10)"],
                 atlas_set={"name": "lynch", "synthetic": False})
    assert m.station_flags("7") == ["low_agreement", "volume_above_atlases"]
    assert m.station_flags("4R") == [] and m.station_flags("1L") == ["absent"]
    assert m.to_dict()["warnings"] == m.warnings and m.to_dict()["atlas_set"]["synthetic"] is False
    write_station_mapping(m, tmp_path)
    back = read_station_mapping(tmp_path)
    assert back.flags == m.flags and back.warnings == m.warnings and back.atlas_set == m.atlas_set
    # files of a version without these fields: no warning, provenance unknown
    old = _mapping()
    assert old.warnings == [] and old.atlas_set == {}
