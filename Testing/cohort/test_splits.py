"""Patient-level stratified k-fold split: no leakage, strata respected, reproducible, reused files checked."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from LymphNodeStagingLib.cohort.splits import (
    Split,
    SplitPatient,
    assign_strata,
    collapse_patients,
    load_or_make_split,
    make_split,
    patients_from_rows,
    read_split,
    write_split,
)
from LymphNodeStagingLib.errors import UsageError


def cohort(n: int = 200, seed: int = 1, scans_per_patient: bool = True) -> list[tuple[str, int, int | None]]:
    """Per-scan triples (patient_id, n_stage, n_positive); some patients have two scans, some unknown counts."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        n_stage = int(rng.choice(4, p=[0.5, 0.15, 0.25, 0.1]))
        count = 0 if n_stage == 0 else int(rng.integers(1, 7))
        if i % 31 == 5:
            count = None
        rows.append((f"P{i:03d}", n_stage, count))
        if scans_per_patient and i % 4 == 0:
            rows.append((f"P{i:03d}", n_stage, count))  # a second scan of the same patient
    return rows


def test_every_patient_in_exactly_one_test_fold_and_no_leakage():
    rows = cohort()
    split = make_split(rows, n_folds=5, seed=7)
    patients = {r[0] for r in rows}
    assert set(split.patients) == patients
    test_sets = [set(f.test) for f in split.folds]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not test_sets[i] & test_sets[j]
    assert set().union(*test_sets) == patients
    assert sum(len(s) for s in test_sets) == len(patients)
    for f in split.folds:
        train, val, test = set(f.train), set(f.validation), set(f.test)
        assert not train & val and not train & test and not val & test
        assert train | val | test == patients
        # 60 / 20 / 20
        assert abs(len(test) - 40) <= 1 and abs(len(val) - 40) <= 1
    # scans of a patient never straddle: the split works on patients, each listed once
    for f in split.folds:
        assert len(f.test) == len(set(f.test))


def test_strata_respected_within_tolerance():
    split = make_split(cohort(300, seed=3), n_folds=5, seed=0)
    counts = split.stratum_counts()
    assert all(c >= 5 for c in counts.values())
    for name, total in counts.items():
        per_fold = [sum(1 for p in f.test if split.strata[p] == name) for f in split.folds]
        assert max(per_fold) - min(per_fold) <= 1, (name, per_fold)
        assert sum(per_fold) == total
        for f in split.folds:  # validation share per stratum close to 25 % of the non-test patients
            rest = total - sum(1 for p in f.test if split.strata[p] == name)
            nval = sum(1 for p in f.validation if split.strata[p] == name)
            assert abs(nval - 0.25 * rest) <= 1
    sizes = [len(f.test) for f in split.folds]
    assert max(sizes) - min(sizes) <= 1
    # the N-stage proportion of each test fold follows the cohort's
    stages = Counter(p.n_stage for p in split.patients.values())
    for f in split.folds:
        fs = Counter(split.patients[p].n_stage for p in f.test)
        for n, c in stages.items():
            assert abs(fs[n] / len(f.test) - c / len(split.patients)) < 0.05


def test_merge_rule_is_numeric_and_deterministic():
    pats = {}

    def add(prefix, n_stage, n_pos, k):
        for i in range(k):
            pid = f"{prefix}{i}"
            pats[pid] = SplitPatient(pid, n_stage, n_pos)

    add("a", 0, 0, 10)
    add("b", 2, 1, 6)
    add("c", 2, 2, 6)
    add("d", 2, 10, 1)  # string order would put "10" before "2"; numeric order merges it into N2:3..10
    add("e", 2, 3, 2)
    add("f", 2, None, 2)  # rare unknown count joins the largest known N2 stratum (ties: fewer positives -> N2:1)
    add("g", 3, 4, 2)  # N3 as a whole is rare: joins the adjacent lower N-stage stratum
    strata = assign_strata(pats, min_stratum_size=5)
    assert strata["a0"] == "N0:0"
    assert strata["f0"] == strata["b0"] == "N2:1"
    # N3:4 has no N3 neighbour -> joins N2:10 (the adjacent lower stratum); that is still rare and joins the next
    # lower N2 stratum, N2:3 (numeric order), which then holds 5 and stops the merging
    assert strata["d0"] == strata["e0"] == strata["g0"] == "N2:3-N3:4"
    counts = Counter(strata.values())
    assert counts == {"N0:0": 10, "N2:1": 8, "N2:2": 6, "N2:3-N3:4": 5}
    assert assign_strata(dict(reversed(list(pats.items()))), 5) == strata


