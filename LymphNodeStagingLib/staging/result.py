"""The result of assessing one case: per-station findings and the N-stage, with re-staging without the network.

``CaseResult`` is what the assessment returns, what the JSON/CSV files hold, what the Slicer module shows and what
the cohort runs summarise. ``restage`` applies another probability threshold, per-station overrides or another rule
set instantly: the probabilities stay, only the statuses and the N-stage are derived again.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LNSError
from ..io.files import write_json, write_text
from .rules import DEFAULT_RULES, load_rules, parse_side
from .stations import STATIONS, parse_station

POSITIVE, NEGATIVE, ABSENT = "positive", "negative", "absent"
RESULT_FORMAT = "lnstaging-case-result"
RESULT_FORMAT_VERSION = 1

#: Provenance values: the atlas set (``AtlasSet.synthetic`` of its manifest) and the classifier.
SYNTHETIC_ATLASES, USER_ATLASES, UNKNOWN_ATLASES = "synthetic-demo", "user", "unknown"
DEMO_MODEL, USER_MODEL = "demo", "user"
_ATLAS_ADVICE = "an atlas set such as the Lynch et al. atlases"
_MODEL_ADVICE = "a model trained on clinical data"

#: What a case was assessed from (``CaseResult.modality``): PET/CT, or the CT alone (CT-only mode, no PET).
MODALITY_PETCT, MODALITY_CT = "petct", "ct"
MODALITIES = (MODALITY_PETCT, MODALITY_CT)
#: The warning of a result assessed from the CT alone, and of a PET/CT assessed with a CT-only model.
CT_ONLY_NOTE = "CT only: no PET; station probabilities from a CT-only model, no SUV figures"
CT_ONLY_MODEL_NOTE = "CT-only model: the station probabilities do not use the PET (its SUV figures are reported)"


def make_provenance(synthetic_atlases: bool | None, demo_model: bool) -> dict[str, Any]:
    """What the result was computed with, and whether that makes it invalid for patients.

    ``synthetic_atlases``: the atlas set's manifest says "synthetic" (None: not known, e.g. a station map read from
    files of an older version); ``demo_model``: the bundled demo classifier (trained on phantoms only) was used.
    """
    atlases = {True: SYNTHETIC_ATLASES, False: USER_ATLASES, None: UNKNOWN_ATLASES}[synthetic_atlases]
    model = DEMO_MODEL if demo_model else USER_MODEL
    demo = bool(synthetic_atlases) or demo_model
    out: dict[str, Any] = {"atlases": atlases, "model": model, "demo": demo}
    if not demo:
        return out
    if synthetic_atlases and demo_model:
        statement = ("synthetic demo atlases and model: station positions and probabilities are not valid for "
                     f"patients; supply {_ATLAS_ADVICE} and {_MODEL_ADVICE}")
    elif synthetic_atlases:
        statement = ("synthetic demo atlases: station positions, and so the probabilities, are not valid for "
                     f"patients; supply {_ATLAS_ADVICE}")
    else:
        statement = ("demo model (trained on synthetic phantoms only): probabilities are not valid for patients; "
                     f"supply {_MODEL_ADVICE}")
    return {**out, "valid_for_patients": False, "statement": statement}


@dataclass
class StationResult:
    """Findings for one station of one case."""

    name: str
    label: int
    present: bool  # found in the fused station map
    probability: float | None  # malignancy probability; None when absent
    status: str  # POSITIVE | NEGATIVE | ABSENT (after threshold and override)
    suv_max: float | None = None
    suv_peak: float | None = None  # mean SUV in the 1 cm^3 sphere around the hottest voxel
    agreement: float | None = None  # atlas agreement (mean pairwise Dice of the warped station masks)
    centre_mm: tuple[float, float, float] | None = None  # patch centre, LPS physical point
    volume_ml: float | None = None
    override: str | None = None  # POSITIVE | NEGATIVE set by a reader; None = model decides
    flags: list[str] = field(default_factory=list)  # e.g. "fallback:best_atlas"
    node_probability: float | None = None  # the station's probability from its nodes (node classifier), if it ran

    def model_status(self, threshold: float) -> str:
        if not self.present or self.probability is None:
            return ABSENT
        return POSITIVE if self.probability >= threshold else NEGATIVE


@dataclass
class CaseResult:
    """The assessment of one PET/CT."""

    case_id: str
    side: str
    rules: str
    threshold: float
    stations: list[StationResult]
    n_stage: str = "N0"
    tnm9: str = "N0"
    deciding_stations: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    explanation: str = ""
    learned_n_stage: str | None = None  # from a TS2/TS3 head, when the model has one
    learned_n_probabilities: list[float] | None = None
    model: dict[str, Any] = field(default_factory=dict)  # name, version, fingerprint of the checkpoint
    atlases: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)  # "pet" None: a CT assessed alone
    suv: dict[str, Any] = field(default_factory=dict)  # SUV provenance
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    version: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)  # make_provenance: synthetic atlases, demo model
    #: lymph nodes found by a node model (``NodeInstance.to_dict``: id, station, centre_mm, short/long axis, volume,
    #: mean HU, SUVmax/mean/peak, score, and "probability" of malignancy when a node classifier ran), in id order;
    #: None when no node model ran
    nodes: list[dict[str, Any]] | None = None
    #: what the case was assessed from: MODALITY_PETCT, or MODALITY_CT for a CT without PET (no SUV figures)
    modality: str = MODALITY_PETCT

    def __post_init__(self) -> None:
        self.side = parse_side(self.side)
        if self.modality not in MODALITIES:
            raise LNSError(f"case result {self.case_id}: 'modality' must be one of {', '.join(MODALITIES)}, got "
                           f"{self.modality!r}")
        if self.nodes is not None and (not isinstance(self.nodes, list)
                                       or not all(isinstance(n, dict) for n in self.nodes)):
            raise LNSError(f"case result {self.case_id}: 'nodes' must be a list of node records or null, got "
                           f"{type(self.nodes).__name__}")

    @property
    def demo_banner(self) -> str | None:
        """One line in capitals when the result was computed with the synthetic demo atlases and/or the demo model
        (None otherwise): what the table, the overview and the Slicer module show first."""
        if not self.provenance.get("demo"):
            return None
        statement = self.provenance.get("statement") or "computed with synthetic demo data: not valid for patients"
        return f"*** {statement.upper()} ***"

    def set_provenance(self, synthetic_atlases: bool | None, demo_model: bool) -> None:
        """Record the provenance (make_provenance); a demo one also puts its statement first in ``warnings``."""
        self.provenance = make_provenance(synthetic_atlases, demo_model)
        statement = self.provenance.get("statement")
        if statement and statement not in self.warnings:
            self.warnings.insert(0, statement)

    # ----- staging -------------------------------------------------------------------------------------------
    def station(self, name: str) -> StationResult:
        key = parse_station(name).name
        for s in self.stations:
            if s.name == key:
                return s
        raise LNSError(f"station {key} is not in the result of case {self.case_id}")

    def positive_stations(self) -> list[str]:
        return [s.name for s in self.stations if s.status == POSITIVE]

    def station_nodes(self) -> dict[str, tuple[int, float | None]]:
        """Per station: (number of lymph nodes, largest short axis in mm; None without nodes), from ``nodes``.
        Empty when no node model ran; nodes outside every station are not counted."""
        if self.nodes is None:
            return {}
        out: dict[str, tuple[int, float | None]] = {s.name: (0, None) for s in self.stations}
        for n in self.nodes:
            name = n.get("station")
            if name not in out:
                continue
            count, largest = out[name]
            short = n.get("short_axis_mm")
            if short is not None:
                largest = float(short) if largest is None else max(largest, float(short))
            out[name] = (count + 1, largest)
        return out

    def top_nodes(self) -> dict[str, dict[str, Any]]:
        """Per station with nodes: its most suspicious node (the highest ``probability`` when a node classifier
        ran, else the largest short axis)."""
        out: dict[str, dict[str, Any]] = {}

        def rank(n: dict[str, Any]) -> tuple[float, float]:
            p = n.get("probability")
            return (-1.0 if p is None else float(p), float(n.get("short_axis_mm") or 0.0))

        for n in self.nodes or []:
            name = n.get("station")
            if name and (name not in out or rank(n) > rank(out[name])):
                out[name] = n
        return out

    def node_explanation(self) -> str:
        """The nodes that decided the N-stage: the most suspicious node of every deciding station ("" without
        nodes)."""
        top = self.top_nodes()
        parts = []
        for name in self.deciding_stations:
            n = top.get(name)
            if n is None:
                continue
            p = n.get("probability")
            parts.append(f"{name}: node {n['id']} (short axis {float(n.get('short_axis_mm') or 0.0):.1f} mm"
                         + (f", p {float(p):.2f}" if p is not None else "") + ")")
        return ("Deciding nodes: " + "; ".join(parts) + ".") if parts else ""

    def restage(
        self,
        threshold: float | None = None,
        overrides: dict[str, str | None] | None = None,
        rules: str | None = None,
    ) -> CaseResult:
        """A new result with statuses and N-stage derived again (probabilities unchanged).

        ``overrides`` maps station names to "positive", "negative" or None (None removes an override).
        """
        threshold = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise LNSError(f"threshold must be within 0..1, got {threshold}")
        rules = rules or self.rules
        stations = [replace(s, flags=list(s.flags)) for s in self.stations]
        by_name = {s.name: s for s in stations}
        for name, value in (overrides or {}).items():
            st = by_name[parse_station(name).name]
            if value not in (None, POSITIVE, NEGATIVE):
                raise LNSError(f"override for station {st.name} must be 'positive', 'negative' or None, got {value!r}")
            st.override = value
        for st in stations:
            st.status = st.override or st.model_status(threshold)
        out = replace(self, threshold=threshold, rules=rules, stations=stations)
        out._apply_staging()
        return out

    def _apply_staging(self) -> None:
        staging = load_rules(self.rules).stage(self.positive_stations(), self.side)
        self.rules = staging.rules
        self.n_stage = staging.n_label
        self.tnm9 = staging.tnm9
        self.deciding_stations = staging.deciding_stations
        self.groups = staging.groups
        self.explanation = " ".join(t for t in (staging.explanation(), self.node_explanation()) if t)

    # ----- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": RESULT_FORMAT, "format_version": RESULT_FORMAT_VERSION, **d}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        if data.get("format") != RESULT_FORMAT:
            raise LNSError(f"not a case result (format {data.get('format')!r}, expected {RESULT_FORMAT!r})")
        data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        stations = []
        for s in data.pop("stations"):
            if s.get("centre_mm") is not None:
                s["centre_mm"] = tuple(s["centre_mm"])
            stations.append(StationResult(**s))
        return cls(stations=stations, **data)

    @classmethod
    def read_json(cls, path: str | Path) -> CaseResult:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise LNSError(f"cannot read case result {path}: {exc}") from None

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    CSV_COLUMNS = ("case_id", "station", "label", "present", "probability", "status", "override", "suv_max",
                   "suv_peak", "agreement", "volume_ml", "centre_x_mm", "centre_y_mm", "centre_z_mm", "group",
                   "flags")
    #: Columns added when a node model ran: lymph nodes in the station, the largest short axis (mm), the most
    #: suspicious node's id and the station's probability from its nodes (node classifier).
    NODE_CSV_COLUMNS = ("n_nodes", "max_short_axis_mm", "top_node", "node_probability")

    @property
    def csv_columns(self) -> tuple[str, ...]:
        """The columns of this result's table: CSV_COLUMNS, then NODE_CSV_COLUMNS when a node model ran."""
        return self.CSV_COLUMNS + (self.NODE_CSV_COLUMNS if self.nodes is not None else ())

    def table_rows(self) -> list[dict[str, Any]]:
        """One dict per station with the ``csv_columns`` (None where a value is missing)."""
        rows = []
        per_station = self.station_nodes()
        top = self.top_nodes()
        for s in self.stations:
            c = s.centre_mm or (None, None, None)
            values = (self.case_id, s.name, s.label, int(s.present), s.probability, s.status, s.override,
                      s.suv_max, s.suv_peak, s.agreement, s.volume_ml, c[0], c[1], c[2],
                      self.groups.get(s.name), ";".join(s.flags))
            if self.nodes is not None:
                values += (*per_station[s.name], top[s.name]["id"] if s.name in top else None, s.node_probability)
            rows.append(dict(zip(self.csv_columns, values, strict=True)))
        return rows

    def to_frame(self):
        """The station table as a pandas DataFrame (one row per station, the columns of result.csv)."""
        import pandas as pd

        return pd.DataFrame(self.table_rows(), columns=list(self.csv_columns))

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_columns)
        for r in self.table_rows():
            writer.writerow(["" if v is None else (_fmt(v) if isinstance(v, float) else v) for v in r.values()])
        return buf.getvalue()

    def text_table(self, truth: list[str] | None = None) -> str:
        """The station table as aligned text (every station; with ``truth``, a column marking true positives).

        A result computed with the synthetic demo atlases or the demo model starts with ``demo_banner``; a CT
        assessed without PET (``modality`` "ct") has a "CT only (no PET)" line before the header; stations
        with station-mapping flags get a "mapping" column; with lymph nodes, the columns "nodes" (count) and
        "short" (largest short axis, mm).
        """
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        mapping = {st.name: ",".join(fl.split(":", 1)[1] for fl in st.flags if fl.startswith("mapping:"))
                   for st in self.stations}
        head = f"{'station':8s} {'p':>6s} {'status':9s} {'SUVmax':>7s} {'SUVpeak':>7s} {'agree':>6s}"
        per_station = self.station_nodes()
        top = self.top_nodes()
        node_probs = any(st.node_probability is not None for st in self.stations)
        if per_station:
            head += f" {'nodes':>5s} {'short':>5s} {'top':>4s}" + (f" {'p_node':>6s}" if node_probs else "")
        if truth is not None:
            head += f"  {'truth':9s}"
        if any(mapping.values()):
            head += "  mapping"
        lines = [self.demo_banner] if self.demo_banner else []
        if self.modality == MODALITY_CT:
            lines.append("CT only (no PET): no SUV figures; station probabilities from a CT-only model")
        lines.append(head.rstrip())
        true_set = set(truth or [])
        for st in self.stations:
            line = (f"{st.name:8s} {f(st.probability, '6.3f')} {st.status:9s} {f(st.suv_max, '7.2f')} "
                    f"{f(st.suv_peak, '7.2f')} {f(st.agreement, '6.2f')}")
            if per_station:
                count, largest = per_station[st.name]
                tid = str(top[st.name]["id"]) if st.name in top else "-"
                line += f" {count:5d} {f(largest, '.1f'):>5s} {tid:>4s}"
                if node_probs:
                    line += f" {f(st.node_probability, '6.3f')}"
            if truth is not None:
                line += f"  {'malignant' if st.name in true_set else '':9s}"
            if mapping[st.name]:
                line += f"  {mapping[st.name]}"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> Path:
        return write_text(path, self.to_csv())


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def make_case_result(
    case_id: str,
    side: str,
    probabilities: dict[str, float | None],
    *,
    threshold: float = 0.5,
    rules: str = DEFAULT_RULES,
    **station_fields: dict[str, dict[str, Any]],
) -> CaseResult:
    """Build a staged CaseResult from per-station probabilities (None or missing = absent station).

    ``station_fields`` maps a StationResult field name (suv_max, agreement, centre_mm, ...) to {station: value}.
    """
    from .. import __version__

    probs = {parse_station(k).name: v for k, v in probabilities.items()}
    stations = []
    for st in STATIONS:
        p = probs.get(st.name)
        extra = {f: vals.get(st.name) for f, vals in station_fields.items() if vals.get(st.name) is not None}
        sr = StationResult(name=st.name, label=st.label, present=p is not None,
                           probability=None if p is None else float(p), status=ABSENT, **extra)
        stations.append(sr)
    result = CaseResult(case_id=case_id, side=side, rules=rules, threshold=threshold, stations=stations,
                        version=__version__)
    return result.restage()
