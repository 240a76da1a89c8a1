"""The cohort table: one row per PET/CT scan with its image-level labels, read and validated.

Columns (CSV, comma-separated, UTF-8, header in the first line):

  patient_id, study, series       identify a scan; (patient_id, study, series) must be unique
  n_stage                         0-3, N0-N3 (cN2, pN1 accepted)
  positive_stations               ";"-separated station names; empty = none for N0 and unknown otherwise;
                                  "none" = explicitly none; "unknown" or "?" = not known
  tumour_side                     R or L (side of the primary tumour)
  ct_path, pet_path               image file or DICOM folder; relative paths resolve against the CSV's folder
  anatomy_path, stations_path,    optional: precomputed anatomy labels, station map, lesion mask
  lesion_path
  nodes_path                      optional: lymph node instance map on the CT grid (ids 1..n, 0 = background;
                                  a binary mask is accepted), the truth of node detection
  split                           optional: train, val, test, or a fold number
  pet_is_suv                      optional: yes/no (true/false, 1/0); yes declares that the PET file holds SUV.
                                  A PET image file (NIfTI, NRRD, ...) carries no DICOM header to compute SUV from,
                                  so it is used only when declared SUV here or by the command's --pet-is-suv

Validation reports every problem with its line number in the file (the header is line 1) and never drops a row:
rows with errors stay in ``Cohort.rows`` and are listed in ``Cohort.problems``. A stated N-stage that disagrees
with the rule set applied to the positive stations is a *label inconsistency*: reported as a warning, not an error.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, LNSError
from ..staging.rules import DEFAULT_RULES, N_STAGES, UNKNOWN, load_rules, parse_n_stage, parse_side
from ..staging.stations import NUM_STATIONS, parse_station_list

REQUIRED_COLUMNS: tuple[str, ...] = (
    "patient_id", "study", "series", "n_stage", "positive_stations", "tumour_side", "ct_path", "pet_path",
)
PATH_COLUMNS_OPTIONAL: tuple[str, ...] = ("anatomy_path", "stations_path", "lesion_path", "nodes_path")
OPTIONAL_COLUMNS: tuple[str, ...] = (*PATH_COLUMNS_OPTIONAL, "split", "pet_is_suv")
SPLIT_VALUES = ("train", "val", "validation", "test")
_NONE_WORDS = {"none", "-"}
_UNKNOWN_WORDS = {"unknown", "?", "na", "n/a", "nan"}
_YES_WORDS = {"1", "true", "yes", "y"}
_NO_WORDS = {"0", "false", "no", "n"}


def parse_yes_no(text: str | None, what: str) -> bool | None:
    """yes/true/1 -> True, no/false/0 -> False, empty -> None; anything else raises InputError naming ``what``."""
    if text is None or not str(text).strip():
        return None
    low = str(text).strip().lower()
    if low in _YES_WORDS:
        return True
    if low in _NO_WORDS:
        return False
    raise InputError(f"{what} {text!r}: expected yes/no, true/false or 1/0")


@dataclass
class Problem:
    """One validation finding. ``line`` is the line in the CSV file (header = 1); None for file-level problems."""

    kind: str
    message: str
    line: int | None = None
    column: str | None = None
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column:
            where.append(f"column {self.column}")
        prefix = ", ".join(where)
        return f"{self.severity}: {prefix + ': ' if prefix else ''}{self.message}"


@dataclass
class CohortRow:
    """One scan of the cohort. Fields that could not be parsed are None (see the cohort's problems)."""

    line: int
    patient_id: str
    study: str
    series: str
    n_stage: int | None
    positive_stations: list[str] | None  # None = station labels unknown
    tumour_side: str | None
    ct_path: Path | None
    pet_path: Path | None
    anatomy_path: Path | None = None
    stations_path: Path | None = None
    lesion_path: Path | None = None
    split: str | None = None
    pet_is_suv: bool | None = None  # declared in the cohort (None: not stated)
    extra: dict[str, str] = field(default_factory=dict)
    valid: bool = True
    nodes_path: Path | None = None  # node instance map (0 = background) or binary node mask

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.patient_id, self.study, self.series)

    @property
    def scan_id(self) -> str:
        """A readable, file-name-safe identifier of the scan."""
        parts = [p for p in self.key if p]
        return "_".join(parts).replace("/", "-").replace("\\", "-").replace(" ", "-")

    @property
    def has_station_labels(self) -> bool:
        return self.positive_stations is not None

    def station_labels(self) -> np.ndarray:
        """Per-station labels in catalogue order: 1 positive, 0 negative, UNKNOWN (-1) when not known."""
        from ..staging.stations import parse_station

        if self.positive_stations is None:
            return np.full(NUM_STATIONS, UNKNOWN, dtype=np.int64)
        out = np.zeros(NUM_STATIONS, dtype=np.int64)
        for name in self.positive_stations:
            out[parse_station(name).index] = 1
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["n_stage"] = None if self.n_stage is None else N_STAGES[self.n_stage]
        return d