def test_same_seed_same_file_different_seed_different(tmp_path):
    rows = cohort(80)
    a = write_split(make_split(rows, 5, seed=11), tmp_path / "a.json")
    b = write_split(make_split(list(reversed(rows)), 5, seed=11), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    c = make_split(rows, 5, seed=12)
    assert [f.test for f in c.folds] != [f.test for f in make_split(rows, 5, seed=11).folds]


def test_reused_file_gives_same_split_and_csv_round_trip(tmp_path):
    rows = cohort(60)
    path = tmp_path / "split.json"
    first = load_or_make_split(path, rows, n_folds=3, seed=5)
    assert path.exists() and path.with_suffix(".csv").exists()
    mtime = path.stat().st_mtime_ns
    again = load_or_make_split(path, rows, n_folds=3, seed=5)
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert again.to_dict() == first.to_dict()
    from_csv = read_split(path.with_suffix(".csv"))
    assert from_csv.to_dict() == first.to_dict()
    data = json.loads(path.read_text())
    assert data["n_folds"] == 3 and data["seed"] == 5 and "merge_rule" in data


def test_reused_file_that_does_not_match_the_cohort_is_a_clear_error(tmp_path):
    rows = cohort(40)
    path = tmp_path / "split.json"
    load_or_make_split(path, rows, n_folds=4, seed=0)
    with pytest.raises(UsageError, match=r"split\.json does not match the cohort: 1 cohort patient\(s\) not in"):
        load_or_make_split(path, [*rows, ("NEW", 1, 1)], n_folds=4, seed=0)
    with pytest.raises(UsageError, match=r"split patient\(s\) not in the cohort.*'P000'"):
        load_or_make_split(path, [r for r in rows if r[0] != "P000"], n_folds=4, seed=0)
    changed = [(p, (n + 1) % 4, c) if p == "P001" else (p, n, c) for p, n, c in rows]
    with pytest.raises(UsageError, match=r"different N-stage.*'P001'"):
        load_or_make_split(path, changed, n_folds=4, seed=0)
    with pytest.raises(UsageError, match=r"made with n_folds=4, but n_folds=5"):
        load_or_make_split(path, rows, n_folds=5, seed=0)
    with pytest.raises(UsageError, match=r"made with seed=0, but seed=3"):
        load_or_make_split(path, rows, n_folds=4, seed=3)


def test_tampered_file_with_leakage_is_rejected(tmp_path):
    split = make_split(cohort(30), n_folds=3, seed=0)
    d = split.to_dict()
    leaked = d["folds"][0]["test"][0]
    d["folds"][0]["train"].append(leaked)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(UsageError, match=r"bad\.json.*fold 0"):
        read_split(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        read_split(tmp_path / "junk.json")
    with pytest.raises(UsageError, match="does not exist"):
        read_split(tmp_path / "missing.json")


def test_subset_keeps_assignments():
    split = make_split(cohort(50), n_folds=5, seed=2)
    keep = sorted(split.patients)[::2]
    sub = split.subset(keep)
    for f, g in zip(split.folds, sub.folds, strict=True):
        assert set(g.test) == set(f.test) & set(keep)
        assert set(g.train) == set(f.train) & set(keep)
    with pytest.raises(UsageError, match="does not contain"):
        split.subset(["nobody"])


def test_bad_input_and_small_cohorts():
    with pytest.raises(UsageError, match="n_folds"):
        make_split(cohort(20), n_folds=1)
    with pytest.raises(UsageError, match="at least 5"):
        make_split([("a", 0, 0), ("b", 1, 1)], n_folds=5)
    with pytest.raises(UsageError, match="n_stage of patient 'x'"):
        make_split([("x", 5, 0)] * 3, n_folds=2)
    with pytest.raises(UsageError, match="empty"):
        make_split([], n_folds=2)
    tiny = make_split([(f"t{i}", i % 4, i % 4) for i in range(6)], n_folds=2, seed=0)
    assert sorted(set(tiny.strata.values())) == ["N0:0", "N1:1", "N2:2-N3:3"]
    assert all(f.train and f.test for f in tiny.folds)
    one = make_split([("u", 0, 0), ("v", 2, 1), ("w", 3, 2)], n_folds=3, seed=0)  # everything merges
    assert set(one.strata.values()) == {"N0:0-N3:2"}


def test_inconsistent_scans_and_cohort_rows():
    merged = collapse_patients([("p", 1, 1), ("p", 2, None), ("p", 0, 3)])
    assert merged["p"] == SplitPatient("p", 2, 3)
    rows = [SimpleNamespace(patient_id="a", n_stage=2, positive_stations=["4R", "7"]),
            SimpleNamespace(patient_id="b", n_stage=1, positive_stations=None)]
    assert patients_from_rows(rows) == [SplitPatient("a", 2, 2), SplitPatient("b", 1, None)]
    assert isinstance(make_split(patients_from_rows(rows * 2), n_folds=2), Split)
