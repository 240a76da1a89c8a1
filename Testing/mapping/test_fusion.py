"""Label fusion (majority with tie rule, agreement, fallback) and Eq. 1 weight maps and centre sampling."""

from __future__ import annotations

import numpy as np
import pytest

from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.mapping.fusion import ABSENT, FALLBACK_BEST, FALLBACK_UNION, OK, UNRESOLVED, fuse
from LymphNodeStagingLib.mapping.registration import Geometry
from LymphNodeStagingLib.mapping.weightmap import weight_map


def _maps(*rows):
    return np.array(rows, np.uint8)[:, None, None, :]  # (N, 1, 1, X)


def test_majority_vote_with_background():
    fused = fuse(_maps([1, 1, 0, 2], [1, 0, 0, 2], [0, 0, 3, 2]))
    # voxel 2: background wins 2:1, so station 3 (2L) vanishes and gets its one-atlas region back (flagged)
    assert fused.labels.ravel().tolist() == [1, 0, 3, 2]
    assert fused.flags["2L"] == FALLBACK_UNION and fused.flags["1L"] == OK
    assert fused.vote_fraction(1).ravel().tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert fused.votes.shape == (17, 1, 1, 4)


def test_tie_goes_to_best_ranked_atlas():
    warped = _maps([4], [5], [6], [0])
    assert fuse(warped).labels.ravel().tolist()[0] == 4  # four-way tie: atlas 0 is best by default
    assert fuse(warped, ranking=[2, 0, 1, 3]).labels.ravel()[0] == 6
    # two votes beat one whatever the ranking
    assert fuse(_maps([1], [2], [2]), ranking=[0, 1, 2]).labels.ravel()[0] == 2


def test_fallback_union_and_best_atlas_and_absent():
    # station 9 is in one atlas only: outvoted by background -> union fallback on background voxels
    fused = fuse(_maps([9, 9, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]))
    assert fused.flags["5"] == FALLBACK_UNION and fused.labels.ravel().tolist() == [9, 9, 0, 1]
    assert fused.flags["1L"] == OK and fused.flags["7"] == ABSENT
    # station 9 only where the others agree on station 1: best-atlas fallback
    fused = fuse(_maps([9, 1], [1, 1], [1, 1]), ranking=[1, 0, 2])
    assert fused.flags["5"] == FALLBACK_BEST and fused.labels.ravel().tolist() == [9, 1]
    # ... but never at the price of another station
    fused = fuse(_maps([9], [1], [1]))
    assert fused.flags["5"] == UNRESOLVED and fused.labels.ravel().tolist() == [1]


def test_agreement_is_mean_pairwise_dice():
    fused = fuse(_maps([1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]))
    # pairs: (0,1) 1.0, (0,2) 0.5, (1,2) 0.5
    assert fused.agreement["1L"] == pytest.approx(2 / 3)
    assert np.isnan(fused.agreement["11R"])


def test_fuse_rejects_bad_input():
    with pytest.raises(InputError, match="0..17"):
        fuse(_maps([18, 0]))
    with pytest.raises(InputError, match="permutation"):
        fuse(_maps([1], [1]), ranking=[0, 0])


def _geom(shape_xyz=(21, 21, 11), spacing=(1.0, 1.0, 2.0)):
    return Geometry(np.zeros(3), np.array(spacing, float), np.eye(3), shape_xyz)


def test_weight_map_eq1_float_distances_and_centroid():
    g = _geom()
    mask = np.zeros((11, 21, 21), bool)
    mask[3:8, 5:16, 5:16] = True  # centre voxel (10, 10, 5) -> world (10, 10, 10)
    wm = weight_map(mask, g, label=11)
    assert np.allclose(wm.centroid_mm, (10, 10, 10)) and np.allclose(wm.centre_mm, (10, 10, 10))
    dense = wm.dense()
    assert dense[5, 10, 10] == pytest.approx(1.0)  # the centroid itself has the maximum weight
    assert (dense[mask] > 0).all() and (dense[~mask] == 0).all()
    d = np.sqrt(5 ** 2 + 5 ** 2 + 4 ** 2)  # farthest voxel: corner, distance in mm with 2 mm slices
    assert dense[3, 5, 5] == pytest.approx(1 - d / (d + 1.0), rel=1e-5)
    assert wm.station == "7"


def test_weight_map_single_voxel_and_votes_and_empty():
    g = _geom()
    mask = np.zeros((11, 21, 21), bool)
    mask[2, 3, 4] = True
    wm = weight_map(mask, g, 1)
    assert wm.weights.tolist() == [1.0] and np.allclose(wm.centre_mm, (4, 3, 4))
    votes = np.full(mask.shape, 0.4, np.float32)
    assert weight_map(mask, g, 1, votes).weights[0] == pytest.approx(0.4)
    with pytest.raises(InputError, match="station 1L has no voxel"):
        weight_map(np.zeros_like(mask), g, 1)

