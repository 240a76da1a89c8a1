"""The evaluation-statistics benchmark runs through the command line and prints one JSON object."""

from __future__ import annotations

import json

from LymphNodeStagingLib.cli.main import main


def test_bench_evaluation_stats(capsys):
    rc = main(["bench", "evaluation_stats", "--patients", "30", "--folds", "3", "--boot", "20",
               "--permutations", "50", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["patients"] == 30 and out["folds"] == 3
    assert set(out["wall_s"]) == {"split_s", "evaluate_one_method_s", "compare_two_methods_s"}
    assert out["peak_memory_mb"] > 0
    assert 0 < out["example"]["permutation_p"] <= 1
