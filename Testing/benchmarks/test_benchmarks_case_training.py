"""Smoke runs of `lnstaging bench case` and `lnstaging bench training` (figures are for the note, not asserted)."""

from __future__ import annotations

import json

import pytest

from LymphNodeStagingLib.cli.main import main


def test_bench_training_small(capsys):
    code = main(["bench", "training", "--small", "--steps", "1", "--batch-size", "4", "--threads", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["benchmark"] == "training" and data["network"] == "small-32"
    assert data["patches_per_second"] > 0 and data["peak_memory_mb"] > 0


@pytest.mark.slow
def test_bench_case_small(tmp_path, capsys):
    from LymphNodeStagingLib.phantom import generate_atlas_set

    atlases = generate_atlas_set(tmp_path / "atlases", atlases=2, seed=5, size="small")
    code = main(["bench", "case", "--size", "small", "--atlases", str(atlases), "--repeat", "1", "--threads", "1",
                 "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["case"]["atlases"] == 2 and data["case"]["weights"] == "bundled"
    run = data["best_run"]
    assert run["total_s"] > 0 and {"mapping", "classification", "suv_stats"} <= set(run)
    assert data["n_stage"] in ("N0", "N1", "N2", "N3")
