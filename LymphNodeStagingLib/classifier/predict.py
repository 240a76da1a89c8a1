"""Station probabilities of one case: the centroid patch of every present station (and optional test-time patches
drawn from its weight map) cut from the CT and PET, through the station classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from torch import nn

from ..errors import UsageError
from ..staging.stations import NUM_STATIONS
from .calibration import Calibration
from .model import predict_stations, station_classifier_of
from .patches import StationSampler, extract_patches


@dataclass
class StationPrediction:
    """Per-station malignancy of one case. Arrays are in catalogue order (17,); absent stations hold NaN."""

    probabilities: np.ndarray  # mean over the patches of the station
    present: np.ndarray  # bool: station found in the station map
    centres_mm: np.ndarray  # (17, 3) centroid used for the deterministic patch (NaN when absent)
    threshold: float
    tta: int  # number of extra weighted centres per station (0: centroid only)
    tta_std: np.ndarray  # spread of the TTA probabilities (0 without TTA)

    @property
    def positive(self) -> np.ndarray:
        """bool (17,): present and probability >= threshold."""
        return self.present & (np.nan_to_num(self.probabilities, nan=0.0) >= self.threshold)


def predict_case(model: nn.Module, ct: sitk.Image, pet: sitk.Image | None, sampler: StationSampler, *,
                 threshold: float = 0.5, tta: int = 0, seed: int = 0, spacing: float | None = None,
                 batch_size: int = 17, calibration: Calibration | None = None,
                 features: np.ndarray | None = None) -> StationPrediction:
    """Probabilities of the present stations of one case from their centroid patches (deterministic); a
    multiple-instance model sees the deterministic bag of ``StationSampler.bag`` per station, a hybrid one also
    ``features`` (17, 3): SUVmax, SUVpeak and volume of each station (``suv.statistics.station_feature_array``).

    ``spacing`` (mm) defaults to the model's patch spacing. With ``tta`` > 0, ``tta`` further centres per station are
    drawn from the station's weight map (seeded; for a multiple-instance model ``tta`` further bags) and the
    probabilities are averaged. ``calibration``
    (the checkpoint's, see :func:`~LymphNodeStagingLib.classifier.calibration.calibration_of`) maps the averaged
    probabilities to calibrated ones; ``threshold`` is on that scale. A CT-only model ignores ``pet``; a PET/CT
    model needs it.
    """
    clf = station_classifier_of(model)
    if not clf.config.uses_pet:
        pet = None
    elif pet is None:
        raise UsageError("this station classifier reads CT and PET; without a PET use a CT-only model "
                         "(trained with --modality ct)")
    present = sampler.present
    idx = np.flatnonzero(present)
    centres = sampler.centroids()
    probs = np.full(NUM_STATIONS, np.nan)
    spread = np.zeros(NUM_STATIONS)
    size = clf.config.patch_size
    spacing = clf.config.patch_spacing if spacing is None else float(spacing)
    k = clf.config.instances
    feats = None if features is None else np.asarray(features, dtype=np.float32)[idx]

    def bags(points: np.ndarray) -> np.ndarray:
        patches = extract_patches(ct, pet, points, size, spacing)
        return patches if k == 1 else patches.reshape(len(idx), k, *patches.shape[1:])

    if idx.size:
        p0 = predict_stations(clf, bags(np.concatenate([sampler.bag(i, k) for i in idx])), idx, batch_size, feats)
        probs[idx] = p0
        if tta > 0:
            rng = np.random.default_rng(seed)
            draws = [np.concatenate([sampler.bag(i, k, rng) for i in idx]) for _ in range(tta)]
            extra = np.stack([predict_stations(clf, bags(d), idx, batch_size, feats) for d in draws], axis=1)
            allp = np.concatenate([p0[:, None], extra], axis=1)
            probs[idx] = allp.mean(axis=1)
            spread[idx] = allp.std(axis=1)
    if calibration is not None:
        probs = calibration.apply(probs)
    return StationPrediction(probs, present, centres, float(threshold), int(tta), spread)
