"""Calibrate a trained model on a cohort it was not trained on: the station probabilities of the cohort's scans are
fitted with a calibration (classifier/calibration.py), the operating threshold is tuned again on the calibrated
probabilities, and a new checkpoint is written with both. A hospital can so recalibrate a model on its own
validation patients; the bundled demo model was calibrated this way on a held-out phantom cohort."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..classifier.calibration import Calibration, brier_score, expected_calibration_error, fit_calibration
from ..cohort.table import read_cohort
from ..errors import UsageError
from ..runtime import Device, ProgressCallback, parse_device
from .cases import case_samples


@dataclass
class CalibrationResult:
    checkpoint: Path
    calibration: Calibration
    threshold: float
    threshold_before: float
    stations: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    scans: int

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "calibration": self.calibration.to_dict(),
                "threshold": self.threshold, "threshold_before": self.threshold_before, "stations": self.stations,
                "scans": self.scans, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "brier_before": self.brier_before, "brier_after": self.brier_after}


def calibrate_model(model: str | Path, cohort_csv: str | Path, out: str | Path, *, method: str = "auto",
                    threshold_for: str = "stage", atlases=None, pet_is_suv: bool | str | None = None,
                    device: str | Device = "cpu", cache_dir: str | Path | None = None,
                    progress: ProgressCallback | None = None) -> CalibrationResult:
    """Fit the calibration of ``model`` on every usable scan of ``cohort_csv`` and write the calibrated checkpoint
    to ``out`` (a .pt file). ``threshold_for``: "stage" (TS1: N-stage accuracy through the rules) or "station"
    (station balanced accuracy)."""
    from ..classifier.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from ..classifier.model import station_classifier_of
    from ..io.files import check_output
    from ..mapping.atlas import resolve_atlas_set
    from ..preflight.parameters import check_model
    from .loops import TrainConfig, _evaluate, _operating_threshold, _station_and_stage_metrics

    dev = parse_device(device)
    if threshold_for not in ("stage", "station"):
        raise UsageError(f"threshold_for {threshold_for!r}: expected stage or station")
    out = Path(out)
    if out.suffix != ".pt":
        raise UsageError(f"--out {out}: expected a checkpoint file name ending in .pt")
    check_output(out, folder=False, parameter="--out")
    check_model(model, parameter="--model")
    ckpt = load_checkpoint(model)
    manifest = ckpt.manifest
    net = model_from_checkpoint(ckpt).to(dev.torch)
    rows = read_cohort(cohort_csv).require_valid().usable_rows()
    if not rows:
        raise UsageError(f"cohort {cohort_csv}: no usable rows to calibrate on")
    cases = case_samples(rows, resolve_atlas_set(atlases), cache_dir, device=dev.torch, pet_is_suv=pet_is_suv,
                         progress=progress)
    clf = station_classifier_of(net)
    if not clf.config.uses_pet:  # a CT-only model sees the cases as it was trained: without PET
        cases = [c.without_pet() for c in cases]
    strategy = str(manifest.get("strategy") or ("ts1" if manifest.get("kind") == "station" else "ts2"))
    rules = str(manifest.get("rules") or manifest.get("model_config", {}).get("rules") or "ajcc8")
    metrics = _evaluate(strategy, net, cases, clf.config.patch_size, clf.config.patch_spacing, rules,
                        next(net.parameters()).device)
    probs = metrics["_probs"]
    labels = np.stack([c.station_labels for c in cases])
    cal = fit_calibration(probs, labels, method)
    calibrated = cal.apply(probs)
    after = _station_and_stage_metrics(cases, calibrated, rules, 0.5)
    threshold = _operating_threshold(strategy, TrainConfig(threshold_for=threshold_for), after)
    man = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "weights_sha256", "bundled")}
    cohort_bytes = Path(cohort_csv).read_bytes()
    man.update(calibration=cal.to_dict(), calibrated=True, threshold=threshold,
               threshold_uncalibrated=manifest.get("threshold"),
               calibration_data={"cohort": str(cohort_csv), "cohort_sha256": hashlib.sha256(cohort_bytes).hexdigest(),
                                 "scans": len(cases), "stations": cal.n, "threshold_for": threshold_for})
    save_checkpoint(out, net.cpu(), man)
    return CalibrationResult(out, cal, threshold, float(manifest.get("threshold", 0.5)), cal.n,
                             expected_calibration_error(probs, labels), expected_calibration_error(calibrated, labels),
                             brier_score(probs, labels), brier_score(calibrated, labels), len(cases))
