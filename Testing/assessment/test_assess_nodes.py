"""assess_case and ``lnstaging assess`` with a lymph node model: the nodes in result.json (and back), per-station
counts in the station table and CSV, nodes.nii.gz on the CT grid, node outlines in the overview, SUV figures from the
PET in SUV; without a node model nothing changes; a bad node model is refused before any heavy step.

The station mapping is the phantom's true station map (no registration) and the node model the session's tiny S-Net
(``trained_snet``): its detections are rough, which is all these checks need."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from case_fixtures import phantom_case_files
from node_fixtures import tiny_node_classifier, torch_threads

from LymphNodeStagingLib.assessment.assess import assess_case
from LymphNodeStagingLib.assessment.overview import NODE_OUTLINE
from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.errors import ModelError
from LymphNodeStagingLib.mapping.station_mapping import read_station_mapping
from LymphNodeStagingLib.nodes.model import bundled_node_model
from LymphNodeStagingLib.staging.result import CaseResult
from LymphNodeStagingLib.staging.stations import STATION_NAMES

NODE_KEYS = {"id", "station", "centre_mm", "short_axis_mm", "long_axis_mm", "volume_ml", "mean_hu", "score", "voxels",
             "suv_max", "suv_mean", "suv_peak", "probability"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return phantom_case_files(tmp_path_factory.mktemp("assess-nodes"), 3141)


def assess(case, out, **kwargs):
    paths = case["paths"]
    with torch_threads(1):
        return assess_case(paths["ct"], paths["pet"], case["side"], anatomy=paths["anatomy"], model=case["model"],
                           pet_is_suv=True, case_id="PH3141", station_mapping=read_station_mapping(case["mapping"]),
                           out_dir=out, **kwargs)


@pytest.fixture(scope="module")
def with_nodes(case, trained_snet, tmp_path_factory):
    out = tmp_path_factory.mktemp("with-nodes")
    seen: list[str] = []
    clf = tiny_node_classifier(out.parent / f"{out.name}-node-classifier.pt")
    res = assess(case, out, node_model=trained_snet[1].checkpoint, node_classifier=clf,
                 progress=lambda p: seen.append(p.message))
    return res, out, seen


def test_result_lists_the_nodes_and_the_instance_map_holds_them(with_nodes, case, trained_snet):
    res, out, seen = with_nodes
    r = res.result
    assert r.nodes is not None and len(r.nodes) > 0, "the tiny node model found nothing in the station crop"
    assert "finding lymph nodes" in seen and "nodes" in r.timings_s and "node_model" in r.timings_s
    for i, n in enumerate(r.nodes, start=1):
        assert set(n) == NODE_KEYS and n["id"] == i
        assert 0 < n["short_axis_mm"] <= n["long_axis_mm"] and n["volume_ml"] > 0 and 0 < n["score"] <= 1
        assert n["station"] is None or n["station"] in STATION_NAMES
        assert n["suv_max"] is not None and n["suv_mean"] <= n["suv_peak"] + 1e-6 <= n["suv_max"] + 2e-6
        assert 0.0 <= n["probability"] <= 1.0
    assert r.model["node_model"]["path"] == str(trained_snet[1].checkpoint) and r.model["node_model"]["file_sha256"]
    # nodes.nii.gz: instance ids 1..n on the CT grid, each as many voxels as its record says
    ct = sitk.ReadImage(str(case["paths"]["ct"]))
    node_map = sitk.ReadImage(str(out / "nodes.nii.gz"))
    assert res.files["nodes"] == out / "nodes.nii.gz"
    assert node_map.GetSize() == ct.GetSize() and node_map.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_allclose(node_map.GetOrigin(), ct.GetOrigin())
    np.testing.assert_allclose(node_map.GetSpacing(), ct.GetSpacing())
    labels = sitk.GetArrayFromImage(node_map)
    counts = np.bincount(labels.ravel(), minlength=len(r.nodes) + 1)
    assert len(counts) == len(r.nodes) + 1
    assert [int(c) for c in counts[1:]] == [n["voxels"] for n in r.nodes]
    # SUV figures come from the PET in SUV (resampled onto the CT grid, as find_nodes does)
    pet = sitk.Resample(sitk.ReadImage(str(case["paths"]["pet"])), ct, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    largest = max(r.nodes, key=lambda n: n["voxels"])
    assert largest["suv_max"] == pytest.approx(float(sitk.GetArrayViewFromImage(pet)[labels == largest["id"]].max()),
                                               rel=1e-5)


def test_result_json_and_station_table(with_nodes):
    res, out, _ = with_nodes
    r = res.result
    data = json.loads((out / "result.json").read_text())
    assert data["nodes"] == r.nodes and len(data["nodes"][0]["centre_mm"]) == 3
    back = CaseResult.read_json(out / "result.json")
    assert back.nodes == r.nodes and back.station_nodes() == r.station_nodes()
    rows = list(csv.DictReader((out / "result.csv").read_text().splitlines()))
    assert list(rows[0]) == [*CaseResult.CSV_COLUMNS, "n_nodes", "max_short_axis_mm", "top_node", "node_probability"]
    for row in rows:
        mine = [n for n in r.nodes if n["station"] == row["station"]]
        assert int(row["n_nodes"]) == len(mine), row["station"]
        if mine:
            assert float(row["max_short_axis_mm"]) == pytest.approx(max(n["short_axis_mm"] for n in mine), rel=1e-5)
        else:
            assert row["max_short_axis_mm"] == ""
    frame = r.to_frame()
    assert list(frame.columns) == list(r.csv_columns) and frame["n_nodes"].sum() == sum(1 for n in r.nodes
                                                                                       if n["station"])
    head = next(line for line in r.text_table().splitlines() if line.startswith("station"))
    assert head.split()[-4:] == ["nodes", "short", "top", "p_node"]


def test_node_probabilities_and_the_most_suspicious_node_of_each_station(with_nodes):
    res, out, _ = with_nodes
    r = res.result
    assert "node_classifier" in r.timings_s and r.model["node_classifier"]["modality"] == "petct"
    top = r.top_nodes()
    for st in r.stations:
        mine = [n for n in r.nodes if n["station"] == st.name]
        if not st.present:
            continue
        assert 0.0 <= st.node_probability <= 1.0
        if mine:
            assert top[st.name]["probability"] == max(n["probability"] for n in mine)
            # a station's probability from its nodes is its most suspicious node's (max pooling, no calibration)
            assert st.node_probability == pytest.approx(top[st.name]["probability"], abs=1e-6)
        else:
            assert st.node_probability == pytest.approx(0.05) and st.name not in top  # the prior
    rows = {row["station"]: row for row in csv.DictReader((out / "result.csv").read_text().splitlines())}
    for name, n in top.items():
        assert rows[name]["top_node"] == str(n["id"])
    back = CaseResult.read_json(out / "result.json")
    assert [s.node_probability for s in back.stations] == [s.node_probability for s in r.stations]


def test_overview_outlines_the_nodes(with_nodes):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    _, out, _ = with_nodes
    img = imread(out / "overview.png")[..., :3]
    cyan = np.all(np.abs(img - np.asarray(to_rgb(NODE_OUTLINE))) < 0.12, axis=-1)
    assert cyan.sum() > 50, "no node outline in the overview"


def test_without_a_node_model_the_result_is_unchanged(case, tmp_path):
    """No --node-model: the bundled node model decides (none is bundled yet: no nodes, no error)."""
    res = assess(case, tmp_path)
    r = res.result
    bundled = bundled_node_model()
    if bundled is not None:  # a bundled node model is used automatically
        assert r.nodes is not None and r.model["node_model"]["path"] == str(bundled)
        return
    assert r.nodes is None and "node_model" not in r.model and "nodes" not in r.timings_s
    assert "nodes" not in res.files and not (tmp_path / "nodes.nii.gz").exists()
    assert (tmp_path / "result.csv").read_text().splitlines()[0] == ",".join(CaseResult.CSV_COLUMNS)
    assert json.loads((tmp_path / "result.json").read_text())["nodes"] is None
    assert "nodes" not in r.text_table()


def test_a_bad_node_model_is_refused_before_any_heavy_step(case, tmp_path):
    """Refused right after the images are read: the atlas folder does not exist, so a later check would have failed
    with another error; nothing is written."""
    paths = case["paths"]
    seen: list[str] = []
    for bad, words in ((case["model"], ("node_model", "model.pt", "nodes")),
                       (tmp_path / "missing-nodes.pt", ("node_model", "missing-nodes.pt", "does not exist"))):
        with pytest.raises(ModelError) as err:
            assess_case(paths["ct"], paths["pet"], case["side"], anatomy=paths["anatomy"], model=case["model"],
                        node_model=bad, atlases=tmp_path / "no-atlases", pet_is_suv=True, out_dir=tmp_path / "out",
                        progress=lambda p: seen.append(p.message))
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    assert set(seen) == {"loading and checking images"}
    assert not list((tmp_path / "out").glob("*"))


def test_cli_refuses_a_missing_node_model(case, tmp_path, capsys):
    paths = case["paths"]
    code = main(["assess", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--pet-is-suv", "--side", "R",
                 "--anatomy", str(paths["anatomy"]), "--model", case["model"], "--atlases", str(tmp_path / "none"),
                 "--node-model", str(tmp_path / "no-such-nodes.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "no-such-nodes.pt" in err and "Traceback" not in err
