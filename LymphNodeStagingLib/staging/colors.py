"""The colour map of malignancy probabilities (green 0 -> yellow 0.5 -> red 1), shared by every display and export.

Slicer segments, the colour legend, DICOM SEG segment colours and pictures all take their colours from here, so a
station has the same colour everywhere.
"""

from __future__ import annotations

import numpy as np

#: (probability, r, g, b) control points, RGB in 0..1, linear interpolation between them.
COLOR_POINTS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.10, 0.70, 0.20),
    (0.5, 1.00, 0.85, 0.10),
    (1.0, 0.85, 0.05, 0.05),
)
#: Colour of a station that is not in the station map (no probability).
ABSENT_COLOR: tuple[float, float, float] = (0.55, 0.55, 0.55)


def probability_color(p: float | None) -> tuple[float, float, float]:
    """RGB (0..1) of a probability; grey for None (absent station). Values outside 0..1 are clipped."""
    if p is None:
        return ABSENT_COLOR
    p = float(np.clip(p, 0.0, 1.0))
    xs = [c[0] for c in COLOR_POINTS]
    return tuple(float(np.interp(p, xs, [c[k] for c in COLOR_POINTS])) for k in (1, 2, 3))
