"""``lnstaging assess`` refuses bad inputs and options at once: one line naming the file or option, no traceback, no
result in --out, before any station mapping."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from preflight_images import cut

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.paths import demo_model_path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A valid small phantom case and corrupt copies of its files."""
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    root = tmp_path_factory.mktemp("preflight-cli")
    paths = write_patient(generate_patient(33, size="small"), root / "PH0033")
    bad = root / "bad"
    bad.mkdir()
    cut(paths["ct"], bad / "ct-truncated.nii.gz")
    ct = sitk.ReadImage(str(paths["ct"]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(ct)
    arr[: 2 * arr.shape[0] // 3] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(ct)
    sitk.WriteImage(nan, str(bad / "ct-nan.nii.gz"))
    pet = sitk.ReadImage(str(paths["pet"]))
    negative = sitk.GetImageFromArray(sitk.GetArrayFromImage(pet) - 9.65)
    negative.CopyInformation(pet)
    sitk.WriteImage(negative, str(bad / "pet-negative.nii.gz"))
    cut(demo_model_path(), bad / "model-truncated.pt")
    return paths, bad, root


def assess(paths, out: Path, *extra: str, ct=None, pet=None) -> list[str]:
    return ["assess", "--ct", str(ct or paths["ct"]), "--pet", str(pet or paths["pet"]), "--pet-is-suv",
            "--anatomy", str(paths["anatomy"]), "--side", "R", "--atlases", str(out.parent / "no-atlas-set"),
            "--out", str(out), *extra]


@pytest.mark.parametrize(("which", "words"), [
    ("ct-truncated.nii.gz", "truncated"),
    ("ct-nan.nii.gz", "not finite"),
    ("pet-negative.nii.gz", "below -0.5 SUV"),
])
def test_bad_images_are_refused_naming_the_file(case, capsys, which, words):
    paths, bad, root = case
    out = root / f"out-{which}"
    kind = "pet" if which.startswith("pet") else "ct"
    t0 = time.perf_counter()
    code = main(assess(paths, out, **{kind: bad / which}))
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # progress lines start with [
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("lnstaging assess: error: ") and str(bad / which) in lines[0] and words in lines[0]
    assert "Traceback" not in err and not (out / "result.json").exists() and seconds < 3


@pytest.mark.parametrize(("extra", "option"), [
    (["--threshold", "1.5"], "--threshold"),
    (["--rules", "unknown"], "--rules"),
    (["--tta", "-1"], "--tta"),
])
def test_bad_options_are_usage_errors_while_parsing(case, capsys, extra, option):
    paths, _, root = case
    t0 = time.perf_counter()
    code = main(assess(paths, root / "out-options", *extra))
    err = capsys.readouterr().err
    assert code == 2 and option in err and "Traceback" not in err and time.perf_counter() - t0 < 3


def test_a_truncated_model_is_refused_before_the_station_mapping(case, capsys, monkeypatch):
    paths, bad, root = case
    import LymphNodeStagingLib.mapping.station_mapping as station_mapping

    mapped = []
    monkeypatch.setattr(station_mapping, "map_stations", lambda *a, **k: mapped.append(1))
    out = root / "out-model"
    t0 = time.perf_counter()
    code = main(assess(paths, out, "--model", str(bad / "model-truncated.pt")))
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 1 and "model-truncated.pt" in err and "Traceback" not in err
    assert not mapped and seconds < 3 and not (out / "result.json").exists()


def test_an_output_folder_in_the_way_is_refused_before_reading(case, capsys):
    paths, bad, root = case
    blocker = root / "blocker"
    blocker.write_text("x")
    code = main(assess(paths, blocker, ct=bad / "ct-truncated.nii.gz"))
    err = capsys.readouterr().err
    assert code == 1 and f"--out {blocker}: is a file" in err


def test_the_library_checks_its_parameters_too(case):
    from LymphNodeStagingLib.assessment.assess import assess_case
    from LymphNodeStagingLib.errors import UsageError

    paths, _, _ = case
    with pytest.raises(UsageError, match="^threshold 1.5"):
        assess_case(paths["ct"], paths["pet"], "R", pet_is_suv=True, threshold=1.5)
    with pytest.raises(UsageError, match="^rules: unknown rule set"):
        assess_case(paths["ct"], paths["pet"], "R", pet_is_suv=True, rules="unknown")
    with pytest.raises(UsageError, match="^tta"):
        assess_case(paths["ct"], paths["pet"], "R", pet_is_suv=True, tta=-2)


def test_the_installed_command_prints_one_line(case):
    paths, bad, root = case
    exe = shutil.which("lnstaging") or str(Path(sys.executable).with_name("lnstaging"))
    out = root / "out-installed"
    run = subprocess.run([exe, *assess(paths, out, "--json", ct=bad / "ct-truncated.nii.gz")],
                         capture_output=True, text=True, timeout=60)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and run.stdout == "" and len(lines) == 1
    assert lines[0].startswith(f"lnstaging assess: error: CT {bad / 'ct-truncated.nii.gz'}: the file is truncated")
    assert not out.exists()
