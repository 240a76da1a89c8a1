"""N-staging rule sets: data files that assign every station to N1, N2 or N3 for a tumour side.

A rule set is a versioned JSON file in ``resources/rules`` (or any path with the same layout). The N-stage is the
highest group that holds a positive station (N0 when none is positive); the TNM 9th edition splits N2 into N2a
(one N2 station) and N2b (several). Pseudo-labels per group for training from the N-stage alone follow the paper's
Table 3: N0 -> (G1, G2, G3) = (0, 0, 0); N1 -> (1, 0, 0); N2 -> (?, 1, 0); N3 -> (?, ?, 1).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..paths import rules_dir
from .stations import NUM_STATIONS, STATION_NAMES, STATIONS, Station, parse_stations

SIDES: tuple[str, ...] = ("R", "L")
DEFAULT_RULES = "ajcc8"
#: Group names; group k (1..3) is the station group whose positivity gives at least N-stage k.
GROUPS: tuple[str, ...] = ("N1", "N2", "N3")
N_STAGES: tuple[str, ...] = ("N0", "N1", "N2", "N3")
#: Value used for an unknown pseudo-label.
UNKNOWN = -1


def parse_side(side: str, parameter: str = "side") -> str:
    """Normalise a tumour side ("R", "l", "right", "Left") to "R" or "L"."""
    key = str(side).strip().upper()
    key = {"RIGHT": "R", "LEFT": "L", "RECHTS": "R", "LINKS": "L"}.get(key, key)
    if key not in SIDES:
        raise UsageError(f"{parameter} must be R or L (the side of the primary tumour), got {side!r}")
    return key


def parse_n_stage(value: str | int, parameter: str = "n_stage") -> int:
    """Parse an N-stage given as 0..3, "N0".."N3", "cN2" or "pN1" to an integer 0..3."""
    text = str(value).strip().upper()
    match = re.fullmatch(r"(?:[CP]?N)?([0-3])(?:[ABC]\d?)?", text)
    if not match:
        raise UsageError(f"{parameter} must be one of 0-3 or N0-N3, got {value!r}")
    return int(match.group(1))


def n_stage_label(n: int) -> str:
    return N_STAGES[int(n)]


def tnm9_label(n_stage: int, n2_station_count: int) -> str:
    """TNM 9th edition N category: N2 splits into N2a (single N2 station) and N2b (multiple N2 stations)."""
    if n_stage == 2:
        return "N2a" if n2_station_count <= 1 else "N2b"
    return n_stage_label(n_stage)


@dataclass
class StagingResult:
    """The N-stage of a set of positive stations under one rule set, with its explanation."""

    n_stage: int
    tnm9: str
    rules: str
    rules_version: str
    side: str
    positive_stations: list[str]
    deciding_stations: list[str]  # positive stations of the highest positive group
    groups: dict[str, str]  # positive station -> "N1" | "N2" | "N3"

    @property
    def n_label(self) -> str:
        return n_stage_label(self.n_stage)

    def explanation(self) -> str:
        if not self.positive_stations:
            return f"{self.n_label}: no positive station ({self.rules} rules, tumour side {self.side})"
        by_group = {g: [s for s, gg in self.groups.items() if gg == g] for g in GROUPS}
        parts = [f"{g}: {', '.join(v)}" for g, v in by_group.items() if v]
        return (
            f"{self.n_label} (TNM9 {self.tnm9}) decided by {', '.join(self.deciding_stations)}; "
            f"{'; '.join(parts)} ({self.rules} rules, tumour side {self.side})"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_stage"] = self.n_label
        d["n_stage_number"] = self.n_stage
        d["explanation"] = self.explanation()
        return d


@dataclass(frozen=True)
class RuleSet:
    """A rule set: for each tumour side, the group (1, 2 or 3) of each of the 17 stations."""

    name: str
    version: str
    title: str
    description: str
    reference: str
    source: str
    # side -> int array (17,) with the group number 1..3 of each station, in catalogue order
    group_of: dict[str, np.ndarray] = field(repr=False)

    def group(self, station: str | Station, side: str) -> int:
        """Group number (1..3) of a station for a tumour side."""
        st = parse_stations([station])[0]
        return int(self.group_of[parse_side(side)][st.index])

    def group_masks(self, side: str) -> np.ndarray:
        """Boolean array (3, 17): row k-1 marks the stations of group Nk for this tumour side."""
        g = self.group_of[parse_side(side)]
        return np.stack([g == k for k in (1, 2, 3)])

    def stage_array(self, positive: np.ndarray, side: str) -> np.ndarray:
        """Vectorised N-stage: ``positive`` is a boolean array (..., 17) in catalogue order; returns ints 0..3."""
        positive = np.asarray(positive, dtype=bool)
        if positive.shape[-1] != NUM_STATIONS:
            raise UsageError(f"positive must have {NUM_STATIONS} stations in its last axis, got {positive.shape}")
        g = self.group_of[parse_side(side)]
        return np.max(np.where(positive, g, 0), axis=-1)

    def stage_rows(self, positive: np.ndarray, sides: Sequence[str]) -> np.ndarray:
        """N-stage of many patients at once: ``positive`` (..., P, 17), ``sides`` the P tumour sides."""
        positive = np.asarray(positive, dtype=bool)
        right = np.array([parse_side(s) == "R" for s in sides], dtype=bool)
        return np.where(right, self.stage_array(positive, "R"), self.stage_array(positive, "L"))

    def n2_count_array(self, positive: np.ndarray, side: str) -> np.ndarray:
        """Number of positive N2-group stations, vectorised like stage_array."""
        g = self.group_of[parse_side(side)]
        return np.sum(np.asarray(positive, dtype=bool) & (g == 2), axis=-1)

    def stage(self, positive_stations: Iterable[str | Station], side: str) -> StagingResult:
        """Stage a set of positive stations (names are parsed, sub-stations merged) for a tumour side."""
        side = parse_side(side)
        stations = parse_stations(positive_stations)
        g = self.group_of[side]
        groups = {s.name: GROUPS[g[s.index] - 1] for s in stations}
        n = max((int(g[s.index]) for s in stations), default=0)
        deciding = [s.name for s in stations if g[s.index] == n] if n else []
        n2 = sum(1 for s in stations if g[s.index] == 2)
        return StagingResult(
            n_stage=n,
            tnm9=tnm9_label(n, n2),
            rules=self.name,
            rules_version=self.version,
            side=side,
            positive_stations=[s.name for s in stations],
            deciding_stations=deciding,
            groups=groups,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "description": self.description,
            "reference": self.reference,
            "groups_by_side": {
                side: {GROUPS[k - 1]: [STATION_NAMES[i] for i in np.flatnonzero(g == k)] for k in (1, 2, 3)}
                for side, g in self.group_of.items()
            },
        }


def available_rule_sets() -> list[str]:
    """Names of the bundled rule sets."""
    return sorted(p.name[:-5] for p in rules_dir().iterdir() if p.name.endswith(".json"))


def _parse_rule_file(data: dict, source: str) -> RuleSet:
    for key in ("name", "version", "groups_by_side"):
        if key not in data:
            raise UsageError(f"rule set {source}: missing key {key!r}")
    group_of: dict[str, np.ndarray] = {}
    for side in SIDES:
        table = data["groups_by_side"].get(side)
        if not isinstance(table, dict):
            raise UsageError(f"rule set {source}: groups_by_side.{side} missing (expected N1/N2/N3 station lists)")
        arr = np.zeros(NUM_STATIONS, dtype=np.int64)
        for k, gname in enumerate(GROUPS, start=1):
            try:
                members = parse_stations(table.get(gname, []))
            except Exception as exc:
                raise UsageError(f"rule set {source}: groups_by_side.{side}.{gname}: {exc}") from None
            for st in members:
                if arr[st.index]:
                    raise UsageError(
                        f"rule set {source}: station {st.name} is in more than one group for tumour side {side}"
                    )
                arr[st.index] = k
        missing = [s.name for s in STATIONS if not arr[s.index]]
        if missing:
            raise UsageError(f"rule set {source}: stations {', '.join(missing)} have no group for tumour side {side}")
        group_of[side] = arr
    return RuleSet(
        name=str(data["name"]),
        version=str(data["version"]),
        title=str(data.get("title", data["name"])),
        description=str(data.get("description", "")),
        reference=str(data.get("reference", "")),
        source=source,
        group_of=group_of,
    )


@functools.lru_cache(maxsize=32)
def load_rules(name_or_path: str = DEFAULT_RULES) -> RuleSet:
    """Load a bundled rule set by name ("ajcc8", "engelson2026") or a rule file by path."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    if name_or_path.endswith(".json") and path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        res = rules_dir().joinpath(f"{name_or_path}.json")
        if not res.is_file():
            raise UsageError(
                f"unknown rule set {name_or_path!r}; expected one of {', '.join(available_rule_sets())} "
                "or the path of a rule-set .json file"
            )
        text, source = res.read_text(encoding="utf-8"), name_or_path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"rule set {source}: not valid JSON ({exc})") from None
    return _parse_rule_file(data, source)


def stage(positive_stations: Iterable[str | Station], side: str, rules: str = DEFAULT_RULES) -> StagingResult:
    """N-stage of a set of positive stations for a tumour side under a rule set."""
    return load_rules(rules).stage(positive_stations, side)


def pseudo_labels(n_stage: int | str) -> np.ndarray:
    """Per-group pseudo-labels (G1, G2, G3) for an N-stage; UNKNOWN (-1) where the N-stage does not tell.

    N0 -> (0, 0, 0), N1 -> (1, 0, 0), N2 -> (?, 1, 0), N3 -> (?, ?, 1). The groups are taken for the patient's
    tumour side with ``RuleSet.group_masks(side)``.
    """
    n = parse_n_stage(n_stage)
    out = np.zeros(3, dtype=np.int64)
    for k in (1, 2, 3):
        if k == n:
            out[k - 1] = 1
        elif k < n:
            out[k - 1] = UNKNOWN
    return out

