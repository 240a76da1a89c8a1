"""Cohort runs through all four steps (suv, anatomy, stations, assess) on small phantoms with a tiny classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("LymphNodeStagingLib.assessment.assess")

from LymphNodeStagingLib.batch.run import run_batch

FAST_REGISTRATION = {"iterations": [6, 4], "affine_iterations": 10}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier
    from LymphNodeStagingLib.phantom import generate_atlas_set, generate_cohort

    root = tmp_path_factory.mktemp("assess")
    cohort = generate_cohort(root / "cohort", 2, seed=31, size="small")
    atlases = generate_atlas_set(root / "atlases", atlases=2, seed=77, size="small")
    torch.manual_seed(0)
    cfg = ModelConfig.small(16)
    model = save_checkpoint(root / "model.pt", StationClassifier(cfg),
                            {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    return cohort, Path(atlases), model


@pytest.mark.slow
def test_all_steps_then_rule_change_recomputes_assess_only(inputs, tmp_path):
    cohort, atlases, model = inputs
    out = tmp_path / "out"
    s = run_batch(cohort, out, workers=0, model=model, atlases=atlases, threads_per_worker=2,
                  registration=FAST_REGISTRATION)
    assert s.counts == {"ok": 2, "failed": 0, "pending": 0}, s.failed
    for row in s.rows:
        assert row["n_stage"] in ("N0", "N1", "N2", "N3")
        assert any(row[k] != "" for k in row if k.startswith("p_"))
        case = out / row["case_dir"]
        for name in ("result.json", "result.csv", "overview.png"):
            assert (case / "assess" / name).is_file()
    s2 = run_batch(cohort, out, workers=0, model=model, atlases=atlases, threads_per_worker=2,
                   registration=FAST_REGISTRATION, rules="engelson2026")
    assert s2.this_run["computed"] == 2
    for row in s2.rows:
        m = json.loads((out / row["case_dir"] / "case.json").read_text())
        assert {k: v["cached"] for k, v in m["steps"].items()} == {
            "suv": True, "anatomy": True, "stations": True, "assess": False}
        result = json.loads((out / row["case_dir"] / "assess" / "result.json").read_text())
        assert result["rules"] == "engelson2026"
