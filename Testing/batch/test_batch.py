"""Cohort runs on small phantom cohorts: step cache, resume, a broken case among good ones, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from LymphNodeStagingLib.batch.cache import CaseCache, StepSpec, clean_partial
from LymphNodeStagingLib.batch.run import parse_steps, run_batch
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.errors import UsageError

CHEAP = "suv,anatomy"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from LymphNodeStagingLib.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), 3, seed=11, size="small")


def read_summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------- step cache


def test_step_cache_keys_reuse_and_incomplete_folders(tmp_path):
    cache = CaseCache(tmp_path / "case")
    calls = []

    def work(folder: Path) -> dict:
        calls.append(folder)
        (folder / "a.txt").write_text("hello")
        return {"n": 1}

    spec = StepSpec("suv", 1, {"p": 1}, {"ct": None})
    rec, cached = cache.get_or_compute(spec, work)
    assert not cached and rec.outputs == {"a.txt": 5} and rec.info == {"n": 1}
    rec2, cached = cache.get_or_compute(spec, work)
    assert cached and rec2.key == rec.key and len(calls) == 1
    # another parameter: another key, computed again and replacing the old folder
    spec2 = StepSpec("suv", 1, {"p": 2}, {"ct": None})
    assert spec2.key != spec.key and cache.lookup(spec2) is None
    _, cached = cache.get_or_compute(spec2, work)
    assert not cached and len(calls) == 2 and cache.lookup(spec) is None
    # an output file of the wrong size makes the step incomplete
    (cache.step_dir("suv") / "a.txt").write_text("truncated!")
    assert cache.lookup(spec2) is None
    # a step whose work fails leaves nothing under the final name
    shutil.rmtree(cache.step_dir("suv"))

    def boom(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.compute(spec, boom)
    assert not cache.step_dir("suv").exists()
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".")]


def test_clean_partial_removes_leftovers_only(tmp_path):
    (tmp_path / ".stations.abc.part").mkdir()
    (tmp_path / ".case.json.x1.part.json").write_text("{")
    (tmp_path / ".suv.old").mkdir()
    (tmp_path / "suv").mkdir()
    (tmp_path / "case.json").write_text("{}")
    removed = clean_partial(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "suv"]


def test_parse_steps_adds_dependencies_and_refuses_unknown():
    assert parse_steps("stations") == ["suv", "anatomy", "stations"]
    assert parse_steps("anatomy,suv") == ["suv", "anatomy"]
    assert parse_steps(None) == ["suv", "anatomy", "stations", "assess"]
    with pytest.raises(UsageError, match="registration"):
        parse_steps("suv,registration")


# ----------------------------------------------------------------------------------------------- runs


def test_run_resume_and_parameter_change(cohort, tmp_path):
    out = tmp_path / "out"
    s1 = run_batch(cohort, out, workers=0, steps=CHEAP, threads_per_worker=1)
    assert s1.counts == {"ok": 3, "failed": 0, "pending": 0} and s1.this_run["computed"] == 3
    rows = read_summary(out)
    frame = s1.to_frame()  # summary.csv as a DataFrame
    assert len(frame) == len(rows) and list(frame["scan_id"]) == [r["scan_id"] for r in rows]
    assert [r["patient_id"] for r in rows] == ["PH0001", "PH0002", "PH0003"]
    assert all(r["status"] == "ok" and r["case_dir"] for r in rows)
    assert rows[0]["n_stage_reference"] in ("N0", "N1", "N2", "N3")
    for name in ("summary.csv", "summary.json", "report.png", "batch.json"):
        assert (out / name).is_file()
    case = out / rows[0]["case_dir"]
    manifest = json.loads((case / "case.json").read_text())
    assert manifest["status"] == "ok" and set(manifest["keys"]) == {"suv", "anatomy"}
    assert (case / "suv" / "pet_suv.nii.gz").is_file() and (case / "anatomy" / "anatomy.nii.gz").is_file()
    # the phantom cohort declares its NIfTI PET as SUV (pet_is_suv column): no guess, no warning
    suv_info = manifest["steps"]["suv"]["info"]
    assert suv_info["suv_mode"] == "user" and not suv_info["warnings"]

    # resume: everything reused, nothing computed
    events = []
    s2 = run_batch(cohort, out, workers=0, steps=CHEAP, threads_per_worker=1,
                   progress=events.append)
    assert s2.this_run["computed"] == 0 and s2.this_run["reused"] == 3
    assert events and events[-1].fraction == 1.0 and (events[-1].done, events[-1].total) == (3, 3)

    # a changed SUV parameter recomputes the suv step only; the given anatomy is reused
    run_batch(cohort, out, workers=0, steps=CHEAP, threads_per_worker=1, suv_mode="gatidis")
    manifest = json.loads((case / "case.json").read_text())
    assert manifest["steps"]["suv"]["cached"] is False
    assert manifest["steps"]["anatomy"]["cached"] is True


def test_broken_case_among_good_ones(cohort, tmp_path):
    src = cohort.parent
    work = tmp_path / "cohort"
    shutil.copytree(src, work)
    (work / "PH0002" / "ct.nii.gz").write_bytes(b"\x1f\x8b this is not an image")
    out = tmp_path / "out"
    s = run_batch(work / "cohort.csv", out, workers=1, steps=CHEAP, threads_per_worker=1)
    assert s.counts == {"ok": 2, "failed": 1, "pending": 0}
    failed = s.failed[0]
    assert failed["patient_id"] == "PH0002" and failed["error_step"] == "suv"
    assert "ct.nii.gz" in failed["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"][0]["scan_id"] == "PH0002_S1_PETCT"
    # failed cases are kept as failed on a rerun, and run again with retry_failed
    s2 = run_batch(work / "cohort.csv", out, workers=0, steps=CHEAP, threads_per_worker=1)
    assert s2.counts["failed"] == 1 and s2.this_run["computed"] == 0
    shutil.copy(src / "PH0002" / "ct.nii.gz", work / "PH0002" / "ct.nii.gz")
    s3 = run_batch(work / "cohort.csv", out, workers=0, steps=CHEAP, threads_per_worker=1, retry_failed=True)
    assert s3.counts == {"ok": 3, "failed": 0, "pending": 0}


def test_invalid_cohort_row_is_reported_not_fatal(cohort, tmp_path):
    text = (cohort).read_text().splitlines()
    text.append(text[-1].replace("PH0003", "PH0009").replace(",L,", ",X,").replace(",R,", ",X,"))
    csv_path = cohort.parent / "cohort_bad.csv"
    csv_path.write_text("\n".join(text) + "\n")
    s = run_batch(csv_path, tmp_path / "out", workers=0, steps="suv", threads_per_worker=1)
    bad = [r for r in s.rows if r["patient_id"] == "PH0009"][0]
    assert bad["status"] == "failed" and bad["error_step"] == "cohort" and "tumour_side" in bad["error"]
    assert s.counts["ok"] == 3


def write_cohort_variant(cohort: Path, name: str, pet_is_suv: list[str] | None) -> Path:
    """The phantom cohort with its pet_is_suv column replaced (one value per row) or removed (None)."""
    with cohort.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c != "pet_is_suv" or pet_is_suv is not None]
    path = cohort.parent / name  # next to the original: the relative image paths stay valid
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for i, r in enumerate(rows):
            if pet_is_suv is not None:
                r["pet_is_suv"] = pet_is_suv[i]
            w.writerow({c: r[c] for c in cols})
    return path


def test_undeclared_pet_image_file_fails_per_case(cohort, tmp_path):
    # row 2 does not say whether its NIfTI PET holds SUV: refused with the two ways to declare it, others go on
    csv_path = write_cohort_variant(cohort, "cohort_undeclared.csv", ["yes", "", "yes"])
    s = run_batch(csv_path, tmp_path / "out", workers=0, steps="suv", threads_per_worker=1)
    assert s.counts == {"ok": 2, "failed": 1, "pending": 0}
    bad = s.failed[0]
    assert bad["patient_id"] == "PH0002" and bad["error_step"] == "suv"
    assert bad["error"].startswith("InputError: line 3 (PH0002_S1_PETCT): PET file ")
    for part in ("PH0002/pet.nii.gz", "without a DICOM header", "pet_is_suv=yes", "--pet-is-suv yes", "DICOM PET series"):
        assert part in bad["error"], part
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["parameters"]["pet_is_suv"] == "declared"
    assert summary["failures"] == [{"scan_id": "PH0002_S1_PETCT", "step": "suv", "error": bad["error"]}]
    # declared afterwards (here for every row): the case runs, the declared ones are reused
    s2 = run_batch(csv_path, tmp_path / "out", workers=0, steps="suv", threads_per_worker=1, pet_is_suv="yes")
    assert s2.counts == {"ok": 3, "failed": 0, "pending": 0} and s2.this_run == {
        "computed": 1, "reused": 2, "retried": 0, "worker_deaths": 0}
    m = json.loads((tmp_path / "out" / "cases" / "PH0002_S1_PETCT" / "case.json").read_text())
    assert m["steps"]["suv"]["info"] == {"suv_mode": "user", "warnings": []}


def test_pet_is_suv_flag_against_the_column(cohort, tmp_path):
    csv_path = write_cohort_variant(cohort, "cohort_mixed.csv", ["yes", "no", ""])
    # no: no PET is SUV; the NIfTI files cannot be converted, and row 2 agrees but has only an image file
    s = run_batch(csv_path, tmp_path / "a", workers=0, steps="suv", threads_per_worker=1, pet_is_suv=False)
    errors = {r["patient_id"]: r["error"] for r in s.failed}
    assert s.counts["failed"] == 3
    assert "pet_is_suv=yes contradicts --pet-is-suv no" in errors["PH0001"]
    assert "the cohort column pet_is_suv=no refuses it" in errors["PH0002"]
    assert "--pet-is-suv no refuses PET image files" in errors["PH0003"]
    # yes: every PET is SUV, except where the column says otherwise (neither wins silently)
    s = run_batch(csv_path, tmp_path / "b", workers=0, steps="suv", threads_per_worker=1, pet_is_suv=True)
    assert [r["status"] for r in s.rows] == ["ok", "failed", "ok"]
    assert "pet_is_suv=no contradicts --pet-is-suv yes" in s.failed[0]["error"]
    with pytest.raises(UsageError, match="expected declared"):
        run_batch(csv_path, tmp_path / "c", workers=0, steps="suv", pet_is_suv="auto")


def test_dicom_pet_is_converted_without_declaration(tmp_path):
    from LymphNodeStagingLib.phantom import generate_cohort

    csv_path = generate_cohort(tmp_path / "dicom", 1, seed=5, size="small", format="dicom")
    s = run_batch(csv_path, tmp_path / "out", workers=0, steps="suv", threads_per_worker=1)
    assert s.counts["ok"] == 1, s.failed
    m = json.loads((tmp_path / "out" / s.rows[0]["case_dir"] / "case.json").read_text())
    assert m["steps"]["suv"]["info"]["suv_mode"] == "qiba"
    assert (tmp_path / "out" / s.rows[0]["case_dir"] / "suv" / "ct.nii.gz").is_file()


def test_cli_json_and_errors(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["batch", str(cohort), "--out", str(out), "--steps", "suv", "--workers", "0", "--threads", "1",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0
    obj = json.loads(captured.out)
    assert obj["counts"]["ok"] == 3 and obj["parameters"]["steps"] == ["suv"]
    # a cohort without the pet_is_suv column: every NIfTI PET is refused, unless --pet-is-suv yes
    bare = write_cohort_variant(cohort, "cohort_bare.csv", None)
    code = main(["batch", str(bare), "--out", str(tmp_path / "bare"), "--steps", "suv", "--workers", "0", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert code == 1 and obj["counts"]["failed"] == 3
    assert all(f["step"] == "suv" and "--pet-is-suv yes" in f["error"] for f in obj["failures"])
    code = main(["batch", str(bare), "--out", str(tmp_path / "bare"), "--steps", "suv", "--workers", "0", "--json",
                 "--pet-is-suv", "yes"])
    obj = json.loads(capsys.readouterr().out)
    assert code == 0 and obj["counts"]["ok"] == 3 and obj["parameters"]["pet_is_suv"] == "yes"
    assert main(["batch", str(bare), "--out", str(tmp_path / "bare"), "--pet-is-suv", "auto"]) == 2
    capsys.readouterr()
    code = main(["batch", str(cohort), "--out", str(out), "--steps", "suv,nonsense"])
    assert code == 2 and "nonsense" in capsys.readouterr().err
    code = main(["batch", str(cohort), "--out", str(out), "--steps", "stations", "--iterations", "x"])
    assert code == 2 and "--iterations" in capsys.readouterr().err


def test_station_mapping_round_trip(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from LymphNodeStagingLib.mapping.fusion import fuse
    from LymphNodeStagingLib.mapping.registration import Geometry
    from LymphNodeStagingLib.mapping.station_mapping import (
        StationMapping,
        read_station_mapping,
        write_station_mapping,
    )
    from LymphNodeStagingLib.mapping.weightmap import station_weight_maps

    rng = np.random.default_rng(0)
    warped = np.zeros((3, 12, 14, 16), np.uint8)
    for a in range(3):
        warped[a, 2:8, 3 + a:9, 4:12] = 11
        warped[a, 6:11, 2:7, 1 + a:6] = 8
    warped[rng.random(warped.shape) < 0.05] = 5
    img = sitk.Image(16, 14, 12, sitk.sitkUInt8)
    img.SetSpacing((1.5, 1.5, 3.0))
    img.SetOrigin((-10.0, 20.0, -30.0))
    geom = Geometry.of(img)
    fused = fuse(warped)
    maps = station_weight_maps(fused.labels, geom, fused.vote_fraction())
    mapping = StationMapping(fused.labels, fused.votes, fused.n_atlases, geom, fused.agreement, fused.flags,
                             fused.voxels, maps, ["a1", "a2", "a3"], {"a1": 0.1, "a2": 0.2, "a3": 0.3})
    write_station_mapping(mapping, tmp_path)
    back = read_station_mapping(tmp_path)
    assert np.array_equal(back.labels, mapping.labels) and np.array_equal(back.votes, mapping.votes)
    assert back.atlas_ids == mapping.atlas_ids and back.flags == mapping.flags
    assert set(back.weight_maps) == set(mapping.weight_maps)
    for k, wm in mapping.weight_maps.items():
        assert np.allclose(back.weight_maps[k].centre_mm, wm.centre_mm, atol=1e-3)
        assert np.array_equal(back.weight_maps[k].indices, wm.indices)
    for k, v in mapping.agreement.items():
        assert (np.isnan(v) and np.isnan(back.agreement[k])) or back.agreement[k] == v
