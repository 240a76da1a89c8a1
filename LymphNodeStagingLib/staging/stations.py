"""The catalogue of the 17 mediastinal lymph node stations and station-name parsing.

Stations follow the IASLC lymph node map as used by the Lynch et al. station atlas: label value 1..17 in the
order 1L 1R 2L 2R 3A 3P 4L 4R 5 6 7 8 9 10L 10R 11L 11R. The atlas splits some stations into sub-stations
(3AL/3AR, 3PL/3PR, 7L/7R, 8L/8R, 9L/9R, 11Rs/11Ri); they are merged into their station here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Station:
    """One lymph node station of the catalogue."""

    name: str  # "4R"
    label: int  # atlas label value, 1..17
    side: str  # "R", "L" or "M" (midline: not lateralised by name)
    iaslc_name: str
    definition: str  # one-line anatomical definition
    color: tuple[int, int, int]  # default display colour, RGB 0..255

    @property
    def index(self) -> int:
        """Position in the catalogue (0..16) = label - 1; the classifier's station index."""
        return self.label - 1

    @property
    def number(self) -> str:
        """The station number without side ("4" for 4R, "3A" for 3A)."""
        return self.name[:-1] if self.side in ("R", "L") else self.name


_CATALOGUE: tuple[Station, ...] = (
    Station("1L", 1, "L", "Low cervical, supraclavicular and sternal notch (left)",
            "Left of the tracheal midline, from the lower margin of the cricoid to the clavicles and the upper border of the manubrium.",
            (141, 211, 199)),
    Station("1R", 2, "R", "Low cervical, supraclavicular and sternal notch (right)",
            "Right of the tracheal midline, from the lower margin of the cricoid to the clavicles and the upper border of the manubrium.",
            (64, 160, 150)),
    Station("2L", 3, "L", "Upper paratracheal (left)",
            "Left of the left tracheal border, from the upper border of the manubrium to the superior border of the aortic arch.",
            (190, 186, 218)),
    Station("2R", 4, "R", "Upper paratracheal (right)",
            "Up to the left tracheal border, from the upper border of the manubrium to where the caudal margin of the left brachiocephalic vein crosses the trachea.",
            (128, 110, 190)),
    Station("3A", 5, "M", "Prevascular",
            "Anterior to the superior vena cava and the great vessels, behind the sternum, from the apex of the chest to the level of the carina.",
            (251, 128, 114)),
    Station("3P", 6, "M", "Retrotracheal",
            "Posterior to the trachea, from the apex of the chest to the level of the carina.",
            (200, 80, 70)),
    Station("4L", 7, "L", "Lower paratracheal (left)",
            "Left of the left tracheal border, medial to the ligamentum arteriosum, from the upper margin of the aortic arch to the upper rim of the left main pulmonary artery.",
            (128, 177, 211)),
    Station("4R", 8, "R", "Lower paratracheal (right)",
            "Right of the left tracheal border, from the caudal margin of the left brachiocephalic vein to the lower border of the azygos arch.",
            (50, 110, 170)),
    Station("5", 9, "M", "Subaortic (aortopulmonary window)",
            "Lateral to the ligamentum arteriosum, between the lower border of the aortic arch and the upper rim of the left main pulmonary artery.",
            (253, 180, 98)),
    Station("6", 10, "M", "Para-aortic (ascending aorta or phrenic)",
            "Anterior and lateral to the ascending aorta and the aortic arch, between the upper and lower borders of the arch.",
            (179, 222, 105)),
    Station("7", 11, "M", "Subcarinal",
            "Below the carina between the main bronchi, down to the lower lobe bronchus on the left and the lower border of the bronchus intermedius on the right.",
            (252, 205, 229)),
    Station("8", 12, "M", "Paraesophageal (below carina)",
            "Adjacent to the wall of the esophagus, right or left of the midline, below the subcarinal nodes down to the diaphragm.",
            (217, 217, 217)),
    Station("9", 13, "M", "Pulmonary ligament",
            "Within the inferior pulmonary ligament, from the inferior pulmonary vein to the diaphragm.",
            (188, 128, 189)),
    Station("10L", 14, "L", "Hilar (left)",
            "Adjacent to the left main bronchus and hilar vessels, from the upper rim of the pulmonary artery to the interlobar region.",
            (204, 235, 197)),
    Station("10R", 15, "R", "Hilar (right)",
            "Adjacent to the right main bronchus and hilar vessels, from the lower rim of the azygos vein to the interlobar region.",
            (120, 190, 110)),
    Station("11L", 16, "L", "Interlobar (left)",
            "Between the origins of the left lobar bronchi.",
            (255, 237, 111)),
    Station("11R", 17, "R", "Interlobar (right)",
            "Between the origins of the right lobar bronchi (11Rs: upper lobe bronchus / bronchus intermedius; 11Ri: middle / lower lobe bronchi).",
            (210, 180, 40)),
)

#: The 17 stations in label order.
STATIONS: tuple[Station, ...] = _CATALOGUE
#: Station names in label order ("1L" ... "11R").
STATION_NAMES: tuple[str, ...] = tuple(s.name for s in STATIONS)
NUM_STATIONS = len(STATIONS)

_BY_NAME = {s.name: s for s in STATIONS}
_BY_LABEL = {s.label: s for s in STATIONS}

#: Sub-stations of the atlas that are merged into one station of the catalogue.
SUBSTATIONS: dict[str, str] = {
    "3AL": "3A", "3AR": "3A",
    "3PL": "3P", "3PR": "3P",
    "7L": "7", "7R": "7",
    "8L": "8", "8R": "8",
    "9L": "9", "9R": "9",
    "11RS": "11R", "11RI": "11R",
}

_PREFIX = re.compile(r"^(?:LYMPH\s*NODE\s*STATION|STATION|STAT\.?|LNS|LN|#)\s*", re.IGNORECASE)


def _normalise(name: str) -> str:
    text = str(name).strip()
    text = _PREFIX.sub("", text)
    return re.sub(r"[\s_\-]+", "", text).upper()


def parse_station(name: str | Station) -> Station:
    """Return the catalogue station for a name such as "4R", "4r", "Station 4R", "3AL" or "11Rs".

    Raises UsageError listing the valid names for anything else.
    """
    if isinstance(name, Station):
        return name
    key = _normalise(name)
    key = SUBSTATIONS.get(key, key)
    station = _BY_NAME.get(key)
    if station is None:
        valid = ", ".join(STATION_NAMES)
        subs = ", ".join(f"{k}->{v}" for k, v in SUBSTATIONS.items())
        raise UsageError(
            f"unknown lymph node station {name!r}; expected one of {valid} (sub-stations accepted: {subs})"
        )
    return station


def parse_stations(names: Iterable[str | Station]) -> list[Station]:
    """Parse several names; duplicates (e.g. "7L" and "7R") collapse; the result is in label order."""
    found = {parse_station(n).label: parse_station(n) for n in names}
    return [found[k] for k in sorted(found)]


def parse_station_list(text: str) -> list[Station]:
    """Parse a ";"- (or ","-) separated list such as "4R; 7;10R". Empty text gives an empty list."""
    parts = [p for p in re.split(r"[;,]", text or "") if p.strip()]
    return parse_stations(parts)


def contralateral(side: str) -> str:
    """'R' <-> 'L'."""
    return {"R": "L", "L": "R"}[side]


def mirror(station: Station) -> Station:
    """The same station on the other side (midline stations map to themselves)."""
    if station.side == "M":
        return station
    return _BY_NAME[station.number + contralateral(station.side)]
