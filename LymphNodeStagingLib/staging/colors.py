"""The colour map of malignancy probabilities (green 0 -> yellow 0.5 -> red 1), shared by every display and export,
and the colour of each station's lymph nodes.

Slicer segments, the colour legend, DICOM SEG segment colours and pictures all take their colours from here, so a
station has the same colour everywhere.
"""

from __future__ import annotations

import colorsys

import numpy as np

from .stations import STATION_NAMES

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


#: Colour of a lymph node outside every station (or of a result without a station map).
NO_STATION_COLOR: tuple[float, float, float] = (0.75, 0.75, 0.75)


def station_color(name: str | None) -> tuple[float, float, float]:
    """RGB (0..1) of the lymph nodes of a station: a bright colour per station, readable on a grey CT (17 hues
    around the colour wheel, neighbouring stations 7 steps apart); light grey for None or an unknown name."""
    if name is None or name not in STATION_NAMES:
        return NO_STATION_COLOR
    k = len(STATION_NAMES)
    hue = (STATION_NAMES.index(name) * 7 % k) / k
    return tuple(float(c) for c in colorsys.hsv_to_rgb(hue, 0.7, 1.0))
