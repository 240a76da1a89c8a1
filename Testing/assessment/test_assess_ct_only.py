"""CT-only mode: ``assess_case`` and ``lnstaging assess`` with a CT and no PET. The result says so (modality "ct",
no PET input, no SUV figures, station volumes still, a warning line), the overview is written without a PET overlay,
a PET/CT model is refused before the anatomy and the mapping, the child process of the GUIs runs without a PET, and
the bundled CT-only demo model loads and reads the CT alone.

The station mapping is the phantom's true station map (no registration); the CT-only model is a seeded random small
classifier with one input channel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from case_fixtures import ct_only_model, phantom_case_files
from node_fixtures import torch_threads

from LymphNodeStagingLib.assessment.assess import assess_case
from LymphNodeStagingLib.assessment.process import AssessmentJob, run_assessment_process
from LymphNodeStagingLib.classifier.checkpoint import file_sha256
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.errors import LNSError, UsageError
from LymphNodeStagingLib.mapping.station_mapping import read_station_mapping
from LymphNodeStagingLib.paths import BUNDLED_MODELS, DEMO_CT_MODEL, demo_ct_model_path, demo_model_path
from LymphNodeStagingLib.preflight.parameters import check_model, model_modality
from LymphNodeStagingLib.staging.result import CT_ONLY_MODEL_NOTE, CT_ONLY_NOTE, CaseResult, make_case_result
from LymphNodeStagingLib.suv.statistics import station_suv_stats, station_volume_stats


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The phantom case of ``phantom_case_files`` (its model reads CT and PET) and a CT-only model."""
    root = tmp_path_factory.mktemp("assess-ct-only")
    files = phantom_case_files(root, 2718)
    ct_model = ct_only_model(root / "ct_model.pt", seed=1)
    return {**files, "ct_model": str(ct_model), "root": root}


@pytest.fixture(scope="module")
def ct_only(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct-only-out")
    seen: list[str] = []
    with torch_threads(1):
        res = assess_case(case["paths"]["ct"], None, case["side"], model=case["ct_model"], case_id="PH2718",
                          station_mapping=read_station_mapping(case["mapping"]), out_dir=out,
                          progress=lambda p: seen.append(p.message))
    return res, out, seen


def test_station_volume_stats_are_the_volumes_of_station_suv_stats():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:6, 2:6, 2:6] = 8  # 4R: 64 voxels of 2 x 2 x 3 mm = 0.768 ml
    arr[10:12, 10:15, 10:13] = 11  # 7
    arr[15, 15, 15] = 200  # not a station label
    stations = sitk.GetImageFromArray(arr)
    stations.SetSpacing((2.0, 2.0, 3.0))
    pet = sitk.GetImageFromArray(np.ones((20, 20, 20), np.float32))
    pet.CopyInformation(stations)
    volumes = station_volume_stats(stations)
    assert volumes == {"4R": {"volume_ml": pytest.approx(0.768)}, "7": {"volume_ml": pytest.approx(0.360)}}
    with_pet = station_suv_stats(pet, stations)
    assert {k: v["volume_ml"] for k, v in with_pet.items()} == {k: v["volume_ml"] for k, v in volumes.items()}


def test_ct_alone_gives_a_ct_only_result(ct_only):
    res, out, seen = ct_only
    r = res.result
    assert r.modality == "ct" and r.inputs["pet"] is None and res.pet is None
    assert r.model["modality"] == "ct" and r.suv["mode"] == "none"
    assert CT_ONLY_NOTE in r.warnings
    present = [s for s in r.stations if s.present]
    assert len(present) >= 15
    volumes = station_volume_stats(res.station_map)
    for s in present:
        assert s.suv_max is None and s.suv_peak is None
        assert 0.0 <= s.probability <= 1.0
        assert s.volume_ml == pytest.approx(volumes[s.name]["volume_ml"])
    assert "suv_stats" in r.timings_s and "classifying stations" in seen
    assert r.text_table().splitlines()[1 if r.demo_banner else 0].startswith("CT only (no PET)")


def test_ct_only_files_round_trip(ct_only):
    res, out, _ = ct_only
    data = json.loads((out / "result.json").read_text())
    assert data["modality"] == "ct" and data["inputs"]["pet"] is None
    assert all(s["suv_max"] is None and s["suv_peak"] is None for s in data["stations"])
    back = CaseResult.read_json(out / "result.json")
    assert back.modality == "ct" and back.to_dict() == res.result.to_dict()
    assert back.restage(threshold=0.2).modality == "ct"
    rows = (out / "result.csv").read_text().splitlines()
    header = rows[0].split(",")
    suv = header.index("suv_max")
    assert all(r.split(",")[suv] == "" for r in rows[1:])
    assert (out / "overview.png").stat().st_size > 20_000 and (out / "stations.nii.gz").is_file()


