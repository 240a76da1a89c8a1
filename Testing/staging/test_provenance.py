"""Provenance a reader cannot miss: a result computed with the synthetic demo atlases and/or the demo model says so in
result.json, the text table and the overview PNG; a result with a user atlas set and model does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.assessment.overview import BANNER_FACE, banner_text, mapping_notes, write_overview
from LymphNodeStagingLib.staging.result import CaseResult, make_case_result, make_provenance
from LymphNodeStagingLib.staging.stations import STATIONS

PROBS = {"4R": 0.9, "7": 0.3, "2R": 0.1, "10L": 0.2}


def _result(synthetic: bool | None, demo: bool) -> CaseResult:
    r = make_case_result("C1", "R", PROBS, agreement={k: 0.7 for k in PROBS})
    r.set_provenance(synthetic, demo)
    return r


def test_make_provenance():
    both = make_provenance(True, True)
    assert both["atlases"] == "synthetic-demo" and both["model"] == "demo" and both["demo"] is True
    assert both["valid_for_patients"] is False
    assert both["statement"].startswith("synthetic demo atlases and model: station positions and probabilities are "
                                        "not valid for patients") and "Lynch et al." in both["statement"]
    atlases = make_provenance(True, False)
    assert atlases["model"] == "user" and "Lynch et al." in atlases["statement"] and atlases["demo"]
    model = make_provenance(False, True)
    assert model["atlases"] == "user" and "trained on clinical data" in model["statement"]
    assert "Lynch" not in model["statement"]
    user = make_provenance(False, False)
    assert user == {"atlases": "user", "model": "user", "demo": False}
    assert make_provenance(None, False) == {"atlases": "unknown", "model": "user", "demo": False}


def test_demo_result_says_so_in_json_warnings_and_table():
    r = _result(True, True)
    assert r.warnings[0] == r.provenance["statement"]
    data = json.loads(json.dumps(r.to_dict()))
    assert data["provenance"]["valid_for_patients"] is False and data["provenance"]["atlases"] == "synthetic-demo"
    back = CaseResult.from_dict(data)
    assert back.provenance == r.provenance
    again = back.restage(threshold=0.2)
    assert again.provenance == r.provenance and again.demo_banner == r.demo_banner
    first = r.text_table().splitlines()[0]
    assert first.startswith("*** SYNTHETIC DEMO ATLASES AND MODEL: STATION POSITIONS AND PROBABILITIES ARE NOT VALID "
                            "FOR PATIENTS; SUPPLY AN ATLAS SET SUCH AS THE LYNCH ET AL. ATLASES") and first == first.upper()
    assert r.text_table(truth=["4R"]).splitlines()[0] == first
    r.set_provenance(True, True)  # once only
    assert r.warnings.count(r.provenance["statement"]) == 1


def test_user_result_has_no_banner():
    r = _result(False, False)
    assert r.demo_banner is None and r.warnings == [] and "statement" not in r.provenance
    assert r.text_table().splitlines()[0].startswith("station")
    # a result file of an older version (no provenance): no banner either
    data = r.to_dict()
    del data["provenance"]
    assert CaseResult.from_dict(data).demo_banner is None


def test_text_table_shows_mapping_flags():
    r = _result(False, False)
    r.station("4R").flags.append("mapping:low_agreement")
    r.station("4R").flags.append("mapping:volume_above_atlases")
    lines = r.text_table().splitlines()
    assert lines[0].endswith("mapping")
    row = next(line for line in lines if line.startswith("4R "))
    assert row.endswith("low_agreement,volume_above_atlases")
    r.station("7").flags.append("mapping:low_agreement")
    assert mapping_notes(r) == ["low_agreement: 4R, 7", "volume_above_atlases: 4R"]


def _images():
    size, spacing = (40, 40, 24), 3.0
    arr = np.zeros(size[::-1], np.uint8)
    for k, st in enumerate(STATIONS):
        if st.name in PROBS:
            z, y, x = 6 + (k % 3) * 4, 10 + (k % 4) * 5, 8 + (k % 5) * 5
            arr[z:z + 3, y:y + 4, x:x + 4] = st.label
    stations = sitk.GetImageFromArray(arr)
    ct = sitk.GetImageFromArray(np.where(arr > 0, 30.0, -50.0).astype(np.float32))
    pet = sitk.GetImageFromArray(np.where(arr == 8, 6.0, 1.2).astype(np.float32))
    for img in (stations, ct, pet):
        img.SetSpacing((spacing,) * 3)
    return ct, pet, stations


def _top_band(path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))[..., :3]
    return img[: max(4, img.shape[0] // 40)]  # the top 2.5 % of the picture


@pytest.fixture(scope="module")
def overview_images():
    return _images()


def test_overview_banner_for_a_demo_result(overview_images, tmp_path):
    from matplotlib.colors import to_rgb

    r = _result(True, True)
    text = banner_text(r)
    assert text.splitlines()[0] == ("SYNTHETIC DEMO ATLASES AND MODEL: STATION POSITIONS AND PROBABILITIES ARE NOT "
                                    "VALID FOR PATIENTS")
    assert text.splitlines()[1].startswith("Supply an atlas set such as the Lynch et al. atlases")
    path = write_overview(*overview_images, r, tmp_path / "overview.png")
    band = _top_band(path)
    red = np.all(np.abs(band - np.array(to_rgb(BANNER_FACE))) < 0.08, axis=-1)
    assert red.mean() > 0.5, "no red banner across the top of the overview"


def test_overview_without_banner_for_a_user_result(overview_images, tmp_path):
    r = _result(False, False)
    assert banner_text(r) is None
    path = write_overview(*overview_images, r, tmp_path / "overview.png")
    from matplotlib.colors import to_rgb

    band = _top_band(path)
    red = np.all(np.abs(band - np.array(to_rgb(BANNER_FACE))) < 0.08, axis=-1)
    assert not red.any() and (band > 0.9).all(axis=-1).mean() > 0.8, "a user result's overview has no banner"


# ----- through assess_case: a station mapping given by hand (no registration), the demo model or a user model ---
def _case_images():
    size, spacing = (60, 60, 40), 2.5
    z, y, x = np.indices(size[::-1])
    ct_arr = np.where(((x - 30) / 26.0) ** 2 + ((y - 30) / 22.0) ** 2 <= 1, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(size[::-1], np.uint8)
    for k, st in enumerate(STATIONS):
        cz, cy, cx = 8 + (k % 4) * 7, 18 + (k % 3) * 8, 14 + (k // 3) * 6
        labels[cz:cz + 4, cy:cy + 4, cx:cx + 4] = st.label
    pet_arr = np.where(ct_arr > -500, 1.2, 0.2).astype(np.float32)
    pet_arr[labels == 8] = 7.0  # a hot 4R
    images = []
    for arr in (ct_arr, pet_arr, labels):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        img.SetOrigin((-75.0, -75.0, -50.0))
        images.append(img)
    return images


def _hand_mapping(labels_img, atlas_set: dict, warnings: list[str]):
    from LymphNodeStagingLib.mapping.fusion import fuse
    from LymphNodeStagingLib.mapping.registration import Geometry
    from LymphNodeStagingLib.mapping.station_mapping import StationMapping
    from LymphNodeStagingLib.mapping.weightmap import station_weight_maps

    labels = sitk.GetArrayFromImage(labels_img)
    warped = np.stack([labels, np.roll(labels, 1, axis=2), np.roll(labels, -1, axis=1)])
    fused = fuse(warped)
    geom = Geometry.of(labels_img)
    maps = station_weight_maps(fused.labels, geom, fused.vote_fraction())
    flags = {**fused.flags, "4R": "low_agreement"}
    return StationMapping(fused.labels, fused.votes, fused.n_atlases, geom, fused.agreement, flags, fused.voxels,
                          maps, ["a1", "a2", "a3"], {"a1": 0.1, "a2": 0.2, "a3": 0.3}, warnings=warnings,
                          atlas_set=atlas_set)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.small(32)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "site.pt", build_model("station", cfg),
                           {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})


def _user_atlas_set(root):
    from LymphNodeStagingLib.mapping.atlas import load_atlas_set

    root.mkdir()
    entries = []
    for aid in ("atlas01", "atlas02"):
        (root / aid).mkdir()
        for key in ("ct", "anatomy", "stations"):
            (root / aid / f"{key}.nii.gz").write_bytes(b"")
        entries.append({"id": aid, **{key: f"{aid}/{key}.nii.gz" for key in ("ct", "anatomy", "stations")}})
    (root / "manifest.json").write_text(json.dumps({
        "format": "lnstaging-atlas-set", "format_version": 1, "name": "site", "synthetic": False,
        "anatomy_vocabulary": "totalsegmentator-total-v2", "atlases": entries}))
    return load_atlas_set(root, validate=False)


def test_assess_with_demo_atlases_and_model_says_so_everywhere(tmp_path):
    from LymphNodeStagingLib.assessment.assess import assess_case

    ct, pet, labels = _case_images()
    warning = "implausible station map: low atlas agreement (below 0.33) at 4R (0.20); check where these stations lie"
    mapping = _hand_mapping(labels, {"name": "synthetic-phantom", "synthetic": True}, [warning])
    out = assess_case(ct, pet, "R", station_mapping=mapping, case_id="demo", out_dir=tmp_path / "out").result
    assert out.provenance["atlases"] == "synthetic-demo" and out.provenance["model"] == "demo"
    assert out.provenance["valid_for_patients"] is False and out.atlases["synthetic"] is True
    assert out.warnings[0] == out.provenance["statement"] and warning in out.warnings
    assert "mapping:low_agreement" in out.station("4R").flags
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    assert data["provenance"] == out.provenance and data["warnings"][0] == out.provenance["statement"]
    assert out.text_table().splitlines()[0] == out.demo_banner
    row = next(line for line in (tmp_path / "out" / "result.csv").read_text().splitlines() if line.startswith("demo,4R,"))
    assert "mapping:low_agreement" in row.split(",")  # the flags column (node columns may follow)
    from matplotlib.colors import to_rgb

    band = _top_band(tmp_path / "out" / "overview.png")
    assert np.all(np.abs(band - np.array(to_rgb(BANNER_FACE))) < 0.08, axis=-1).mean() > 0.5


def test_assess_with_user_atlases_and_model_has_no_banner(tmp_path, user_model):
    from LymphNodeStagingLib.assessment.assess import assess_case

    ct, pet, labels = _case_images()
    mapping = _hand_mapping(labels, {}, [])  # a mapping that does not know its atlas set: the set given tells
    atlases = _user_atlas_set(tmp_path / "atlases")
    out = assess_case(ct, pet, "R", station_mapping=mapping, atlases=atlases, model=user_model, case_id="site",
                      out_dir=tmp_path / "out").result
    assert out.provenance == {"atlases": "user", "model": "user", "demo": False}
    assert out.demo_banner is None and not any("not valid for patients" in w for w in out.warnings)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["provenance"]["demo"] is False
    assert out.text_table().splitlines()[0].startswith("station")
    # the demo model under another name is still the demo model
    import shutil

    from LymphNodeStagingLib.paths import demo_model_path

    copy = shutil.copy(demo_model_path(), tmp_path / "renamed.pt")
    shutil.copy(demo_model_path().with_suffix(".json"), tmp_path / "renamed.json")
    again = assess_case(ct, pet, "R", station_mapping=mapping, atlases=atlases, model=copy, case_id="site").result
    assert again.provenance["model"] == "demo" and again.provenance["atlases"] == "user"
    assert again.text_table().splitlines()[0].startswith("*** DEMO MODEL")
