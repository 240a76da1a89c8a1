"""The assessment in a child process (what the Slicer module's Apply runs so the GUI stays responsive): progress
events streamed as JSON lines, the same result as in-process, cancel through assess_case's cancel callback, errors
with the child's message. Real child processes of the real library; no Slicer needed.

The station mapping is the phantom's true station map written as a mapping folder, so that the child skips the
registration and each run takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from case_fixtures import phantom_case_files

from LymphNodeStagingLib.assessment.assess import assess_case
from LymphNodeStagingLib.assessment.process import (
    CANCEL_FILE,
    AssessmentJob,
    AssessmentProcess,
    parse_line,
    run_assessment_process,
)
from LymphNodeStagingLib.errors import Cancelled, ProcessingError


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("background")
    return {**phantom_case_files(root, 2468), "root": root}


def job(case, out: Path, **changes) -> AssessmentJob:
    values = dict(ct=str(case["paths"]["ct"]), pet=str(case["paths"]["pet"]), side=case["side"], out_dir=str(out),
                  anatomy=str(case["paths"]["anatomy"]), model=case["model"], station_mapping=case["mapping"],
                  pet_is_suv=True, case_id="PH2468")
    values.update(changes)
    return AssessmentJob(**values)


def test_lines_are_parsed_into_events():
    e = parse_line('@lns {"event": "progress", "fraction": 0.5, "message": "mapping"}\n')
    assert (e.kind, e.fraction, e.message) == ("progress", 0.5, "mapping")
    e = parse_line('@lns {"event": "done", "files": {"a": "b"}}')
    assert e.kind == "done" and e.data == {"files": {"a": "b"}}
    for text in ("nnU-Net says hello", "@lns not json", '@lns {"no_event": 1}', '{"event": "done"}'):
        e = parse_line(text)
        assert e.kind == "log" and e.message == text


def test_job_file_round_trip_and_bad_keys(tmp_path):
    j = AssessmentJob("ct.nrrd", "pet.nrrd", "R", str(tmp_path), threshold=0.4)
    assert AssessmentJob.read(j.write(tmp_path / "job.json")) == j
    with pytest.raises(ProcessingError, match=r"unknown keys \['colour'\], missing keys \['side'\]"):
        AssessmentJob.from_dict({"ct": "a", "pet": "b", "out_dir": "c", "colour": "red"})
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ProcessingError, match="bad.json: expected a JSON object"):
        AssessmentJob.read(tmp_path / "bad.json")


def test_background_result_equals_in_process_result(case, tmp_path):
    from LymphNodeStagingLib.mapping.station_mapping import read_station_mapping

    seen: list[tuple[float, str]] = []
    logs: list[str] = []
    out = run_assessment_process(job(case, tmp_path / "bg"), progress=lambda p: seen.append((p.fraction, p.message)),
                                 log_callback=logs.append, timeout=300)
    ref = assess_case(case["paths"]["ct"], case["paths"]["pet"], case["side"], anatomy=case["paths"]["anatomy"],
                      model=case["model"], pet_is_suv=True, case_id="PH2468",
                      station_mapping=read_station_mapping(case["mapping"]))
    assert out.result.n_stage == ref.result.n_stage and out.result.tnm9 == ref.result.tnm9
    got = {s.name: s.probability for s in out.result.stations}
    want = {s.name: s.probability for s in ref.result.stations}
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert (p is None) == (got[name] is None), name
        if p is not None:
            assert got[name] == pytest.approx(p, abs=1e-5), name
    assert np.array_equal(sitk.GetArrayViewFromImage(out.station_map), sitk.GetArrayViewFromImage(ref.station_map))
    assert out.pet is None  # PET files given as SUV: the caller's PET is shown
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("classifying" in m for _, m in seen) and seen[-1][1].startswith("done")
    for key in ("result_json", "stations", "overview"):
        assert out.files[key].is_file(), key


def test_cancel_stops_the_child_through_the_cancel_callback(case, tmp_path):
    # the cancel flag exists before the child starts: assess_case stops at its first cancel check
    process = AssessmentProcess(job(case, tmp_path / "c"))
    process.start()
    process.cancel()
    with pytest.raises(Cancelled):
        process.wait(timeout=120)
    assert process.returncode == 3  # stopped by itself, not terminated
    assert any(e.kind == "cancelled" for e in process.events)
    assert not (tmp_path / "c" / "result.json").exists()


def test_cancel_callback_of_the_blocking_form(case, tmp_path):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return True

    with pytest.raises(Cancelled):
        run_assessment_process(job(case, tmp_path / "c2"), cancel=cancel, timeout=120)
    assert calls["n"] >= 1 and (tmp_path / "c2" / CANCEL_FILE).is_file()


def test_a_child_that_ignores_cancel_is_terminated_after_the_grace_period(tmp_path):
    import sys

    # a "python" that never looks at the cancel flag
    sleeper = tmp_path / "sleeper.sh"
    sleeper.write_text(f"#!/bin/sh\necho started\nexec {sys.executable} -c 'import time; time.sleep(60)'\n")
    sleeper.chmod(0o755)
    process = AssessmentProcess(AssessmentJob("ct", "pet", "R", str(tmp_path / "s")), python=str(sleeper),
                                cancel_grace_s=0.5)
    process.start()
    process.cancel()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        process.wait(timeout=30)
    assert time.monotonic() - start < 20
    assert process.returncode != 0


def test_child_errors_reach_the_parent_with_their_message(case, tmp_path):
    missing = tmp_path / "nowhere" / "ct.nii.gz"
    process = AssessmentProcess(job(case, tmp_path / "e", ct=str(missing))).start()
    with pytest.raises(ProcessingError, match="nowhere"):
        process.wait(timeout=120)
    assert process.returncode == 2
    err = [e for e in process.events if e.kind == "error"][-1]
    assert err.data["kind"] and str(missing.parent) in err.message


def test_a_python_that_cannot_start_is_an_error(tmp_path):
    with pytest.raises(ProcessingError, match="cannot start"):
        AssessmentProcess(AssessmentJob("ct", "pet", "R", str(tmp_path)), python=str(tmp_path / "no-python")).start()
