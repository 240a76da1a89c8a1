"""The Slicer batch script (LymphNodeStaging/LymphNodeStagingBatch.py) without the Slicer application: its options
and its call into run_batch on a 3-patient phantom cohort give the same summary as ``lnstaging batch``, a second run
resumes (every case reused), and failures give exit status 1. Cheap steps (suv, anatomy) keep it fast."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from LymphNodeStagingLib.cli.main import main as lnstaging

SCRIPT = Path(__file__).resolve().parents[2] / "LymphNodeStaging" / "LymphNodeStagingBatch.py"
STEPS = "suv,anatomy"


@pytest.fixture(scope="module")
def batch_script():
    spec = importlib.util.spec_from_file_location("LymphNodeStagingBatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slicer-batch")
    assert lnstaging(["phantom", "--out", str(root / "cohort"), "--patients", "3", "--json"]) == 0
    return root / "cohort" / "cohort.csv"


def _rows(path: Path) -> list[dict]:
    """summary.csv without the timing columns (they differ between runs)."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in csv.DictReader(f)]


def test_options_are_passed_to_run_batch(batch_script):
    args = batch_script.parse_args(["--cohort", "c.csv", "--out", "o", "--steps", STEPS, "--threads", "1",
                                    "--retry-failed", "--workers", "0", "--rules", "engelson2026"])
    assert (args.cohort, args.out, args.steps, args.threads, args.retry_failed, args.workers, args.rules) == (
        "c.csv", "o", STEPS, 1, True, 0, "engelson2026")
    with pytest.raises(SystemExit):
        batch_script.parse_args(["--out", "o"])  # --cohort is required


def test_script_gives_the_same_summary_as_lnstaging_batch_and_resumes(batch_script, cohort, tmp_path, capsys):
    out_script, out_cli = tmp_path / "script", tmp_path / "cli"
    summary = batch_script.run(["--cohort", str(cohort), "--out", str(out_script), "--steps", STEPS,
                                "--workers", "0", "--threads", "1"])
    assert summary.counts == {"ok": 3, "failed": 0, "pending": 0}
    assert summary.this_run["computed"] == 3 and summary.this_run["reused"] == 0

    capsys.readouterr()
    code = lnstaging(["batch", str(cohort), "--out", str(out_cli), "--steps", STEPS, "--workers", "0",
                      "--threads", "1", "--json", "--no-progress"])
    cli = json.loads(capsys.readouterr().out)
    assert code == 0 and cli["counts"] == summary.counts and cli["this_run"] == summary.this_run
    assert _rows(out_script / "summary.csv") == _rows(out_cli / "summary.csv")
    assert len(_rows(out_script / "summary.csv")) == 3
    same = {k: v for k, v in summary.parameters.items() if k != "out"}
    assert same == {k: v for k, v in cli["parameters"].items() if k != "out"}
    for name in ("summary_csv", "summary_json", "report_png"):
        assert summary.files[name].is_file(), name

    # a second run of the script resumes: every case is reused, nothing is computed again
    again = batch_script.run(["--cohort", str(cohort), "--out", str(out_script), "--steps", STEPS,
                              "--workers", "0", "--threads", "1"])
    assert again.counts == summary.counts
    assert again.this_run["computed"] == 0 and again.this_run["reused"] == 3
    assert _rows(out_script / "summary.csv") == _rows(out_cli / "summary.csv")
    # main logs and returns 0 when every case is complete
    assert batch_script.main(["--cohort", str(cohort), "--out", str(out_script), "--steps", STEPS,
                              "--workers", "0", "--threads", "1"]) == 0


def test_exit_status_1_for_bad_options_and_failed_cases(batch_script, cohort, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert batch_script.main(["--cohort", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"),
                              "--steps", STEPS, "--workers", "0"]) == 1
    assert "missing.csv" in caplog.text
    # one row whose CT does not exist: that case fails, the others are fine, the status is 1
    rows = list(csv.DictReader(cohort.open(newline="", encoding="utf-8")))
    for row in rows:  # the copy lives elsewhere: absolute paths
        for key in ("ct_path", "pet_path", "anatomy_path", "stations_path", "lesion_path", "truth_path"):
            if row.get(key):
                row[key] = str(cohort.parent / row[key])
    rows[1]["ct_path"] = str(tmp_path / "nowhere" / "ct.nii.gz")
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    options = ["--cohort", str(broken), "--out", str(tmp_path / "b"), "--steps", STEPS, "--workers", "0",
               "--threads", "1"]
    summary = batch_script.run(options)
    assert summary.counts == {"ok": 2, "failed": 1, "pending": 0}
    assert summary.failed[0]["scan_id"].startswith(rows[1]["patient_id"])
    caplog.clear()
    assert batch_script.main(options) == 1
    assert "nowhere" in caplog.text
