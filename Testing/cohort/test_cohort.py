"""Cohort table reading and validation: every error kind with its line number, nothing dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from LymphNodeStagingLib.cohort.table import read_cohort, write_cohort
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.staging.rules import UNKNOWN

HEADER = "patient_id,study,series,n_stage,positive_stations,tumour_side,ct_path,pet_path"


def make_cohort(tmp_path: Path, lines: list[str], header: str = HEADER, files: tuple[str, ...] = ()) -> Path:
    imgs = tmp_path / "img"
    imgs.mkdir(exist_ok=True)
    for name in ("ct1.nii.gz", "pet1.nii.gz", "ct2.nii.gz", "pet2.nii.gz", *files):
        (imgs / name).write_bytes(b"x")
    (imgs / "dicom").mkdir(exist_ok=True)
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def kinds(cohort) -> list[tuple[str, int | None, str | None]]:
    return [(p.kind, p.line, p.column) for p in cohort.problems]


def test_valid_cohort_with_relative_paths_and_label_forms(tmp_path):
    path = make_cohort(tmp_path, [
        "p1,s1,ct,N2,4R;7,R,img/ct1.nii.gz,img/pet1.nii.gz",
        "p2,s1,ct,0,,L,img/ct2.nii.gz,img/dicom",
        "p3,s1,ct,cN3,,L,img/ct2.nii.gz,img/pet2.nii.gz",
        "p4,s1,ct,N1,Station 10r ; 11Rs,right,img/ct1.nii.gz,img/pet1.nii.gz",
        "p5,s1,ct,N2,unknown,R,img/ct1.nii.gz,img/pet1.nii.gz",
    ])
    c = read_cohort(path)
    assert c.valid, [str(p) for p in c.problems]
    assert c.problems == []
    r1, r2, r3, r4, r5 = c.rows
    assert r1.line == 2 and r1.n_stage == 2 and r1.positive_stations == ["4R", "7"] and r1.tumour_side == "R"
    assert r1.ct_path == tmp_path / "img" / "ct1.nii.gz"
    assert r2.positive_stations == [] and r2.has_station_labels and r2.pet_path.is_dir()
    assert r3.positive_stations is None and not r3.has_station_labels  # N3 with empty list: unknown
    assert r4.positive_stations == ["10R", "11R"] and r4.tumour_side == "R"
    assert r5.positive_stations is None
    assert r1.station_labels().sum() == 2 and (r3.station_labels() == UNKNOWN).all()
    s = c.summary()
    assert s["n_stage_counts"] == {"N0": 1, "N1": 1, "N2": 2, "N3": 1} and s["patients"] == 5
    assert s["rows_with_station_labels"] == 3
    frame = c.to_frame()
    assert len(frame) == 5 and frame.loc[0, "patient_id"] == "p1" and frame.loc[0, "n_stage"] == "N2"


def test_every_error_kind_is_reported_with_its_line(tmp_path):
    path = make_cohort(tmp_path, [
        "p1,s1,ct,N5,4R,R,img/ct1.nii.gz,img/pet1.nii.gz",       # 2 bad n_stage
        "p2,s1,ct,N2,4Q;7,R,img/ct1.nii.gz,img/pet1.nii.gz",     # 3 bad station
        "p3,s1,ct,N2,7,X,img/ct1.nii.gz,img/pet1.nii.gz",        # 4 bad side
        "p4,s1,ct,N2,7,R,img/missing.nii.gz,img/pet1.nii.gz",    # 5 missing file
        "p5,s1,ct,N2,7,R,img/ct1.nii.gz,img/pet1.nii.gz",        # 6 ok
        "p5,s1,ct,N2,7,R,img/ct2.nii.gz,img/pet2.nii.gz",        # 7 duplicate of line 6
        "p6,s1,ct,N2,7,R,img/ct1.nii.gz,img/pet1.nii.gz",        # 8 side conflict with 9
        "p6,s2,ct,N2,7,L,img/ct1.nii.gz,img/pet1.nii.gz",        # 9
        ",s1,ct,N0,,R,img/ct1.nii.gz,img/pet1.nii.gz",           # 10 empty patient_id
        "p7,s1,ct,N0,,R,,img/pet1.nii.gz",                       # 11 empty ct_path
        "p8,s1,ct,N1,7,R,img/ct1.nii.gz,img/pet1.nii.gz",        # 12 label inconsistency (warning)
        "p9,s1,ct,N2,none,R,img/ct1.nii.gz,img/pet1.nii.gz",     # 13 explicit none with N2 (warning)
    ])
    c = read_cohort(path)
    assert not c.valid
    found = set(kinds(c))
    expected = {
        ("bad_n_stage", 2, "n_stage"),
        ("bad_station", 3, "positive_stations"),
        ("bad_side", 4, "tumour_side"),
        ("missing_file", 5, "ct_path"),
        ("duplicate_id", 7, "patient_id"),
        ("side_conflict", 8, "tumour_side"),
        ("side_conflict", 9, "tumour_side"),
        ("empty_value", 10, "patient_id"),
        ("empty_value", 11, "ct_path"),
        ("label_inconsistency", 12, "n_stage"),
        ("label_inconsistency", 13, "n_stage"),
    }
    assert expected <= found, found - expected
    assert len(c.rows) == 12, "no row is dropped"
    assert [r.line for r in c.rows if r.valid] == [6, 12, 13]
    warn = {(p.kind, p.line) for p in c.warnings}
    assert warn == {("label_inconsistency", 12), ("label_inconsistency", 13)}
    bad_station = next(p for p in c.problems if p.kind == "bad_station")
    assert "4Q" in bad_station.message and "10L" in bad_station.message  # lists the valid names
    missing = next(p for p in c.problems if p.kind == "missing_file")
    assert "missing.nii.gz" in missing.message
    incons = next(p for p in c.problems if p.line == 12)
    assert "N1" in incons.message and "N2" in incons.message and "ajcc8" in incons.message
    with pytest.raises(InputError, match="line 2"):
        c.require_valid()


def test_label_consistency_follows_rule_set(tmp_path):
    path = make_cohort(tmp_path, ["p1,s1,ct,N2,1R,R,img/ct1.nii.gz,img/pet1.nii.gz"])
    assert [p.kind for p in read_cohort(path).warnings] == ["label_inconsistency"]  # ajcc8: 1R is N3
    assert read_cohort(path, rules="engelson2026").problems == []


def test_missing_and_unknown_columns_and_optional_paths(tmp_path):
    header = "patient_id,study,n_stage,positive_stations,tumour_side,ct_path,pet_path,lesion_path,split,site"
    path = make_cohort(tmp_path, [
        "p1,s1,N1,10R,R,img/ct1.nii.gz,img/pet1.nii.gz,img/nolesion.nii.gz,train,UKSH",
        "p2,s1,N0,,R,img/ct1.nii.gz,img/pet1.nii.gz,,holdout,UKSH",
    ], header=header)
    c = read_cohort(path)
    found = set(kinds(c))
    assert ("missing_column", 1, "series") in found
    assert ("unknown_column", 1, "site") in found
    assert ("missing_file", 2, "lesion_path") in found
    assert ("bad_split", 3, "split") in found
    assert c.rows[0].extra == {"site": "UKSH"} and c.rows[0].split == "train"
    assert not read_cohort(path, check_files=False).valid  # the missing column remains an error


def test_unreadable_tables(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_cohort(tmp_path / "none.csv")
    p = tmp_path / "semi.csv"
    p.write_text(HEADER.replace(",", ";") + "\n")
    with pytest.raises(InputError, match="comma-separated"):
        read_cohort(p)
    p.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_cohort(p)
    p.write_text(HEADER + "\n")
    assert [pr.kind for pr in read_cohort(p).problems] == ["no_rows"]


def test_write_then_read_round_trip(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"x")
    (tmp_path / "pet.nii.gz").write_bytes(b"x")
    rows = [
        {"patient_id": "a", "study": "1", "series": "1", "n_stage": "N2", "positive_stations": ["4R", "7"],
         "tumour_side": "R", "ct_path": "ct.nii.gz", "pet_path": "pet.nii.gz", "split": "test"},
        {"patient_id": "b", "study": "1", "series": "1", "n_stage": "N0", "positive_stations": [],
         "tumour_side": "L", "ct_path": "ct.nii.gz", "pet_path": "pet.nii.gz", "split": "train"},
    ]
    path = write_cohort(rows, tmp_path / "c.csv")
    c = read_cohort(path)
    assert c.valid and c.problems == []
    assert [r.positive_stations for r in c.rows] == [["4R", "7"], []]
    assert not list(tmp_path.glob(".*part*")), "no temporary file left behind"
