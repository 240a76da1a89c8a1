"""The station network on the command line and in a cohort run: train-stations, map --method, batch --method,
bench mapping --cohort, and their errors (named options and files, exit status, nothing written)."""

from __future__ import annotations

import json

import pytest

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.stationnet.data import StationDataConfig
from LymphNodeStagingLib.stationnet.network import StationNetConfig


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from LymphNodeStagingLib.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("station-cli") / "cohort", patients=3, seed=41, size="small")


@pytest.fixture(scope="module")
def model(cohort, tmp_path_factory):
    """A tiny station network (4 epochs) trained through the library."""
    from LymphNodeStagingLib.stationnet.train import StationTrainConfig, train_stations

    out = tmp_path_factory.mktemp("station-cli-model")
    res = train_stations(cohort, out, "truth", config=StationTrainConfig(epochs=4, patch=(16, 16, 16), num_threads=1),
                         model_config=StationNetConfig.tiny(), data_config=StationDataConfig(spacing=(8, 8, 8)))
    return res.checkpoint


def test_train_stations_cli(cohort, tmp_path, capsys):
    out = tmp_path / "net"
    code = main(["train-stations", str(cohort), "--labels", "truth", "--epochs", "1", "--patch", "16", "16", "16",
                 "--channels", "4,8", "--threads", "1", "--out", str(out), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["labels"] == "truth" and res["epochs_run"] == 1
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "history.json").is_file()


def test_train_stations_cli_errors(cohort, tmp_path, capsys):
    assert main(["train-stations", str(cohort), "--labels", "drawn", "--out", str(tmp_path / "a")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["train-stations", str(tmp_path / "missing.csv"), "--labels", "truth",
                 "--out", str(tmp_path / "b")]) == 1
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert main(["train-stations", str(cohort), "--labels", "truth", "--channels", "4,x",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--channels" in capsys.readouterr().err
    lines = cohort.read_text().splitlines()
    col = lines[0].split(",").index("anatomy_path")
    rows = [",".join("" if i == col else v for i, v in enumerate(line.split(","))) for line in lines[1:]]
    bad = cohort.parent / "no_anatomy.csv"
    bad.write_text("\n".join([lines[0], *rows]) + "\n")
    assert main(["train-stations", str(bad), "--labels", "atlas", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "anatomy_path is empty" in err and "no_anatomy.csv" in err
    assert not (tmp_path / "d" / "best.pt").exists()


def test_map_methods(cohort, model, tmp_path, capsys):
    ct = cohort.parent / "PH0001" / "ct.nii.gz"
    out = tmp_path / "net"
    assert main(["map", "--ct", str(ct), "--method", "network", "--station-model", str(model), "--threads", "1",
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "network" and res["model"]["labels"] == "truth"
    for name in ("stations.nii.gz", "vote_fractions.nii.gz", "centroids.json", "mapping.json", "overlay.png"):
        assert (out / name).is_file()


def test_map_errors(cohort, model, tmp_path, capsys):
    ct = cohort.parent / "PH0001" / "ct.nii.gz"
    assert main(["map", "--ct", str(ct), "--method", "atlas", "--out", str(tmp_path / "a")]) == 2
    assert "--anatomy" in capsys.readouterr().err
    assert main(["map", "--ct", str(ct), "--method", "neural", "--out", str(tmp_path / "b")]) == 2
    assert "--method" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["map", "--ct", str(ct), "--method", "network", "--station-model", str(bad),
                 "--out", str(tmp_path / "c")]) == 1
    assert "bad.pt" in capsys.readouterr().err
    assert not (tmp_path / "c" / "stations.nii.gz").exists()
    # a node model or a classifier is not a station network
    from LymphNodeStagingLib.paths import demo_model_path

    assert main(["map", "--ct", str(ct), "--method", "network", "--station-model", str(demo_model_path()),
                 "--out", str(tmp_path / "d")]) == 1
    assert "station_net" in capsys.readouterr().err
    assert main(["map", "--ct", str(tmp_path / "none.nii.gz"), "--method", "network", "--station-model", str(model),
                 "--out", str(tmp_path / "e")]) == 1
    assert "none.nii.gz" in capsys.readouterr().err


def test_batch_network_method_skips_the_anatomy(cohort, model, tmp_path):
    from LymphNodeStagingLib.batch.run import run_batch

    out = tmp_path / "run"
    summary = run_batch(cohort, out, workers=0, steps="suv,stations", threads_per_worker=1, method="network",
                        station_model=model)
    assert summary.to_dict()["counts"]["ok"] == 3
    case = next((out / "cases").iterdir())
    assert not (case / "anatomy").exists()
    info = json.loads((case / "stations" / "station_info.json").read_text())
    assert info["method"] == "network"
    with pytest.raises(Exception, match="method"):
        run_batch(cohort, tmp_path / "x", workers=0, steps="suv,stations", method="neural")


def test_bench_mapping_cohort(cohort, model, capsys):
    assert main(["bench", "mapping", "--method", "network", "--cohort", str(cohort), "--station-model", str(model),
                 "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    net = res["network"]
    assert res["cases"] == 3 and net["node_assignment"]["nodes"] > 0
    assert 0.0 <= net["node_assignment"]["accuracy"] <= 1.0
    assert set(net["station_dice"]) and net["seconds_per_case"]["mean"] > 0


def test_assess_from_the_ct_alone_and_both(cohort, model, tmp_path, capsys):
    """assess --method network needs no anatomy (no TotalSegmentator); --method both reports the agreement."""
    case = cohort.parent / "PH0001"
    common = ["--ct", str(case / "ct.nii.gz"), "--pet", str(case / "pet.nii.gz"), "--pet-is-suv", "--side", "L",
              "--station-model", str(model), "--threads", "1", "--json"]
    assert main(["assess", *common, "--method", "network", "--out", str(tmp_path / "net")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["atlases"]["method"] == "network" and res["inputs"]["anatomy"] == "not used (station network)"
    assert res["atlases"]["station_network"]["labels"] == "truth"
    assert (tmp_path / "net" / "stations.nii.gz").is_file()
    from LymphNodeStagingLib.phantom import generate_atlas_set

    atlases = generate_atlas_set(tmp_path / "atlases", atlases=2, seed=1000, size="small")
    assert main(["assess", *common, "--method", "both", "--anatomy", str(case / "anatomy.nii.gz"),
                 "--atlases", str(atlases), "--out", str(tmp_path / "both")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["atlases"]["method"] == "both" and set(res["atlases"]["agreement_dice"]) >= {"7", "4R"}
