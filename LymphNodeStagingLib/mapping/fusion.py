"""Label fusion of atlas station maps warped onto the patient: vote fractions, majority vote, agreement, fallback.

Majority vote with background taking part: a voxel takes the label (background or station) with the most atlas
votes. Tie rule: among the tied labels, the one voted for by the best-ranked atlas wins (atlas rank = registration
quality, best first; without a ranking, the atlas order). This is exact: the vote is encoded as
count * 2^N + sum of 2^(N - 1 - rank) over the atlases voting for the label, and the largest code wins.

A station that vanishes after the vote although some atlas maps it gets a fallback, and is flagged:
``fallback_union`` (the voxels any atlas assigns to it, where the fused map is background) or, when all of those belong
to other stations, ``fallback_best_atlas`` (the best-ranked atlas's mask, except voxels whose loss would make another station
vanish). ``unresolved``: no voxel can be given without removing another station. ``absent``: no atlas maps it onto
this patient crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..staging.stations import NUM_STATIONS, STATION_NAMES

OK, FALLBACK_UNION, FALLBACK_BEST, ABSENT = "ok", "fallback_union", "fallback_best_atlas", "absent"
UNRESOLVED = "unresolved"


@dataclass
class FusionResult:
    """Fused station labels and the per-station soft votes, agreement and flags (keys: station names)."""

    labels: np.ndarray  # (z, y, x) uint8, 0 = none, 1..17 = catalogue label
    votes: np.ndarray  # (17, z, y, x) uint8 vote counts; fraction = votes / n_atlases
    n_atlases: int
    agreement: dict[str, float]  # mean pairwise Dice of the warped masks (nan: fewer than 2 atlases map it)
    flags: dict[str, str]
    voxels: dict[str, int]  # fused voxel count per station

    def vote_fraction(self, label: int | None = None) -> np.ndarray:
        """Vote fraction in [0, 1] of one station (label 1..17), or all (17, z, y, x)."""
        v = self.votes if label is None else self.votes[label - 1]
        return v.astype(np.float32) / self.n_atlases


def fuse(warped: np.ndarray, ranking: Sequence[int] | None = None) -> FusionResult:
    """Fuse N warped station label maps (N, z, y, x) (values 0..17).

    ranking: atlas indices, best first (default 0..N-1); decides ties and the best-atlas fallback.
    """
    warped = np.asarray(warped)
    if warped.ndim < 2 or warped.shape[0] < 1:
        raise InputError(f"warped label maps of shape {warped.shape}: expected (atlases, ...) with at least one atlas")
    n = warped.shape[0]
    if n > 40:
        raise InputError(f"{n} atlases: at most 40 can be fused")
    if warped.dtype.kind == "f":
        warped = np.rint(warped)
    lo, hi = int(warped.min()), int(warped.max())
    if lo < 0 or hi > NUM_STATIONS:
        raise InputError(f"warped label values {lo}..{hi}: expected 0..{NUM_STATIONS} (catalogue labels)")
    warped = warped.astype(np.uint8)
    ranking = list(range(n)) if ranking is None else [int(r) for r in ranking]
    if sorted(ranking) != list(range(n)):
        raise InputError(f"ranking {ranking}: expected a permutation of the atlas indices 0..{n - 1}")
    bit = np.zeros(n, np.int64)
    for r, atlas in enumerate(ranking):
        bit[atlas] = 1 << (n - 1 - r)

    shape = warped.shape[1:]
    votes = np.zeros((NUM_STATIONS, *shape), np.uint8)
    labels = np.zeros(shape, np.uint8)
    # only voxels that some atlas assigns to a station can hold a station or a vote: fuse those alone
    support = np.flatnonzero(warped.reshape(n, -1).any(0))
    sub = warped.reshape(n, -1)[:, support]
    best_code = np.full(support.size, -1, np.int64)
    sub_labels = np.zeros(support.size, np.uint8)
    sub_votes = np.zeros((NUM_STATIONS, support.size), np.uint8)
    for lab in range(NUM_STATIONS + 1):
        hit = sub == lab
        count = hit.sum(0, dtype=np.int64)
        if lab > 0:
            sub_votes[lab - 1] = count
        if not count.any():
            continue
        code = (count << n) + bit @ hit
        win = code > best_code
        best_code[win] = code[win]
        sub_labels[win] = lab
    labels.reshape(-1)[support] = sub_labels
    votes.reshape(NUM_STATIONS, -1)[:, support] = sub_votes

    flags: dict[str, str] = {}
    agreement: dict[str, float] = {}
    for lab in range(1, NUM_STATIONS + 1):
        name = STATION_NAMES[lab - 1]
        support = np.flatnonzero(votes[lab - 1].ravel())
        agreement[name] = _mean_pairwise_dice(warped.reshape(n, -1)[:, support] == lab)
        if support.size == 0:
            flags[name] = ABSENT
            continue
        if (labels == lab).any():
            flags[name] = OK
            continue
        flat = labels.reshape(-1)
        free = support[flat[support] == 0]
        if free.size:
            flat[free] = lab
            flags[name] = FALLBACK_UNION
        else:
            best = next(a for a in ranking if (warped[a] == lab).any())
            take = warped[best] == lab
            for other in np.unique(labels[take]):  # never make another station vanish
                if not (labels[~take] == other).any():
                    take &= labels != other
            if take.any():
                labels[take] = lab
                flags[name] = FALLBACK_BEST
            else:
                flags[name] = UNRESOLVED
    counts = np.bincount(labels.ravel(), minlength=NUM_STATIONS + 1)
    voxels = {STATION_NAMES[i - 1]: int(counts[i]) for i in range(1, NUM_STATIONS + 1)}
    return FusionResult(labels, votes, n, agreement, flags, voxels)


def _mean_pairwise_dice(masks: np.ndarray) -> float:
    """Mean Dice over atlas pairs of (N, K) boolean masks; pairs where neither has the station are left out."""
    n = masks.shape[0]
    sizes = masks.sum(1)
    values = []
    for i in range(n):
        for j in range(i + 1, n):
            s = sizes[i] + sizes[j]
            if s:
                values.append(2.0 * np.count_nonzero(masks[i] & masks[j]) / s)
    return float(np.mean(values)) if values else float("nan")
