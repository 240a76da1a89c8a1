"""Calibration: fitted on validation scores, it brings the expected calibration error down on new scores."""

from __future__ import annotations

import numpy as np
import pytest

from LymphNodeStagingLib.classifier.calibration import (
    Calibration,
    brier_score,
    calibration_of,
    expected_calibration_error,
    fit_calibration,
    reliability_curve,
)
from LymphNodeStagingLib.errors import ModelError, UsageError


def overconfident(n: int, seed: int, power: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn with a true probability q; scores pushed towards 0 and 1 (logit x power), as a network does."""
    rng = np.random.default_rng(seed)
    q = rng.beta(0.6, 1.4, n)
    y = (rng.random(n) < q).astype(int)
    z = np.log(q) - np.log1p(-q)
    return 1 / (1 + np.exp(-power * z)), y


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibration_round_trip_lowers_ece_on_new_scores(method):
    fit_s, fit_y = overconfident(3000, 1)
    test_s, test_y = overconfident(3000, 2)
    cal = fit_calibration(fit_s, fit_y, method)
    before, after = expected_calibration_error(test_s, test_y), expected_calibration_error(cal.apply(test_s), test_y)
    assert before > 0.08 and after < 0.03, (method, before, after)
    assert brier_score(cal.apply(test_s), test_y) < brier_score(test_s, test_y)
    # the ranking is kept (AUC unchanged up to ties of the isotonic steps)
    a, b = np.argsort(test_s), cal.apply(test_s)
    assert np.all(np.diff(b[a]) >= -1e-12)
    back = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(back.apply(test_s), cal.apply(test_s))


def test_auto_method_follows_the_number_of_labels_and_unknowns_are_left_out():
    s, y = overconfident(200, 3)
    assert fit_calibration(s[:40], y[:40]).method == "temperature"
    assert fit_calibration(s, y).method == "platt"
    big_s, big_y = overconfident(2000, 4)
    assert fit_calibration(big_s, big_y).method == "isotonic"
    y2 = y.copy()
    y2[:100] = -1
    assert fit_calibration(s, y2).n == 100
    assert fit_calibration(s[y == 1], y[y == 1]).method == "identity"
    with pytest.raises(UsageError, match="both classes"):
        fit_calibration(s[y == 1], y[y == 1], "platt")


def test_absent_stations_stay_absent_and_ece_by_hand():
    cal = fit_calibration(*overconfident(500, 5), "temperature")
    out = cal.apply([0.2, np.nan, 0.9])
    assert np.isnan(out[1]) and 0 < out[0] < 1
    # four bins of one station each (width 0.1): |0.1 - 0|, |0.2 - 1|, |0.8 - 1|, |0.9 - 1|, each weighted 1/4
    p, y = [0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1]
    assert expected_calibration_error(p, y) == pytest.approx((0.1 + 0.8 + 0.2 + 0.1) / 4)
    c = reliability_curve(p, y)
    assert c["count"].sum() == 4 and c["observed"][8] == 1.0


def test_a_model_claiming_calibration_without_one_is_refused():
    assert calibration_of({}).method == "identity"
    with pytest.raises(ModelError, match="says the model is calibrated"):
        calibration_of({"calibrated": True}, "model.pt")
    with pytest.raises(ModelError, match="lacks t"):
        calibration_of({"calibration": {"method": "temperature", "params": {}}}, "model.pt")
    with pytest.raises(ModelError, match="non-decreasing"):
        calibration_of({"calibration": {"method": "isotonic", "params": {"x": [0, 1], "y": [0.9, 0.1]}}})
