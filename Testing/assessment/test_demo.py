"""The demo command end to end: a phantom patient assessed with the bundled model and the bundled atlas set."""

from __future__ import annotations

import json

from LymphNodeStagingLib.classifier.checkpoint import load_model
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.paths import demo_model_path
from LymphNodeStagingLib.staging.stations import STATION_NAMES


def test_bundled_model_is_small_and_verified():
    path = demo_model_path()
    assert path.is_file() and path.stat().st_size <= 10 * 1024 * 1024
    model, manifest = load_model(path)
    assert manifest["kind"] == "station" and manifest["strategy"] == "ts1"
    assert manifest["model_config"]["patch_spacing"] == 2.0 and 0.0 < manifest["threshold"] < 1.0
    assert manifest["data"]["train_cases"] > 100  # trained on a phantom cohort, not a toy


def test_demo_small_patient(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "small", "--seed", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    case = res["case"]
    assert case["n_stage"] in ("N0", "N1", "N2", "N3")
    assert [s["name"] for s in case["stations"]] == list(STATION_NAMES)
    present = [s for s in case["stations"] if s["present"]]
    assert len(present) >= 12 and all(0.0 <= s["probability"] <= 1.0 for s in present)
    assert res["truth"]["n_stage"] in ("N0", "N1", "N2", "N3")
    for key, name in (("result_json", "result.json"), ("result_csv", "result.csv"), ("stations", "stations.nii.gz"),
                      ("overview", "overview.png")):
        assert res["files"][key] == str(out / "assessment" / name) and (out / "assessment" / name).is_file()
    assert (out / "patient" / "ct.nii.gz").is_file() and (out / "patient" / "truth.json").is_file()
    # the text form prints the table with the truth column and the N-stage
    assert main(["demo", "--out", str(out), "--size", "small", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "truth" in text and "Result:" in text and "station" in text