def test_ct_only_overview_has_no_pet_overlay(ct_only, case, tmp_path):
    """The same case with its PET and the same CT-only model (so the same station colours): the overview paints the
    PET's hot colours over the CT; without the PET it does not."""
    from matplotlib.image import imread

    res, out, _ = ct_only
    with torch_threads(1):
        petct = assess_case(case["paths"]["ct"], case["paths"]["pet"], case["side"], model=case["ct_model"],
                            pet_is_suv=True, case_id="PH2718", station_mapping=read_station_mapping(case["mapping"]),
                            out_dir=tmp_path)
    # a CT-only model with a PET: allowed, the PET is not read by the model but its SUV figures are reported
    r = petct.result
    assert r.modality == "petct" and r.model["modality"] == "ct" and CT_ONLY_MODEL_NOTE in r.warnings
    assert any(s.suv_max is not None for s in r.stations) and CT_ONLY_NOTE not in r.warnings

    def red(path) -> int:  # pixels of the PET's hot colours, and of the station fill (the same in both: one model)
        img = imread(path)[..., :3]
        return int(((img[..., 0] - img[..., 1]) > 0.3).sum())

    assert red(tmp_path / "overview.png") > red(out / "overview.png") + 100


def test_petct_model_with_a_ct_alone_is_refused_before_the_mapping(case, tmp_path):
    """Refused right after the model is loaded: there is no atlas set and no anatomy, so any later step would have
    failed otherwise; nothing is written."""
    seen: list[str] = []
    with pytest.raises(UsageError, match=r"model .*model\.pt.* reads the PET.*--model"):
        assess_case(case["paths"]["ct"], None, case["side"], model=case["model"], atlases=tmp_path / "no-atlases",
                    out_dir=tmp_path / "out", progress=lambda p: seen.append(p.message))
    assert seen == ["loading and checking images"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_assess_cli_ct_alone_exit_codes(case, tmp_path, capsys):
    paths = case["paths"]
    base = ["assess", "--ct", str(paths["ct"]), "--side", case["side"], "--anatomy", str(paths["anatomy"]),
            "--atlases", str(tmp_path / "no-atlases"), "--threads", "1"]
    code = main([*base, "--model", case["model"], "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "reads the PET" in err and "Traceback" not in err
    code = main([*base, "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and "missing.pt" in err and "Traceback" not in err
    code = main([*base[:3], "--side", case["side"], "--pet", str(tmp_path / "no-pet.nii.gz"), "--pet-is-suv",
                 "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1 and "no-pet.nii.gz" in err
    code = main(["assess", "--side", "L", "--out", str(tmp_path / "d")])  # the CT stays required
    assert code == 2 and "--ct" in capsys.readouterr().err


def test_train_modality_ct_refuses_the_hybrid_head(case, tmp_path, capsys):
    code = main(["train", str(tmp_path / "cohort.csv"), "--strategy", "ts1", "--modality", "ct", "--hybrid",
                 "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert code == 2 and "--modality ct" in err and "--hybrid" in err


def test_ct_only_result_dict_and_older_results():
    r = make_case_result("X", "L", {"4R": 0.9, "7": 0.1})
    assert r.modality == "petct"
    r.modality = "ct"
    d = r.to_dict()
    assert CaseResult.from_dict(d).modality == "ct"
    d.pop("modality")  # a result written before CT-only mode was PET/CT
    assert CaseResult.from_dict(d).modality == "petct"
    with pytest.raises(LNSError, match="modality"):
        CaseResult.from_dict({**d, "modality": "mri"})


def test_child_process_assesses_a_ct_alone(case, tmp_path):
    job = AssessmentJob(ct=str(case["paths"]["ct"]), pet=None, side=case["side"], out_dir=str(tmp_path / "job"),
                        model=case["ct_model"], case_id="PH2718", station_mapping=case["mapping"])
    assert AssessmentJob.from_dict({k: v for k, v in job.to_dict().items() if k != "pet"}).pet is None
    output = run_assessment_process(job, timeout=300)
    assert output.result.modality == "ct" and output.pet is None
    assert output.result.inputs["pet"] is None and CT_ONLY_NOTE in output.result.warnings
    assert output.files["overview"].is_file()


def test_bundled_ct_only_model_reads_the_ct_alone():
    path = demo_ct_model_path()
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert file_sha256(path) == BUNDLED_MODELS[DEMO_CT_MODEL.name]
    net, manifest, used = check_model(None, pet=False)  # no model and no PET: the bundled CT-only one
    assert used == path and model_modality(net) == "ct"
    assert manifest["model_config"]["in_channels"] == 1 and manifest.get("calibrated") is True
    net, _, used = check_model(None)  # with a PET: the PET/CT demo model, as before
    assert used == demo_model_path() and model_modality(net) == "petct"
