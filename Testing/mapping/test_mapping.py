"""map_stations end to end on synthetic shapes: an atlas set written by the test, a patient with a known warp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from mapping_shapes import body, dice, smooth_warp

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.mapping.atlas import load_atlas_set
from LymphNodeStagingLib.mapping.registration import RegistrationConfig
from LymphNodeStagingLib.mapping.station_mapping import map_stations
from LymphNodeStagingLib.mapping.weightmap import assign_points

FAST = RegistrationConfig(threads=1, iterations=(30, 25), affine_iterations=40)


@pytest.fixture(scope="module")
def toy_atlases(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlases")
    entries = []
    for k, (scale, shift) in enumerate([(1.0, (0, 0, 0)), (1.05, (5, -4, 6)), (0.96, (-5, 3, -6))]):
        anat, st = body(smooth_warp(5, scale, shift, seed=k))
        aid = f"atlas{k + 1:02d}"
        (root / aid).mkdir()
        ct = sitk.Cast(anat > 0, sitk.sitkInt16) * 1000 - 1000
        for key, img in (("ct", ct), ("anatomy", anat), ("stations", st)):
            sitk.WriteImage(img, str(root / aid / f"{key}.nii.gz"))
        entries.append({"id": aid, **{key: f"{aid}/{key}.nii.gz" for key in ("ct", "anatomy", "stations")}})
    (root / "manifest.json").write_text(json.dumps({
        "format": "lnstaging-atlas-set", "format_version": 1, "name": "toy", "synthetic": True, "description": "",
        "anatomy_vocabulary": "totalsegmentator-total-v2", "atlases": entries}))
    return root


@pytest.fixture(scope="module")
def toy_patient():
    return body(smooth_warp(7, 1.02, (3, 2, -4), seed=9))


def test_map_stations_on_toy_patient(toy_atlases, toy_patient):
    anat, truth_img = toy_patient
    aset = load_atlas_set(toy_atlases, allow_missing_stations=True)
    calls = []
    m = map_stations(None, anat, aset, config=FAST, evaluate_anatomy=True, progress=lambda p: calls.append(p.fraction))
    assert calls and calls[-1] == 1.0 and calls == sorted(calls)
    # the fused map is a crop of the patient grid: compare on that crop
    g = m.geometry
    full = sitk.GetArrayFromImage(truth_img)
    lo = np.rint((g.origin - np.array(truth_img.GetOrigin())) / np.array(truth_img.GetSpacing())).astype(int)
    truth = full[lo[2]:lo[2] + g.shape[2], lo[1]:lo[1] + g.shape[1], lo[0]:lo[0] + g.shape[0]]
    assert (full > 0).sum() == (truth > 0).sum()  # the crop holds every true station voxel
    for lab, name in ((5, "3A"), (7, "4L"), (8, "4R"), (9, "5"), (11, "7")):
        assert dice(m.labels == lab, truth == lab) > 0.75, name
        assert m.flags[name] == "ok" and 0.5 < m.agreement[name] <= 1.0
    assert m.flags["10R"] == "absent" and np.isnan(m.agreement["10R"])
    assert m.warnings == [] and m.atlas_set == {"name": "toy", "synthetic": True}  # plausible; provenance kept
    assert m.anatomy_dice["mean"]["mean"] > 0.8
    # node-to-station assignment at the true station centroids
    pts, names = [], []
    for lab, name in ((5, "3A"), (7, "4L"), (8, "4R"), (9, "5"), (11, "7")):
        idx = np.argwhere(full == lab).mean(0)[::-1]
        pts.append(np.array(truth_img.GetOrigin()) + idx * np.array(truth_img.GetSpacing()))
        names.append(name)
    assert assign_points(np.array(pts), m.weight_maps) == names
    assert set(m.timings) >= {"affine", "deformable", "fusion", "warp_stations", "weight_maps"}


def test_map_command_writes_outputs(toy_atlases, toy_patient, tmp_path, capsys):
    anat, _ = toy_patient
    sitk.WriteImage(anat, str(tmp_path / "anat.nii.gz"))
    ct = sitk.Cast(anat > 0, sitk.sitkInt16) * 1200 - 1000
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    rc = main(["map", "--ct", str(tmp_path / "ct.nii.gz"), "--anatomy", str(tmp_path / "anat.nii.gz"),
               "--atlases", str(toy_atlases), "--out", str(out), "--iterations", "20,15", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stations"]["7"]["flag"] == "ok" and len(result["stations"]) == 17
    for name in ("stations.nii.gz", "vote_fractions.nii.gz", "centroids.json", "mapping.json", "overlay.png"):
        assert (out / name).is_file(), name
    votes = sitk.ReadImage(str(out / "vote_fractions.nii.gz"))
    assert votes.GetNumberOfComponentsPerPixel() == 17
    centres = json.loads((out / "centroids.json").read_text())["centres"]
    assert set(centres) == {"3A", "4L", "4R", "5", "7"}


def test_map_command_errors(toy_atlases, tmp_path, capsys):
    rc = main(["map", "--ct", str(tmp_path / "missing.nii.gz"), "--anatomy", str(tmp_path / "a.nii.gz"),
               "--atlases", str(toy_atlases), "--out", str(tmp_path / "o")])
    assert rc == 1 and "missing.nii.gz" in capsys.readouterr().err
