"""Confusion-matrix PNGs of an evaluation."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from LymphNodeStagingLib.errors import LNSError
from LymphNodeStagingLib.evaluation.metrics import ScanPrediction, evaluate_method
from LymphNodeStagingLib.evaluation.plots import confusion_matrix_png, write_evaluation_pngs


def test_confusion_matrix_png(tmp_path):
    path = confusion_matrix_png([[3, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 1, 0, 0]], tmp_path / "cm.png",
                                title="N-stage")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not blank
    assert not list(tmp_path.glob(".*part*"))  # written atomically, no leftovers
    with pytest.raises(LNSError, match="square"):
        confusion_matrix_png([[1, 2]], tmp_path / "bad.png")


def test_write_evaluation_pngs(tmp_path):
    rng = np.random.default_rng(0)
    scans = []
    for i in range(12):
        truth = (rng.random(17) < 0.2).astype(int)
        scans.append(ScanPrediction(f"P{i}", "s", truth, np.clip(0.6 * truth + rng.normal(0.2, 0.2, 17), 0, 1),
                                    i % 4, (i + i // 6) % 4, fold=i % 2))
    written = write_evaluation_pngs(evaluate_method("TS 1/x", scans, n_boot=0), tmp_path)
    assert set(written) == {"scan.nstage", "scan.station", "patient.nstage", "patient.station"}
    assert written["patient.nstage"].name == "TS_1_x_patient_nstage_confusion.png"
    assert all(p.exists() and p.stat().st_size > 1000 for p in written.values())
