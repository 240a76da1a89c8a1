"""Cross-validated evaluation: baselines on hand-built images, method expansion, reference labels, and a 2-fold
end-to-end run of `lnstaging evaluate` on a tiny phantom cohort (training, baselines, ablation, report, resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.cohort.table import read_cohort
from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.evaluation.baselines import lesion_overlap
from LymphNodeStagingLib.evaluation.crossval import EvaluationConfig, method_specs, reference_labels
from LymphNodeStagingLib.staging.stations import NUM_STATIONS
from LymphNodeStagingLib.suv.statistics import station_suv_max


def _image(arr: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def test_station_suv_max_per_label_and_absent_is_nan():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # station index 0
    labels[6:9, 6:9, 6:9] = 5  # station index 4
    suv = np.full((10, 10, 10), 0.5, np.float32)
    suv[3, 3, 3] = 7.0
    suv[7, 8, 6] = 2.5
    suv[0, 0, 0] = 20.0  # outside every station
    out = station_suv_max(_image(suv), _image(labels))
    assert out.shape == (NUM_STATIONS,)
    assert out[0] == pytest.approx(7.0) and out[4] == pytest.approx(2.5)
    assert np.isnan(out[1]) and np.isnan(out[16])


def test_lesion_overlap_assigns_each_component_to_its_main_station():
    stations = np.zeros((12, 12, 12), np.uint8)
    stations[:, :, :6] = 3  # index 2
    stations[:, :, 6:] = 7  # index 6
    lesion = np.zeros_like(stations)
    lesion[1:3, 1:3, 4:8] = 1  # 16 voxels: 8 in station 3, 8 in station 7 -> tie to the lower index, fraction 0.5
    lesion[8:10, 8:10, 9:11] = 1  # 8 voxels, all in station 7
    lesion[5, 5, 0] = 1  # 1 voxel in station 3
    ov = lesion_overlap(_image(lesion), _image(stations))
    assert sorted(ov.voxels.tolist()) == [1, 8, 16]
    scores = ov.station_scores()
    assert scores[2] == pytest.approx(1.0) and scores[6] == pytest.approx(1.0)
    assert ov.positive(0.05)[[2, 6]].all() and ov.positive(0.05).sum() == 2
    # a lesion outside every station is assigned nowhere
    none = lesion_overlap(_image(lesion), _image(np.zeros_like(stations)))
    assert (none.station == -1).all() and not none.positive(0.05).any()


def test_lesion_overlap_fraction_below_cutoff_is_negative():
    stations = np.zeros((10, 10, 10), np.uint8)
    stations[:, :, :1] = 2  # index 1: one column of the lesion
    lesion = np.zeros_like(stations)
    lesion[2:4, 2:4, 0:10] = 1  # 40 voxels, 4 in station 2 -> fraction 0.1
    ov = lesion_overlap(_image(lesion), _image(stations))
    assert ov.fraction[0] == pytest.approx(0.1)
    assert ov.positive(0.1)[1] and not ov.positive(0.2)[1]


def test_method_specs_expand_ablations_with_dependencies():
    specs = method_specs(EvaluationConfig(methods=("ts2", "threshold"),
                                          ablations=("centroid", "no-pseudo", "rules", "atlases=3")))
    names = [s.name for s in specs]
    assert names == ["ts1", "ts2", "threshold", "ts1-centroid", "ts2-no-pseudo", "ts1-engelson2026", "ts1-atlases3"]
    by = {s.name: s for s in specs}
    assert by["ts2"].depends_on == "ts1" and by["ts2-no-pseudo"].pseudo_loss is False
    assert by["ts1-centroid"].sampling == "centroid" and by["ts1-atlases3"].atlases == 3
    assert by["ts1-engelson2026"].kind == "restage" and by["ts1-engelson2026"].rules == "engelson2026"
    with pytest.raises(UsageError, match="--strategy"):
        EvaluationConfig(methods=("ts4",))
    with pytest.raises(UsageError, match="--ablation"):
        EvaluationConfig(ablations=("atlases=0",))


def test_classifier_variants_are_ablation_rows_and_combine():
    config = EvaluationConfig(ablations=("mil-attention+hybrid", "batchnorm", "mil-noisy-or"), mil_instances=6,
                              model={"norm": "instance"})
    by = {s.name: s for s in method_specs(config)}
    assert by["ts1-mil-attention+hybrid"].model == {"pooling": "attention", "instances": 6, "hybrid": True}
    assert by["ts1-batchnorm"].model == {"norm": "batch"} and by["ts1"].model == {}
    assert by["ts1-mil-noisy-or"].model == {"pooling": "noisy_or", "instances": 6}
    with pytest.raises(UsageError, match="'mil-mean'"):
        EvaluationConfig(ablations=("mil-mean",))
    with pytest.raises(UsageError, match="pooling"):
        EvaluationConfig(model={"pooling": "mean"})


def test_reference_labels_from_truth_columns(tiny_cohort):
    rows = read_cohort(tiny_cohort).usable_rows()
    for r in rows:
        lab, n = reference_labels(r, "labels")
        assert n == r.n_stage and (lab == r.station_labels()).all()
        tlab, tn = reference_labels(r, "truth")
        assert tn in (0, 1, 2, 3) and set(np.unique(tlab)) <= {0, 1}
    r = rows[0]
    r.extra.pop("true_n_stage")
    with pytest.raises(UsageError, match="true_n_stage"):
        reference_labels(r, "truth")


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    assert main(["phantom", "--out", str(out), "--patients", "8", "--seed", "3"]) == 0
    assert main(["phantom", "--out", str(out / "atlases"), "--atlas", "--patients", "3", "--seed", "8",
                 "--size", "small"]) == 0
    return out / "cohort.csv"


def test_two_fold_evaluation_end_to_end(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(tiny_cohort), "--out", str(out), "--folds", "2", "--strategy", "ts1,ts2,threshold,lesion",
            "--ablation", "rules,mil-max+hybrid", "--mil-instances", "2", "--small", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--batch-size", "8",
            "--bootstrap", "20", "--permutations", "100", "--atlases", str(tiny_cohort.parent / "atlases"), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["methods"] == ["ts1", "ts2", "threshold", "lesion", "ts1-engelson2026", "ts1-mil-max+hybrid"]
    assert res["patients"] == 8 and res["scans"] == 8
    for name in ("report.md", "report.json", "split.json", "split.csv", "figures/summary.png",
                 "figures/ts1_patient_nstage_confusion.png", "figures/threshold_patient_station_confusion.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| ts1 |" in report and "| lesion |" in report and "ts1 vs threshold" in report
    # calibration of the probability methods (not of the SUVmax / lesion scores), with the reliability diagram
    assert "## Calibration of the station probabilities" in report and (out / "figures" / "reliability.png").is_file()
    assert set(res["calibration"]) == {"ts1", "ts2", "ts1-engelson2026", "ts1-mil-max+hybrid"}
    variant = json.loads((out / "folds" / "fold0" / "ts1-mil-max+hybrid" / "best.json").read_text())
    assert variant["manifest"]["model_config"]["instances"] == 2 and variant["manifest"]["model_config"]["hybrid"]
    assert 0.0 <= res["calibration"]["ts1"]["ece"] <= 1.0 and 0.0 <= res["calibration"]["ts1"]["brier"] <= 1.0
    split = json.loads((out / "split.json").read_text())
    # every patient is a test patient exactly once, and never trained on in its test fold
    seen = []
    for k in range(2):
        fold_preds = json.loads((out / "folds" / f"fold{k}" / "ts1" / "predictions.json").read_text())
        test_ids = {s.split("_")[0] for s in fold_preds["scan_ids"]}
        seen += sorted(test_ids)
        fold = split["folds"][k]
        assert test_ids == set(fold["test"]) and not test_ids & (set(fold["train"]) | set(fold["validation"]))
        ts2 = json.loads((out / "folds" / f"fold{k}" / "ts2" / "best.json").read_text())
        assert ts2["manifest"]["init"]["path"].endswith(f"fold{k}/ts1/best.pt")  # warm start from the same fold's TS1
        thr = json.loads((out / "folds" / f"fold{k}" / "threshold" / "predictions.json").read_text())
        assert thr["params"]["suv_threshold"] in (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5)
    assert sorted(seen) == sorted({r.patient_id for r in read_cohort(tiny_cohort).usable_rows()})
    full = json.loads((out / "report.json").read_text())
    ts1 = full["results"]["ts1"]["summary"]["patient"]
    assert set(ts1) >= {"station.balanced_accuracy", "stage.accuracy", "stage.qwk"}
    assert 0.0 <= ts1["stage.accuracy"]["mean"] <= 1.0

    # a second run reuses the split and every finished step
    before = {p: p.stat().st_mtime_ns for p in (out / "folds").rglob("predictions.json")}
    assert main(args) == 0
    capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in (out / "folds").rglob("predictions.json")} == before
    # asking for another number of folds on the same folder is refused, naming the split file
    assert main([*args[:5], "3", *args[6:]]) != 0
    assert "split" in capsys.readouterr().err

    # testing a trained model on the whole cohort
    model_out = tmp_path / "model-eval"
    assert main(["evaluate", str(tiny_cohort), "--out", str(model_out), "--model",
                 str(out / "folds" / "fold0" / "ts1" / "best.pt"), "--atlases", str(tiny_cohort.parent / "atlases"),
                 "--bootstrap", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["methods"] == ["best.pt"] and (model_out / "report.md").is_file()


def test_method_specs_of_node_methods_and_modalities():
    config = EvaluationConfig(methods=("threshold", "fusion", "short-axis", "node-suvmax"), modalities=("petct", "ct"))
    specs = method_specs(config)
    names = [s.name for s in specs]
    # fusion brings its station CNN and node classifier (dependencies first); CT-only rows end in -ct, PET methods
    # are left out of the CT-only run and short-axis (CT) appears once
    assert names == ["ts1", "threshold", "nodes-mil", "fusion", "short-axis", "node-suvmax", "ts1-ct",
                     "nodes-mil-ct", "fusion-ct"]
    by = {s.name: s for s in specs}
    assert by["ts1-ct"].model == {"in_channels": 1, "hybrid": False} and by["ts1-ct"].modality == "ct"
    assert by["fusion-ct"].fusion_of == ("ts1-ct", "nodes-mil-ct") and by["nodes-mil-ct"].modality == "ct"
    assert by["short-axis"].kind == "node-rule" and by["short-axis"].node_rule == "short-axis"
    only_ct = [s.name for s in method_specs(EvaluationConfig(methods=("ts1", "threshold"), modalities=("ct",)))]
    assert only_ct == ["ts1-ct"]
    with pytest.raises(UsageError, match="--modality"):
        EvaluationConfig(modalities=("pet",))


def test_node_methods_end_to_end_with_ct_only(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "eval-nodes"
    args = ["evaluate", str(tiny_cohort), "--out", str(out), "--folds", "2",
            "--strategy", "fusion,short-axis,node-combined", "--modality", "both", "--small",
            "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--node-epochs", "2",
            "--bootstrap", "20", "--permutations", "50", "--reference", "truth",
            "--atlases", str(tiny_cohort.parent / "atlases"), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["methods"] == ["ts1", "nodes-mil", "fusion", "short-axis", "node-combined", "ts1-ct", "nodes-mil-ct",
                              "fusion-ct"]
    # N+ against N0 AUC for every method, node-level AUC against the phantom's node truth
    for m in res["methods"]:
        assert "stage.n_auc" in res["summary"][m]
    assert set(res["node_level"]) == set(res["methods"])
    for d in res["node_level"].values():
        assert d["malignant_nodes"] + d["benign_nodes"] > 0
    report = (out / "report.md").read_text()
    assert "N+ AUC" in report and "## Node level" in report and "| fusion-ct |" in report
    # probability methods are calibrated (ECE reported), the node rules are scores
    assert {"nodes-mil", "fusion", "nodes-mil-ct", "fusion-ct", "ts1-ct"} <= set(res["calibration"])
    assert "short-axis" not in res["calibration"]
    ct_model = json.loads((out / "folds" / "fold0" / "ts1-ct" / "best.json").read_text())
    assert ct_model["manifest"]["model_config"]["in_channels"] == 1
    node_ct = json.loads((out / "folds" / "fold0" / "nodes-mil-ct" / "best.json").read_text())
    assert node_ct["manifest"]["model_config"]["modality"] == "ct"
    fusion = json.loads((out / "folds" / "fold0" / "fusion" / "predictions.json").read_text())
    assert fusion["params"]["fusion"]["features"] == ["station_cnn_logit", "node_logit", "has_node", "log_short_axis",
                                                      "log_node_suvmax"]
    assert len(fusion["params"]["fusion"]["weights"]) == 5
    assert len(fusion["node_score"]) == len(fusion["scan_ids"])
    # the operating threshold is tuned for the N-stage, the station one for the balanced accuracy (reported beside)
    assert 0.0 <= fusion["params"]["threshold"] <= 1.0 and 0.0 <= fusion["params"]["station_threshold"] <= 1.0
    points = res["station_operating_points"]
    assert set(points) == set(res["methods"]) and points["short-axis"]["thresholds"] == [10.0, 10.0]
    assert "## Station decisions at the station-tuned threshold" in report


def test_train_node_classifier_command(tiny_cohort, tmp_path, capsys):
    from LymphNodeStagingLib.nodes.malignancy import load_node_classifier
    from LymphNodeStagingLib.preflight.parameters import check_node_classifier

    out = tmp_path / "node-clf"
    args = ["train-node-classifier", str(tiny_cohort), "--out", str(out), "--modality", "ct", "--epochs", "2",
            "--val-fraction", "0.25", "--atlases", str(tiny_cohort.parent / "atlases"), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"] == str(out / "best.pt") and res["epochs_run"] == 2
    clf = load_node_classifier(out / "best.pt")
    assert clf.config.modality == "ct" and clf.manifest["data"]["train_patients"] >= 5
    assert list(out.glob("nodes/*.npz"))  # the detected nodes are cached for a second run
    # a CT-only classifier serves a case without PET; a PET/CT one is refused for it, naming the parameter
    assert check_node_classifier(out / "best.pt", has_pet=False).config.modality == "ct"
    from node_fixtures import tiny_node_classifier

    petct = tiny_node_classifier(tmp_path / "petct.pt", "petct")
    with pytest.raises(UsageError, match="--node-classifier .*reads the PET"):
        check_node_classifier(petct, has_pet=False)
    # usage errors: exit code 2, no traceback
    assert main(["train-node-classifier", str(tiny_cohort), "--out", str(tmp_path / "x"), "--modality", "pet"]) == 2
    assert main(["train-node-classifier", str(tiny_cohort), "--out", str(tmp_path / "y"),
                 "--node-model", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