@dataclass
class Cohort:
    """A read cohort table with all rows and all problems found."""

    path: Path
    rows: list[CohortRow]
    problems: list[Problem]
    rules: str = DEFAULT_RULES

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def usable_rows(self) -> list[CohortRow]:
        """Rows without errors."""
        return [r for r in self.rows if r.valid]

    def patients(self) -> dict[str, list[CohortRow]]:
        out: dict[str, list[CohortRow]] = defaultdict(list)
        for r in self.rows:
            out[r.patient_id].append(r)
        return dict(out)

    def to_frame(self):
        """The rows as a pandas DataFrame (one row per scan, the cohort columns as read and checked)."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rows])

    def summary(self) -> dict:
        n_counts = Counter(N_STAGES[r.n_stage] for r in self.rows if r.n_stage is not None)
        return {
            "path": str(self.path),
            "valid": self.valid,
            "rules": self.rules,
            "rows": len(self.rows),
            "usable_rows": len(self.usable_rows()),
            "patients": len(self.patients()),
            "n_stage_counts": {k: n_counts.get(k, 0) for k in N_STAGES},
            "rows_with_station_labels": sum(1 for r in self.rows if r.has_station_labels),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
        }

    def require_valid(self) -> Cohort:
        """Raise InputError listing the errors if the cohort is not valid."""
        if not self.valid:
            listing = "\n  ".join(str(p) for p in self.errors[:50])
            more = f"\n  ... and {len(self.errors) - 50} more" if len(self.errors) > 50 else ""
            raise InputError(f"cohort {self.path} has {len(self.errors)} error(s):\n  {listing}{more}")
        return self


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else (base / p)


def _parse_positive(text: str, n_stage: int | None) -> list[str] | None:
    low = text.strip().lower()
    if low in _UNKNOWN_WORDS:
        return None
    if low in _NONE_WORDS:
        return []
    if not low:
        return [] if n_stage == 0 else None
    return [s.name for s in parse_station_list(text)]


def read_cohort(path: str | Path, *, check_files: bool = True, rules: str = DEFAULT_RULES) -> Cohort:
    """Read and validate a cohort CSV. Raises InputError only when the file cannot be read as a table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cohort file {path} does not exist (expected a CSV file)")
    rule_set = load_rules(rules)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"cohort file {path} is not UTF-8 text ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise InputError(f"cohort file {path} is empty (expected a header line with {', '.join(REQUIRED_COLUMNS)})")
    if len(header) == 1 and ";" in header[0]:
        raise InputError(
            f"cohort file {path}: the header has one column {header[0]!r}; expected comma-separated columns "
            "(';' separates stations inside positive_stations)"
        )
    reader.fieldnames = header
    problems: list[Problem] = []
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in header]
    for c in missing_cols:
        problems.append(Problem("missing_column", f"required column {c!r} is missing", line=1, column=c))
    dup_cols = [c for c, n in Counter(header).items() if n > 1]
    for c in dup_cols:
        problems.append(Problem("duplicate_column", f"column {c!r} appears {Counter(header)[c]} times", line=1, column=c))
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for c in header:
        if c not in known:
            problems.append(Problem("unknown_column", f"column {c!r} is not used (kept as extra data)", line=1,
                                    column=c, severity="warning"))

    base = path.parent
    rows: list[CohortRow] = []
    for i, raw in enumerate(reader, start=2):
        line = reader.line_num if reader.line_num else i
        if raw is None or all((v or "").strip() == "" for k, v in raw.items() if k is not None):
            problems.append(Problem("empty_row", "empty row (ignored for training, listed here)", line=line,
                                    severity="warning"))
            continue
        row_problems: list[Problem] = []
        if None in raw:
            row_problems.append(Problem("extra_values", f"more values than columns: {raw[None]}", line=line))

        def get(col: str, _raw: dict = raw) -> str:
            v = _raw.get(col)
            return (v or "").strip()

        pid = get("patient_id")
        if "patient_id" in header and not pid:
            row_problems.append(Problem("empty_value", "patient_id is empty", line=line, column="patient_id"))
        n_stage: int | None = None
        if "n_stage" in header:
            try:
                n_stage = parse_n_stage(get("n_stage"))
            except LNSError:
                row_problems.append(Problem("bad_n_stage", f"n_stage {get('n_stage')!r} is not one of 0-3 or N0-N3",
                                            line=line, column="n_stage"))
        positives: list[str] | None = None
        if "positive_stations" in header:
            try:
                positives = _parse_positive(get("positive_stations"), n_stage)
            except LNSError as exc:
                row_problems.append(Problem("bad_station", str(exc), line=line, column="positive_stations"))
        side: str | None = None
        if "tumour_side" in header:
            try:
                side = parse_side(get("tumour_side"), "tumour_side")
            except LNSError:
                row_problems.append(Problem("bad_side", f"tumour_side {get('tumour_side')!r} is not R or L",
                                            line=line, column="tumour_side"))
        paths: dict[str, Path | None] = {}
        for col in ("ct_path", "pet_path", *PATH_COLUMNS_OPTIONAL):
            value = get(col)
            if not value:
                paths[col] = None
                if col in REQUIRED_COLUMNS and col in header:
                    row_problems.append(Problem("empty_value", f"{col} is empty", line=line, column=col))
                continue
            p = _resolve(base, value)
            paths[col] = p
            if check_files and not p.exists():
                row_problems.append(Problem("missing_file", f"{col} {value!r} does not exist (resolved to {p})",
                                            line=line, column=col))
        split = get("split") or None
        if split is not None and split.lower() not in SPLIT_VALUES and not split.isdigit():
            row_problems.append(Problem("bad_split", f"split {split!r} is not one of {', '.join(SPLIT_VALUES)} "
                                        "or a fold number", line=line, column="split"))
        pet_is_suv: bool | None = None
        try:
            pet_is_suv = parse_yes_no(get("pet_is_suv"), "pet_is_suv")
        except InputError as exc:
            row_problems.append(Problem("bad_value", str(exc), line=line, column="pet_is_suv"))
        row = CohortRow(
            line=line, patient_id=pid, study=get("study"), series=get("series"), n_stage=n_stage,
            positive_stations=positives, tumour_side=side, ct_path=paths.get("ct_path"),
            pet_path=paths.get("pet_path"), anatomy_path=paths.get("anatomy_path"),
            stations_path=paths.get("stations_path"), lesion_path=paths.get("lesion_path"),
            nodes_path=paths.get("nodes_path"),
            split=split.lower() if split and not split.isdigit() else split, pet_is_suv=pet_is_suv,
            extra={k: (v or "") for k, v in raw.items() if k is not None and k not in known},
        )
        # Label consistency: the stated N-stage against the rules applied to the positive stations.
        if n_stage is not None and side is not None and positives is not None:
            derived = rule_set.stage(positives, side)
            if derived.n_stage != n_stage:
                why = f"stations {', '.join(positives)} give {derived.n_label}" if positives else "no positive station"
                row_problems.append(Problem(
                    "label_inconsistency",
                    f"stated {N_STAGES[n_stage]} but {why} under the {rule_set.name} rules for tumour side {side}",
                    line=line, column="n_stage", severity="warning"))
        row.valid = not any(p.severity == "error" for p in row_problems)
        problems.extend(row_problems)
        rows.append(row)

    if not rows:
        problems.append(Problem("no_rows", "the cohort has no data rows"))
    # Duplicate scan identifiers.
    seen: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if not r.patient_id:
            continue
        if r.key in seen:
            problems.append(Problem(
                "duplicate_id",
                f"scan (patient_id={r.patient_id!r}, study={r.study!r}, series={r.series!r}) already on line {seen[r.key]}",
                line=r.line, column="patient_id"))
            r.valid = False
        else:
            seen[r.key] = r.line
    # One patient, one tumour side.
    by_patient: dict[str, list[CohortRow]] = defaultdict(list)
    for r in rows:
        if r.patient_id:
            by_patient[r.patient_id].append(r)
    for pid, prs in by_patient.items():
        sides = {r.tumour_side for r in prs if r.tumour_side}
        if len(sides) > 1:
            lines = ", ".join(str(r.line) for r in prs)
            for r in prs:
                problems.append(Problem("side_conflict", f"patient {pid!r} has tumour sides {sorted(sides)} on lines "
                                        f"{lines}", line=r.line, column="tumour_side"))
                r.valid = False
    problems.sort(key=lambda p: (p.line if p.line is not None else 0))
    return Cohort(path=path, rows=rows, problems=problems, rules=rule_set.name)


def write_cohort(rows: list[dict], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write a cohort CSV (atomically) from dicts with the cohort columns; lists of stations are joined with ';'.

    ``columns``: the column order (default: the required columns, the optional ones used, then the others sorted)."""
    from ..io.files import atomic_path

    if columns is None:
        columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)]
        columns += sorted({k for r in rows for k in r} - set(columns))
    columns = list(columns)
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            out = {}
            for c in columns:
                v = r.get(c, "")
                if isinstance(v, (list, tuple)):
                    v = ";".join(str(x) for x in v)
                elif isinstance(v, Path):
                    v = v.as_posix()
                elif isinstance(v, bool):
                    v = "yes" if v else "no"
                out[c] = "" if v is None else v
            writer.writerow(out)
    return path
