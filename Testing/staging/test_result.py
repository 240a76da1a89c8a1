"""CaseResult: staging from probabilities, instant re-staging with threshold and overrides, round trips."""

from __future__ import annotations

import csv
import io

import pytest

from LymphNodeStagingLib.errors import LNSError
from LymphNodeStagingLib.staging.result import ABSENT, NEGATIVE, POSITIVE, CaseResult, make_case_result
from LymphNodeStagingLib.staging.stations import STATION_NAMES


def example() -> CaseResult:
    probs = {name: 0.05 for name in STATION_NAMES}
    probs.update({"4R": 0.8, "7": 0.55, "10L": 0.35, "11L": None})
    return make_case_result("case1", "R", probs, threshold=0.5,
                            suv_max={"4R": 7.5, "7": 3.1}, centre_mm={"4R": (-20.0, 10.0, 100.0)})


def test_staging_from_probabilities():
    r = example()
    assert [s.name for s in r.stations] == list(STATION_NAMES)
    assert r.positive_stations() == ["4R", "7"]
    assert (r.n_stage, r.tnm9, r.deciding_stations) == ("N2", "N2b", ["4R", "7"])
    assert r.station("11L").status == ABSENT and not r.station("11L").present
    assert r.station("4r").suv_max == 7.5 and r.station("4R").centre_mm == (-20.0, 10.0, 100.0)


def test_restage_threshold_overrides_rules():
    r = example()
    low = r.restage(threshold=0.3)
    assert low.n_stage == "N3" and low.deciding_stations == ["10L"]
    assert r.n_stage == "N2", "restage returns a new result and leaves the original alone"
    high = r.restage(threshold=0.9)
    assert high.n_stage == "N0"
    ov = r.restage(overrides={"7": NEGATIVE, "1R": POSITIVE})
    assert ov.positive_stations() == ["1R", "4R"] and ov.n_stage == "N3"
    assert ov.restage(rules="engelson2026").n_stage == "N2"
    cleared = ov.restage(overrides={"1R": None, "7": None})
    assert cleared.positive_stations() == ["4R", "7"]
    # an override survives a threshold change
    assert ov.restage(threshold=0.99).positive_stations() == ["1R"]
    with pytest.raises(LNSError):
        r.restage(threshold=1.5)
    with pytest.raises(LNSError):
        r.restage(overrides={"4R": "maybe"})


def test_json_and_csv_round_trip(tmp_path):
    r = example().restage(overrides={"9": POSITIVE})
    path = r.write_json(tmp_path / "result.json")
    back = CaseResult.read_json(path)
    assert back == r
    rows = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert len(rows) == 17 and rows[7]["station"] == "4R" and rows[7]["status"] == "positive"
    assert rows[12]["override"] == "positive" and rows[15]["present"] == "0"
    frame = r.to_frame()  # the same table for pandas users
    assert list(frame.columns) == list(CaseResult.CSV_COLUMNS) and len(frame) == 17
    assert frame.loc[7, "station"] == "4R" and frame.loc[7, "probability"] == r.stations[7].probability
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(LNSError, match="case result"):
        CaseResult.read_json(tmp_path / "bad.json")


def test_lymph_nodes_round_trip_and_per_station_counts(tmp_path):
    r = example()
    assert r.nodes is None and r.station_nodes() == {} and r.csv_columns == CaseResult.CSV_COLUMNS
    node = {"id": 1, "station": "4R", "centre_mm": [-20.0, 10.0, 100.0], "short_axis_mm": 12.5, "long_axis_mm": 18.0,
            "volume_ml": 1.2, "mean_hu": 35.0, "score": 0.9, "voxels": 400, "suv_max": 7.1, "suv_mean": 4.0,
            "suv_peak": 6.2}
    r.nodes = [node, {**node, "id": 2, "short_axis_mm": 6.0}, {**node, "id": 3, "station": None}]
    counts = r.station_nodes()
    assert counts["4R"] == (2, 12.5) and counts["7"] == (0, None) and sum(c for c, _ in counts.values()) == 2
    back = CaseResult.read_json(r.write_json(tmp_path / "result.json"))
    assert back == r and back.nodes == r.nodes
    rows = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert list(rows[0])[-4:] == ["n_nodes", "max_short_axis_mm", "top_node", "node_probability"]
    assert (rows[7]["n_nodes"], rows[7]["max_short_axis_mm"]) == ("2", "12.5") and rows[0]["n_nodes"] == "0"
    assert rows[7]["top_node"] == "1" and rows[7]["node_probability"] == ""  # the largest; no node classifier ran
    line = next(x for x in r.text_table().splitlines() if x.startswith("4R "))
    assert line.split()[-3:] == ["2", "12.5", "1"]
    assert r.restage(threshold=0.9).nodes == r.nodes  # re-staging keeps the nodes
    old = r.to_dict()
    del old["nodes"]  # a result written before node detection existed
    assert CaseResult.from_dict(old).nodes is None
    with pytest.raises(LNSError, match="'nodes' must be a list"):
        CaseResult.from_dict({**r.to_dict(), "nodes": {"1": node}})


def test_most_suspicious_nodes_and_the_nodes_that_decided_the_stage():
    probs = {name: 0.05 for name in ("1R", "2R", "4R", "7", "10R")}
    probs["4R"] = 0.9
    r = make_case_result("C1", "R", probs, threshold=0.5)
    r.nodes = [
        {"id": 1, "station": "4R", "short_axis_mm": 14.0, "probability": 0.40},
        {"id": 2, "station": "4R", "short_axis_mm": 7.0, "probability": 0.93},
        {"id": 3, "station": "7", "short_axis_mm": 11.0},
        {"id": 4, "station": None, "short_axis_mm": 5.0, "probability": 0.99},
    ]
    top = r.top_nodes()
    assert top["4R"]["id"] == 2 and top["7"]["id"] == 3 and set(top) == {"4R", "7"}
    r.station("4R").node_probability = 0.93
    r = r.restage()
    assert r.deciding_stations == ["4R"]
    assert "Deciding nodes: 4R: node 2 (short axis 7.0 mm, p 0.93)." in r.explanation
    rows = {row["station"]: row for row in r.table_rows()}
    assert rows["4R"]["top_node"] == 2 and rows["4R"]["node_probability"] == 0.93 and rows["1R"]["top_node"] is None
    # without probabilities the largest short axis is the most suspicious node
    r.nodes = [{k: v for k, v in n.items() if k != "probability"} for n in r.nodes]
    assert r.top_nodes()["4R"]["id"] == 1
    assert "node 1 (short axis 14.0 mm)" in r.restage().explanation
    # without nodes the explanation is the rule set's alone
    r.nodes = None
    assert "Deciding nodes" not in r.restage().explanation
