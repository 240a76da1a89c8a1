"""The node commands end to end: train-nodes, nodes, evaluate-nodes and bench nodes, with --json and the exit codes
of bad input (1) and bad usage (2)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.cohort.table import read_cohort, write_cohort
from LymphNodeStagingLib.paths import demo_model_path
from LymphNodeStagingLib.runtime import THREAD_ENV


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """Exit code, the JSON printed (when there is one) and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    text = captured.out.strip()
    data = json.loads(text) if text.startswith("{") else None
    if data is not None:
        assert text.count("\n") == 0, "--json prints one JSON object on one line"
    return code, data, captured.err


@pytest.fixture(scope="module")
def first_row(node_cohort):
    return read_cohort(node_cohort).rows[0]


def test_train_nodes_json(capsys, node_cohort, tmp_path):
    code, data, err = run(capsys, "train-nodes", str(node_cohort), "--arch", "unet3d", "--out", str(tmp_path / "m"),
                          "--width", "0.125", "--spacing", "4", "4", "8", "--min-inplane", "32", "--epochs", "1",
                          "--max-steps-per-epoch", "2", "--patch", "16", "32", "32", "--json")
    assert code == 0, err
    assert data["arch"] == "unet3d" and data["epochs_run"] == 1 and data["skipped_without_nodes"] == 0
    assert (tmp_path / "m" / "best.pt").is_file() and (tmp_path / "m" / "history.json").is_file()
    assert data["train_cases"] + data["val_cases"] == 4 and data["val_cases"] == 1


def test_nodes_json_and_files(capsys, trained_snet, first_row, tmp_path):
    _, result = trained_snet
    out = tmp_path / "n"
    code, data, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--pet", str(first_row.pet_path),
                          "--pet-is-suv", "--stations", str(first_row.stations_path), "--model",
                          str(result.checkpoint), "--threshold", "0.5", "--out", str(out), "--json")
    assert code == 0, err
    assert data["n_nodes"] == len(data["nodes"]) and data["threshold"] == 0.5 and data["crop"]["source"] == "stations"
    for name in ("nodes.nii.gz", "nodes.csv", "nodes.json", "overview.png"):
        assert (out / name).is_file(), name
    with open(out / "nodes.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == data["n_nodes"] and "short_axis_mm" in (rows[0] if rows else {"short_axis_mm": 0})
    assert json.loads((out / "nodes.json").read_text())["model"]["arch"] == "snet"
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nodes_text_output(capsys, trained_snet, first_row, tmp_path):
    _, result = trained_snet
    code, data, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--anatomy", str(first_row.anatomy_path),
                          "--model", str(result.checkpoint), "--out", str(tmp_path / "t"))
    assert code == 0, err
    assert data is None


def test_nodes_refusals(capsys, trained_snet, first_row, tmp_path, monkeypatch):
    from LymphNodeStagingLib import paths

    _, result = trained_snet
    out = tmp_path / "never"
    # no model and the bundled one missing (an installation without it): a usage error that says how to get one
    monkeypatch.setattr(paths, "bundled_models_dir", lambda: tmp_path / "no-bundled-models")
    code, _, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--out", str(out))
    monkeypatch.undo()
    assert code == 2 and "train-nodes" in err
    # a missing CT: bad input, named
    code, _, err = run(capsys, "nodes", "--ct", str(tmp_path / "absent.nii.gz"), "--model", str(result.checkpoint),
                       "--out", str(out))
    assert code == 1 and "absent.nii.gz" in err
    # a PET image file that is not declared SUV
    code, _, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--pet", str(first_row.pet_path),
                       "--model", str(result.checkpoint), "--out", str(out))
    assert code == 1 and "pet-is-suv" in err
    # a station classifier is not a node model
    code, _, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--model", str(demo_model_path()),
                       "--out", str(out))
    assert code == 1 and "'nodes' model" in err
    # a station map with labels outside 0..17
    code, _, err = run(capsys, "nodes", "--ct", str(first_row.ct_path), "--stations", str(first_row.ct_path),
                       "--model", str(result.checkpoint), "--out", str(out))
    assert code == 1 and "--stations" in err
    # --stations and --anatomy together, and a threshold outside 0..1: usage errors
    code, _, _ = run(capsys, "nodes", "--ct", "CT", "--stations", "S", "--anatomy", "A", "--out", str(out))
    assert code == 2
    code, _, _ = run(capsys, "nodes", "--ct", "CT", "--threshold", "1.5", "--out", str(out))
    assert code == 2
    assert not out.exists()  # refused before anything was written


def test_evaluate_nodes_json(capsys, trained_snet, node_cohort, tmp_path):
    _, result = trained_snet
    out = tmp_path / "e"
    code, data, err = run(capsys, "evaluate-nodes", str(node_cohort), "--model", str(result.checkpoint), "--out",
                          str(out), "--json")
    assert code == 0, err
    assert data["n_scans"] == 4 and set(data["summary"]) == {"all", "<5mm", "5-10mm", ">=10mm", ">=5mm"}
    assert "empty" in data["slice_dice_note"]
    for key in ("average_recall", "object_dice", "voxel_dice", "slice_dice", "fp_per_scan_at_80_recall"):
        assert key in data["summary"][">=5mm"]
    for name in ("report.md", "report.json", "froc.png", "scans.csv"):
        assert (out / name).is_file(), name
    assert "per-slice Dice" in (out / "report.md").read_text()


def test_node_commands_refuse_bad_cohorts(capsys, node_cohort, tmp_path, trained_snet):
    _, result = trained_snet
    rows = [r.to_dict() for r in read_cohort(node_cohort).rows]
    for r in rows:
        r.pop("nodes_path")
    plain = write_cohort(rows, tmp_path / "no_nodes.csv")
    code, _, err = run(capsys, "train-nodes", str(plain), "--arch", "snet", "--out", str(tmp_path / "m"))
    assert code == 1 and "nodes_path" in err
    code, _, err = run(capsys, "evaluate-nodes", str(plain), "--model", str(result.checkpoint), "--out",
                       str(tmp_path / "e"))
    assert code == 1 and "nodes_path" in err
    code, _, err = run(capsys, "evaluate-nodes", str(tmp_path / "absent.csv"), "--model", str(result.checkpoint),
                       "--out", str(tmp_path / "e"))
    assert code == 1 and "absent.csv" in err
    code, _, _ = run(capsys, "train-nodes", str(node_cohort), "--arch", "snet", "--val-fraction", "1.5", "--out",
                     str(tmp_path / "m"))
    assert code == 2


def test_bench_nodes_json(capsys, trained_snet, monkeypatch):
    _, result = trained_snet
    # --threads sets the thread variables and SimpleITK's threads for the whole process: put them back afterwards
    # (setenv records the old value, or its absence, for monkeypatch to restore)
    for var in THREAD_ENV:
        had = os.environ.get(var)
        monkeypatch.setenv(var, had or "")
        if had is None:
            monkeypatch.delenv(var)
    sitk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    code, data, err = run(capsys, "bench", "nodes", "--size", "small", "--model", str(result.checkpoint),
                          "--repeat", "1", "--threads", "1", "--json")
    assert code == 0, err
    assert data["benchmark"] == "nodes" and data["model"]["arch"] == "snet"
    assert data["seconds_per_case_warm"] > 0 and "network" in data["steps_warm_s"]
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)
