"""N-staging rule sets: exhaustive properties over all 2^17 station subsets, hand-checked cases, pseudo-labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.staging.rules import (
    UNKNOWN,
    available_rule_sets,
    load_rules,
    parse_n_stage,
    parse_side,
    pseudo_labels,
    stage,
)
from LymphNodeStagingLib.staging.stations import NUM_STATIONS, STATION_NAMES, STATIONS, mirror, parse_station

RULES = ("ajcc8", "engelson2026")
SIDES = ("R", "L")
IDX = {name: i for i, name in enumerate(STATION_NAMES)}


@pytest.fixture(scope="module")
def subsets() -> np.ndarray:
    """All 2^17 subsets of stations as a boolean array (131072, 17); row k has bit j set if station j is positive."""
    codes = np.arange(2**NUM_STATIONS, dtype=np.int64)
    return ((codes[:, None] >> np.arange(NUM_STATIONS)) & 1).astype(bool)


@pytest.fixture(scope="module")
def stages(subsets) -> dict[tuple[str, str], np.ndarray]:
    return {(r, s): load_rules(r).stage_array(subsets, s) for r in RULES for s in SIDES}


def test_bundled_rule_sets():
    assert set(RULES) <= set(available_rule_sets())
    for r in RULES:
        rs = load_rules(r)
        assert rs.version and rs.description and rs.reference
        assert rs.to_dict()["groups_by_side"]["R"]["N1"] == ["10R", "11R"]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("side", SIDES)
def test_each_station_in_exactly_one_group(rules, side):
    masks = load_rules(rules).group_masks(side)
    assert masks.shape == (3, NUM_STATIONS)
    assert (masks.sum(axis=0) == 1).all()


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("side", SIDES)
def test_monotonic_adding_a_station_never_lowers_n(subsets, stages, rules, side):
    st = stages[(rules, side)]
    codes = np.arange(2**NUM_STATIONS)
    assert st[0] == 0
    for j in range(NUM_STATIONS):
        without = codes[(codes >> j) & 1 == 0]
        assert (st[without | (1 << j)] >= st[without]).all(), STATION_NAMES[j]
    # N is exactly the highest group among the positives, and only N0 for the empty set
    assert (st[1:] >= 1).all()


@pytest.mark.parametrize("rules", RULES)
def test_mirror_symmetry(subsets, stages, rules):
    perm = np.array([mirror(s).index for s in STATIONS])
    mirrored = subsets[:, perm]
    assert np.array_equal(stages[(rules, "R")], load_rules(rules).stage_array(mirrored, "L"))
    # the group of a station for side R equals the group of its mirror for side L
    rs = load_rules(rules)
    for s in STATIONS:
        assert rs.group(s, "R") == rs.group(mirror(s), "L")


@pytest.mark.parametrize("side", SIDES)
def test_rule_sets_differ_exactly_when_ipsilateral_station1_decides(subsets, stages, side):
    ajcc, paper = stages[("ajcc8", side)], stages[("engelson2026", side)]
    ipsi1 = IDX["1" + side]
    g_ajcc = load_rules("ajcc8").group_of[side]
    other_n3 = (subsets & (g_ajcc == 3) & (np.arange(NUM_STATIONS) != ipsi1)).any(axis=1)
    decides = subsets[:, ipsi1] & ~other_n3
    assert np.array_equal(ajcc != paper, decides)
    assert (ajcc >= paper).all()
    assert (ajcc[decides] == 3).all() and (paper[decides] == 2).all()
    assert decides.sum() > 0


CASES = [
    # rules, side, positives, N, TNM9, deciding
    ("ajcc8", "R", [], 0, "N0", []),
    ("ajcc8", "R", ["10R"], 1, "N1", ["10R"]),
    ("ajcc8", "R", ["10R", "11Rs"], 1, "N1", ["10R", "11R"]),
    ("ajcc8", "R", ["7"], 2, "N2a", ["7"]),
    ("ajcc8", "R", ["7L", "7R"], 2, "N2a", ["7"]),
    ("ajcc8", "R", ["4R", "7", "10R"], 2, "N2b", ["4R", "7"]),
    ("ajcc8", "R", ["5"], 2, "N2a", ["5"]),
    ("ajcc8", "L", ["5", "6"], 2, "N2b", ["5", "6"]),
    ("ajcc8", "R", ["4L"], 3, "N3", ["4L"]),
    ("ajcc8", "R", ["10L", "7"], 3, "N3", ["10L"]),
    ("ajcc8", "R", ["1R"], 3, "N3", ["1R"]),
    ("ajcc8", "L", ["1L", "2L"], 3, "N3", ["1L"]),
    ("ajcc8", "L", ["11R"], 3, "N3", ["11R"]),
    ("engelson2026", "R", ["1R"], 2, "N2a", ["1R"]),
    ("engelson2026", "L", ["1L", "4L"], 2, "N2b", ["1L", "4L"]),
    ("engelson2026", "R", ["1L"], 3, "N3", ["1L"]),
    ("engelson2026", "L", ["10L"], 1, "N1", ["10L"]),
]


@pytest.mark.parametrize(("rules", "side", "positives", "n", "tnm9", "deciding"), CASES)
def test_hand_checked_cases(rules, side, positives, n, tnm9, deciding):
    res = stage(positives, side, rules)
    assert (res.n_stage, res.tnm9, res.deciding_stations) == (n, tnm9, deciding)
    assert res.rules == rules and res.side == side
    assert set(res.groups) == {parse_station(p).name for p in positives}
    d = res.to_dict()
    assert d["n_stage"] == f"N{n}" and d["tnm9"] == tnm9
    json.dumps(d)


def test_explanation_names_groups():
    res = stage(["4R", "7", "10L"], "R")
    assert res.groups == {"4R": "N2", "7": "N2", "10L": "N3"}
    text = res.explanation()
    assert "10L" in text and "ajcc8" in text and text.startswith("N3")


@pytest.mark.parametrize("side", SIDES)
def test_tnm9_matches_n2_count(subsets, stages, side):
    rs = load_rules("ajcc8")
    n2 = rs.n2_count_array(subsets, side)
    st = stages[("ajcc8", side)]
    # spot check against the scalar path on a deterministic sample of subsets
    rng = np.random.default_rng(0)
    for k in rng.choice(len(subsets), 300, replace=False):
        names = [STATION_NAMES[j] for j in np.flatnonzero(subsets[k])]
        res = rs.stage(names, side)
        assert res.n_stage == st[k]
        assert res.tnm9 == ("N2a" if n2[k] == 1 else "N2b") if st[k] == 2 else res.tnm9 == f"N{st[k]}"


def test_pseudo_labels_table():
    assert pseudo_labels("N0").tolist() == [0, 0, 0]
    assert pseudo_labels(1).tolist() == [1, 0, 0]
    assert pseudo_labels("N2").tolist() == [UNKNOWN, 1, 0]
    assert pseudo_labels("cN3").tolist() == [UNKNOWN, UNKNOWN, 1]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("side", SIDES)
def test_pseudo_labels_agree_with_every_subset(subsets, stages, rules, side):
    """For every subset, the known pseudo-labels of its N-stage equal 'any positive station in the group'."""
    masks = load_rules(rules).group_masks(side)
    group_pos = np.stack([(subsets & m).any(axis=1) for m in masks], axis=1).astype(int)  # (2^17, 3)
    st = stages[(rules, side)]
    for n in range(4):
        labels = pseudo_labels(n)
        known = labels != UNKNOWN
        sel = st == n
        assert (group_pos[sel][:, known] == labels[known]).all()


def test_parsers_and_errors(tmp_path):
    assert parse_side("right") == "R" and parse_side(" l ") == "L"
    with pytest.raises(UsageError, match="tumour_side"):
        parse_side("-", "tumour_side")
    assert [parse_n_stage(x) for x in ("0", "N1", "n2", "cN3", "pN2", 3)] == [0, 1, 2, 3, 2, 3]
    with pytest.raises(UsageError, match="n_stage"):
        parse_n_stage("N4")
    with pytest.raises(UsageError, match="ajcc8"):
        load_rules("nonsense")
    bad = tmp_path / "bad.json"
    data = load_rules("ajcc8").to_dict()
    data["groups_by_side"]["R"]["N1"].append("7")
    bad.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="more than one group"):
        load_rules(str(bad))
    data = load_rules("ajcc8").to_dict()
    data["groups_by_side"]["L"]["N2"].remove("9")
    bad.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="no group"):
        load_rules.cache_clear() or load_rules(str(bad))
    good = tmp_path / "custom.json"
    data = load_rules("ajcc8").to_dict()
    data["name"] = "custom"
    good.write_text(json.dumps(data))
    assert load_rules(str(good)).stage(["7"], "R").rules == "custom"


def test_stage_rows_matches_stage_array_per_patient():
    import numpy as np

    from LymphNodeStagingLib.staging.rules import load_rules

    rs = load_rules("engelson2026")
    rng = np.random.default_rng(0)
    positive = rng.random((4, 25, 17)) > 0.85
    sides = list(rng.choice(["R", "L"], 25))
    expected = np.array([[rs.stage_array(p, s) for p, s in zip(rows, sides, strict=True)] for rows in positive])
    assert (rs.stage_rows(positive, sides) == expected).all()
