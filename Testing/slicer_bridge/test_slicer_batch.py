"""The Slicer batch script (LymphNodeStaging/LymphNodeStagingBatch.py) without the Slicer application: it hands its
arguments to ``lnstaging batch``, so on a 3-patient phantom cohort it gives the command line's summary, a second run
resumes (every case reused), failures give exit status 1 and usage errors 2. Cheap steps (suv, anatomy) keep it
fast."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from LymphNodeStagingLib.cli.main import main as lnstaging

SCRIPT = Path(__file__).resolve().parents[2] / "LymphNodeStaging" / "LymphNodeStagingBatch.py"
STEPS = "suv,anatomy"
FAST = ["--steps", STEPS, "--workers", "0", "--threads", "1", "--no-progress"]


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


def _json_run(batch_script, capsys, argv: list[str]) -> tuple[int, dict]:
    capsys.readouterr()
    code = batch_script.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_script_declares_no_options_of_its_own():
    """One definition of the batch options: the command line's."""
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert "add_argument" not in calls and "ArgumentParser" not in calls
    assert "argparse" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_help_and_usage_errors_come_from_the_command_line(batch_script, capsys):
    assert batch_script.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "lnstaging batch" in out and "--retry-failed" in out and "--pet-is-suv" in out
    assert batch_script.main(["--out", "o"]) == 2  # the cohort is required
    assert "cohort" in capsys.readouterr().err


def test_script_gives_the_same_summary_as_lnstaging_batch_and_resumes(batch_script, cohort, tmp_path, capsys):
    out_script, out_cli = tmp_path / "script", tmp_path / "cli"
    code, summary = _json_run(batch_script, capsys, [str(cohort), "--out", str(out_script), *FAST])
    assert code == 0 and summary["counts"] == {"ok": 3, "failed": 0, "pending": 0}
    assert summary["this_run"]["computed"] == 3 and summary["this_run"]["reused"] == 0

    capsys.readouterr()
    code = lnstaging(["batch", str(cohort), "--out", str(out_cli), *FAST, "--json"])
    cli = json.loads(capsys.readouterr().out)
    assert code == 0 and cli["counts"] == summary["counts"] and cli["this_run"] == summary["this_run"]
    assert _rows(out_script / "summary.csv") == _rows(out_cli / "summary.csv")
    assert len(_rows(out_script / "summary.csv")) == 3
    same = {k: v for k, v in summary["parameters"].items() if k != "out"}
    assert same == {k: v for k, v in cli["parameters"].items() if k != "out"}
    for name in ("summary_csv", "summary_json", "report_png"):
        assert Path(summary["files"][name]).is_file(), name

    # a second run of the script resumes: every case is reused, nothing is computed again
    code, again = _json_run(batch_script, capsys, [str(cohort), "--out", str(out_script), *FAST])
    assert code == 0 and again["counts"] == summary["counts"]
    assert again["this_run"]["computed"] == 0 and again["this_run"]["reused"] == 3
    assert _rows(out_script / "summary.csv") == _rows(out_cli / "summary.csv")


def test_exit_status_1_for_a_missing_cohort_and_failed_cases(batch_script, cohort, tmp_path, capsys):
    assert batch_script.main([str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"), *FAST]) == 1
    assert "missing.csv" in capsys.readouterr().err
    # one row whose CT does not exist: that case fails, the others are fine, the status is 1
    rows = list(csv.DictReader(cohort.open(newline="", encoding="utf-8")))
    for row in rows:  # the copy lives elsewhere: absolute paths
        for key in ("ct_path", "pet_path", "anatomy_path", "stations_path", "lesion_path", "nodes_path", "truth_path"):
            if row.get(key):
                row[key] = str(cohort.parent / row[key])
    rows[1]["ct_path"] = str(tmp_path / "nowhere" / "ct.nii.gz")
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, summary = _json_run(batch_script, capsys, [str(broken), "--out", str(tmp_path / "b"), *FAST])
    assert code == 1 and summary["counts"] == {"ok": 2, "failed": 1, "pending": 0}
    assert summary["failures"][0]["scan_id"].startswith(rows[1]["patient_id"])
    assert "nowhere" in summary["failures"][0]["error"]
