"""Case assessment: SUV figures per station, the full pipeline on a phantom case, output files and schema, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.assessment.assess import assess_case
from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
from LymphNodeStagingLib.classifier.model import ModelConfig, build_model
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.staging.result import CaseResult
from LymphNodeStagingLib.staging.stations import STATION_NAMES
from LymphNodeStagingLib.suv.statistics import SUVPEAK_RADIUS_MM, station_suv_stats


def test_station_suv_stats_by_hand():
    stations = sitk.Image([30, 30, 30], sitk.sitkUInt8)
    stations.SetSpacing((2.0, 2.0, 2.0))
    arr = np.zeros((30, 30, 30), np.uint8)
    arr[3:13, 3:13, 3:13] = 8  # 4R: 1000 voxels of 8 mm^3 = 8 ml
    arr[20:25, 20:25, 20:25] = 11  # 7
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(stations)
    pet_arr = np.ones((30, 30, 30), np.float32)
    pet_arr[8, 8, 8] = 9.0  # a hot voxel inside 4R
    pet_arr[17:30, 17:30, 17:30] = 3.0  # a uniform hot block around 7, out of reach of 4R's spheres
    pet = sitk.GetImageFromArray(pet_arr)
    pet.CopyInformation(stations)
    stats = station_suv_stats(pet, img)
    assert set(stats) == {"4R", "7"}
    assert stats["4R"]["suv_max"] == pytest.approx(9.0)
    assert stats["4R"]["volume_ml"] == pytest.approx(8.0)
    assert stats["7"]["suv_max"] == pytest.approx(3.0)
    assert stats["7"]["suv_peak"] == pytest.approx(3.0)  # uniform within the sphere
    # brute force: for every centre in 4R, the mean over the sphere's voxels that lie in 4R; the largest is the peak
    offsets = [(z, y, x) for z in range(-4, 5) for y in range(-4, 5) for x in range(-4, 5)
               if 4 * (x * x + y * y + z * z) <= SUVPEAK_RADIUS_MM**2]
    best = 0.0
    for c in np.argwhere(arr == 8):
        vals = [pet_arr[tuple(c + o)] for o in np.asarray(offsets) if arr[tuple(c + o)] == 8]
        best = max(best, float(np.mean(vals)))
    assert stats["4R"]["suv_peak"] == pytest.approx(best, rel=1e-5)
    assert 1.0 + 8.0 / len(offsets) <= best < 9.0


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    from LymphNodeStagingLib.phantom import generate_atlas_set, generate_patient, write_patient

    root = tmp_path_factory.mktemp("assess")
    patient = generate_patient(4321, "small")
    paths = write_patient(patient, root / "PH4321")
    atlases = generate_atlas_set(root / "atlases", atlases=2, seed=99, size="small")
    cfg = ModelConfig.small(32)
    torch_seed = __import__("torch").manual_seed(0)
    assert torch_seed is not None
    model = save_checkpoint(root / "model.pt", build_model("station", cfg),
                            {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    return patient, paths, atlases, model, root


@pytest.mark.slow
def test_assess_phantom_case_end_to_end(phantom_case):
    patient, paths, atlases, model, root = phantom_case
    out = root / "out"
    seen = []
    res = assess_case(paths["ct"], paths["pet"], patient.truth["tumour_side"], anatomy=paths["anatomy"], model=model,
                      atlases=atlases, pet_is_suv=True, out_dir=out, progress=lambda p: seen.append(p.fraction))
    r = res.result
    assert r.case_id == "PH4321"
    assert [s.name for s in r.stations] == list(STATION_NAMES)
    present = [s for s in r.stations if s.present]
    assert len(present) >= 15
    for s in present:
        assert 0.0 <= s.probability <= 1.0
        assert s.status in ("positive", "negative")
        assert s.suv_max is not None and s.suv_peak is not None and s.suv_peak <= s.suv_max + 1e-4
        assert s.centre_mm is not None and len(s.centre_mm) == 3
        # the patch centre lies inside the station on the fused map
        idx = res.station_map.TransformPhysicalPointToIndex(s.centre_mm)
        assert res.station_map[idx] == s.label
    assert r.n_stage in ("N0", "N1", "N2", "N3") and r.rules == "ajcc8"
    assert r.model["sha256"] and r.atlases["atlases"]
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    for name in ("result.json", "result.csv", "stations.nii.gz", "overview.png"):
        assert (out / name).is_file(), name
    back = CaseResult.read_json(out / "result.json")
    assert back.n_stage == r.n_stage and back.stations == r.stations
    # the SUVmax of the hottest true malignant node's station is high
    truth = patient.truth
    assert (out / "overview.png").stat().st_size > 20_000
    assert truth["tumour_side"] == r.side


@pytest.mark.slow
def test_assess_cli_json_and_errors(phantom_case, capsys, trained_snet):
    patient, paths, atlases, model, root = phantom_case
    code = main(["assess", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--pet-is-suv",
                 "--anatomy", str(paths["anatomy"]), "--side", patient.truth["tumour_side"], "--model", str(model),
                 "--atlases", str(atlases), "--rules", "engelson2026", "--out", str(root / "cli"), "--json",
                 "--node-model", str(trained_snet[1].checkpoint), "--threads", "1"])
    out = capsys.readouterr().out
    data = json.loads(out)
    assert code == 0 and data["rules"] == "engelson2026" and len(data["stations"]) == 17
    assert set(data["files"]) >= {"result_json", "result_csv", "stations", "overview", "nodes"}
    assert isinstance(data["nodes"], list) and data["model"]["node_model"]["arch"] == "snet"
    # a PET file without --pet-is-suv has no header to compute SUV from: clear error naming the option
    code = main(["assess", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--anatomy", str(paths["anatomy"]),
                 "--side", "R", "--model", str(model), "--atlases", str(atlases), "--out", str(root / "x")])
    err = capsys.readouterr().err
    assert code == 1 and "pet-is-suv" in err
    code = main(["assess", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--pet-is-suv", "--side", "R",
                 "--anatomy", str(paths["anatomy"]), "--model", str(root / "missing.pt"), "--atlases", str(atlases),
                 "--out", str(root / "y")])
    err = capsys.readouterr().err
    assert code == 1 and "missing.pt" in err


def test_pet_not_covering_the_mediastinum_is_refused(tmp_path):
    """A PET that stops above the mediastinum is refused before the station mapping (docs/how-to/dicom-input.md)."""
    from LymphNodeStagingLib.assessment.assess import assess_case
    pass
    from LymphNodeStagingLib.phantom import generate_patient

    p = generate_patient(5, size="small")
    pet = p.pet
    size = list(pet.GetSize())
    top = pet[:, :, size[2] - 3:]  # the three most cranial slices only
    with pytest.raises(InputError, match="PET does not cover the mediastinum"):
        assess_case(p.ct, top, "R", anatomy=p.anatomy, atlases=tmp_path / "no-atlases-needed")
