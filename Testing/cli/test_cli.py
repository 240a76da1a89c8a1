"""The lnstaging command line: the installed entry point, JSON output, exit codes, errors on stderr."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from LymphNodeStagingLib import __version__
from LymphNodeStagingLib.cli.main import main


def lnstaging() -> list[str]:
    exe = shutil.which("lnstaging") or str(Path(sys.executable).with_name("lnstaging"))
    assert Path(exe).exists(), "the lnstaging console script is not installed"
    return [exe]


def test_installed_entry_point_version_and_stage():
    out = subprocess.run([*lnstaging(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lnstaging {__version__}"
    out = subprocess.run([*lnstaging(), "stage", "--side", "R", "--json", "4R", "7", "10L"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["n_stage"] == "N3" and data["tnm9"] == "N3" and data["rules"] == "ajcc8"
    assert data["deciding_stations"] == ["10L"] and data["groups"] == {"4R": "N2", "7": "N2", "10L": "N3"}
    assert data["side"] == "R"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize(
    ("argv", "n", "tnm9"),
    [
        (["stage", "--side", "L", "--json"], "N0", "N0"),
        (["stage", "--side", "L", "--json", "Station 4L"], "N2", "N2a"),
        (["stage", "--side", "L", "--json", "4L;7"], "N2", "N2b"),
        (["stage", "--side", "R", "--json", "1R"], "N3", "N3"),
        (["stage", "--side", "R", "--rules", "engelson2026", "--json", "1R"], "N2", "N2a"),
    ],
)
def test_stage_json(capsys, argv, n, tnm9):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert (data["n_stage"], data["tnm9"]) == (n, tnm9)
    assert out.count("\n") == 1, "exactly one JSON object on one line"


def test_stage_text_and_errors(capsys):
    code, out, _ = run_cli(capsys, "stage", "--side", "R", "10R")
    assert code == 0 and out.startswith("N1")
    code, out, err = run_cli(capsys, "stage", "--side", "X", "--json", "4R")
    assert code == 2 and out == "" and "--side" in err and "'X'" in err
    code, out, err = run_cli(capsys, "stage", "--side", "R", "--json", "12R")
    assert code == 2 and out == "" and "12R" in err and "11R" in err
    code, out, err = run_cli(capsys, "stage", "--side", "R", "--rules", "tnm7", "4R")
    assert code == 2 and "tnm7" in err


def test_validate_cohort_exit_codes(capsys, tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"x")
    (tmp_path / "pet.nii.gz").write_bytes(b"x")
    header = "patient_id,study,series,n_stage,positive_stations,tumour_side,ct_path,pet_path\n"
    good = tmp_path / "good.csv"
    good.write_text(header + "p1,1,1,N1,10R,R,ct.nii.gz,pet.nii.gz\np2,1,1,N2,10R,R,ct.nii.gz,pet.nii.gz\n")
    code, out, _ = run_cli(capsys, "validate-cohort", str(good), "--json")
    data = json.loads(out)
    assert code == 0 and data["valid"] and data["warnings"] == 1
    assert data["problems"][0]["kind"] == "label_inconsistency" and data["problems"][0]["line"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "p1,1,1,N1,10R,R,ct.nii.gz,nope.nii.gz\n")
    code, out, _ = run_cli(capsys, "validate-cohort", str(bad), "--json")
    data = json.loads(out)
    assert code == 2 and not data["valid"]
    assert data["problems"] == [{"kind": "missing_file", "message": data["problems"][0]["message"], "line": 2,
                                 "column": "pet_path", "severity": "error"}]
    code, out, _ = run_cli(capsys, "validate-cohort", str(bad))
    assert code == 2 and "line 2" in out and "NOT VALID" in out
    code, out, err = run_cli(capsys, "validate-cohort", str(tmp_path / "none.csv"))
    assert code == 1 and "none.csv" in err


def test_no_command_prints_help(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "stage" in err
