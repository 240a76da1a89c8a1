"""Cohort runs under SIGKILL and on a local Dask cluster: results identical to an uninterrupted process-pool run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.batch.cache import CaseCache
from LymphNodeStagingLib.batch.run import run_batch

STEPS = "suv,anatomy"
IMAGES = {"suv": ["pet_suv.nii.gz"], "anatomy": ["anatomy.nii.gz"]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from LymphNodeStagingLib.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), 4, seed=23, size="small")


def batch_cmd(cohort: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "LymphNodeStagingLib.cli.main", "batch", str(cohort), "--out", str(out), "--steps",
            STEPS, "--workers", "1", "--threads", "1", "--no-progress", "--json"]


def summary_without_timings(out: Path) -> list[dict]:
    with (out / "summary.csv").open(newline="") as fh:
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in csv.DictReader(fh)]


def case_contents(out: Path) -> dict:
    """Per case: status, keys, result digest, the step images as arrays and the SUV provenance."""
    found = {}
    for case in sorted((out / "cases").iterdir()):
        m = json.loads((case / "case.json").read_text())
        entry = {"status": m["status"], "keys": m["keys"], "result": m["result"],
                 "suv": json.loads((case / "suv" / "suv.json").read_text())}
        for step, names in IMAGES.items():
            for name in names:
                img = sitk.ReadImage(str(case / step / name))
                entry[f"{step}/{name}"] = (sitk.GetArrayFromImage(img).tobytes(), img.GetOrigin(), img.GetSpacing())
        found[case.name] = entry
    return found


def assert_nothing_half_complete(out: Path) -> None:
    """Every case that claims to be complete has all its steps complete with the recorded keys."""
    cases = out / "cases"
    if not cases.is_dir():
        return
    for case in cases.iterdir():
        if not case.is_dir() or case.name.startswith("."):
            continue
        cache = CaseCache(case)
        m = cache.read_manifest()
        if m is not None and m["status"] == "ok":
            assert cache.steps_complete(m["keys"]), f"{case.name} claims ok but a step is incomplete"


def steps_done(out: Path) -> int:
    """Step folders complete under their final names."""
    return len(list((out / "cases").glob("*/*/step.json"))) if (out / "cases").is_dir() else 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_identical_results(cohort, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "reference"
    done = subprocess.run(batch_cmd(cohort, ref), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    total = steps_done(ref)
    assert total == 4 * len(IMAGES)

    out = tmp_path / "killed"
    rng = np.random.default_rng(20260101)
    kills = 0
    # Kill points follow the run's progress, not the clock (a shared, loaded machine changes the speed): each run is
    # killed at a seeded random moment shortly after one further step completed, so it dies
    # in the middle of some later step (writing files, renaming folders, between cases) and leaves progress.
    while kills < 4 and steps_done(out) + 1 < total:
        target = steps_done(out) + 1
        proc = subprocess.Popen(batch_cmd(cohort, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and steps_done(out) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.25)))
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        assert_nothing_half_complete(out)
        if not alive:
            break
    assert kills >= 2, "the batch finished before it could be killed; the kill points are too late"
    final = subprocess.run(batch_cmd(cohort, out), env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    obj = json.loads(final.stdout)
    assert obj["counts"] == {"ok": 4, "failed": 0, "pending": 0}

    assert summary_without_timings(out) == summary_without_timings(ref)
    ids = [r["scan_id"] for r in summary_without_timings(out)]
    assert len(ids) == len(set(ids)) == 4
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(ids)
    assert not [p for p in (out / "cases").rglob(".*") if ".part" in p.name or p.name.endswith(".old")]
    assert case_contents(out) == case_contents(ref)


@pytest.mark.slow
def test_local_dask_cluster_gives_the_process_pool_summary(cohort, tmp_path):
    pool = run_batch(cohort, tmp_path / "pool", workers=2, steps=STEPS, threads_per_worker=1)
    dask = run_batch(cohort, tmp_path / "dask", workers=2, steps=STEPS, threads_per_worker=1, scheduler="local")
    assert pool.counts == dask.counts == {"ok": 4, "failed": 0, "pending": 0}
    assert summary_without_timings(tmp_path / "dask") == summary_without_timings(tmp_path / "pool")
    assert case_contents(tmp_path / "dask") == case_contents(tmp_path / "pool")
