"""Training from a cohort CSV (lnstaging train): validation rows, cached station maps, a loadable checkpoint."""

from __future__ import annotations

import json

import pytest

from LymphNodeStagingLib.classifier.checkpoint import load_model
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.cohort.table import read_cohort
from LymphNodeStagingLib.training.cases import prepare_case
from LymphNodeStagingLib.training.from_cohort import split_rows


@pytest.fixture(scope="module")
def cohort_and_atlases(tmp_path_factory):
    from LymphNodeStagingLib.phantom import generate_atlas_set, generate_cohort

    root = tmp_path_factory.mktemp("train")
    csv = generate_cohort(root / "cohort", patients=5, seed=77, size="small")
    atlases = generate_atlas_set(root / "atlases", atlases=2, seed=3, size="small")
    return csv, atlases, root


def test_split_rows_uses_the_split_column_or_a_stratified_share(cohort_and_atlases):
    csv, _, _ = cohort_and_atlases
    rows = read_cohort(csv).usable_rows()
    train, val = split_rows(rows, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == len(rows) and len(val) == 1
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}
    rows[0].split, rows[1].split, rows[2].split = "val", "test", "train"
    train, val = split_rows(rows)
    assert [r.line for r in val] == [rows[0].line]
    assert rows[1].line not in [r.line for r in train + val]


@pytest.mark.slow
def test_station_maps_are_cached_per_case(cohort_and_atlases, tmp_path):
    from LymphNodeStagingLib.mapping.atlas import load_atlas_set

    csv, atlases, _ = cohort_and_atlases
    row = read_cohort(csv).usable_rows()[0]
    atlas_set = load_atlas_set(atlases)
    first = prepare_case(row, atlas_set, tmp_path)
    again = prepare_case(row, atlas_set, tmp_path)
    assert not first.from_cache and again.from_cache
    assert (first.sampler.present == again.sampler.present).all()
    assert (first.sampler.centroids()[first.sampler.present] == again.sampler.centroids()[again.sampler.present]).all()


@pytest.mark.slow
def test_training_reuses_the_station_maps_of_a_batch_run(cohort_and_atlases, tmp_path):
    """One station-map store: a case mapped by `lnstaging batch` is not registered again by train/evaluate."""
    from LymphNodeStagingLib.batch.run import run_batch
    from LymphNodeStagingLib.mapping.atlas import load_atlas_set

    csv, atlases, _ = cohort_and_atlases
    store = tmp_path / "store"
    s = run_batch(csv, tmp_path / "batch", workers=0, steps="stations", atlases=atlases, threads_per_worker=1,
                  map_store=store)
    assert s.counts["ok"] == 5
    rows = read_cohort(csv).usable_rows()
    prep = prepare_case(rows[0], load_atlas_set(atlases), store)
    assert prep.from_cache
    # a second batch run elsewhere takes its station maps from the store as well
    s2 = run_batch(csv, tmp_path / "batch2", workers=0, steps="stations", atlases=atlases, threads_per_worker=1,
                   map_store=store)
    manifest = json.loads((s2.out_dir / "cases" / rows[1].scan_id / "case.json").read_text())
    assert manifest["steps"]["stations"]["info"]["from_store"] is True


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint(cohort_and_atlases, capsys):
    csv, atlases, root = cohort_and_atlases
    out = root / "ts1"
    argv = ["train", str(csv), "--strategy", "ts1", "--out", str(out), "--small", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--batch-size", "8", "--atlases", str(atlases), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "ts1" and data["epochs_run"] == 1
    model, manifest = load_model(data["checkpoint"])
    assert manifest["kind"] == "station" and 0.0 <= manifest["threshold"] <= 1.0
    # one station map per scan in the shared store (the test session's cache folder)
    from LymphNodeStagingLib.paths import station_map_store_path

    assert len([d for d in station_map_store_path().iterdir() if not d.name.startswith(".")]) >= 5


@pytest.mark.slow
def test_calibrate_command_writes_a_calibrated_checkpoint(cohort_and_atlases, tmp_path, capsys):
    """A trained model is calibrated on held-out scans; the new checkpoint carries the calibration and loads."""
    csv, atlases, root = cohort_and_atlases
    train_out = tmp_path / "ts1"
    assert main(["train", str(csv), "--strategy", "ts1", "--out", str(train_out), "--small", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--batch-size", "8", "--atlases", str(atlases), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(csv), "--model", str(train_out / "best.pt"), "--out", str(out), "--atlases",
                 str(atlases), "--method", "temperature", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calibration"]["method"] == "temperature" and data["scans"] == 5 and 0 <= data["threshold"] <= 1
    _, manifest = load_model(out)
    assert manifest["calibrated"] and manifest["calibration_data"]["scans"] == 5
    assert main(["calibrate", str(csv), "--out", str(tmp_path / "x.txt"), "--atlases", str(atlases)]) == 2
