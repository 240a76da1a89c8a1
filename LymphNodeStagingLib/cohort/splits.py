"""Patient-level stratified k-fold splits with a train, validation and test set per fold.

The unit of splitting is the patient: all scans of a patient are in the same set of every fold, so a fold's test
patients never appear in its training or validation set. Every patient is in exactly one test fold.

Stratum = N-stage x number of positive stations (an unknown number of positive stations is its own value "?";
unknown station labels are never counted as positives). Rare strata are merged by this deterministic rule
(``MERGE_RULE``), with "rare" meaning fewer than ``min_stratum_size`` patients (default: the number of folds):

1. A stratum with an unknown number of positive stations that is rare joins the largest known stratum of the same
   N-stage (ties: the one with fewer positive stations); it stays on its own if that N-stage has no known stratum.
2. The remaining strata are ordered numerically by (N-stage, number of positive stations; "?" last). Repeatedly,
   the rare stratum that comes last in this order is merged into a neighbour: the next lower stratum of the same
   N-stage if there is one, else the next higher of the same N-stage, else the adjacent stratum of the next lower
   N-stage, else that of the next higher N-stage. This stops when no stratum is rare or only one is left.

So "N2 with 5, 6 and 7 positive stations" becomes one stratum "N2:5-7", and an N-stage with too few patients joins
its neighbour. Test folds are dealt stratum by stratum from a seeded shuffle, continuing round-robin across strata,
so fold sizes differ by at most one and each stratum's count per fold by at most one. The validation set of fold k
is a stratified draw of ``val_fraction`` of the non-test patients (largest-remainder rounding per stratum), from a
generator seeded with (seed, k); the rest is the training set. With 5 folds and val_fraction 0.25 this is the
paper's 60/20/20 split.

The split is written to a JSON file (with a CSV beside it for reading by eye or other tools) and reused: a reused
file must match the cohort's patients and labels and the requested parameters, otherwise ``UsageError`` says what
differs. The TS1, TS2 and TS3 runs of one evaluation share the file, so a TS2/TS3 model warm-started from the TS1
model of fold k never saw fold k's test patients; ``Split.subset`` drops patients (e.g. those without a tumour side)
without moving anyone else.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..io.files import write_json, write_text

log = logging.getLogger(__name__)

SPLIT_FORMAT = "lnstaging-split"
SPLIT_VERSION = 1
ROLES: tuple[str, ...] = ("train", "validation", "test")
MERGE_RULE = (
    "rare = fewer than min_stratum_size patients; a rare unknown-count stratum joins the largest known stratum of "
    "its N-stage; then, repeatedly, the last rare stratum in (N-stage, positives) order merges into the next lower "
    "stratum of its N-stage, else the next higher of its N-stage, else the adjacent stratum of the lower N-stage, "
    "else of the higher N-stage"
)


@dataclass(frozen=True)
class SplitPatient:
    """The labels of one patient that the split needs."""

    patient_id: str
    n_stage: int
    n_positive: int | None  # number of positive stations; None when unknown


@dataclass
class Fold:
    """The patient ids of one fold's three sets (sorted)."""

    index: int
    train: list[str]
    validation: list[str]
    test: list[str]

    def role(self, patient_id: str) -> str | None:
        for name in ROLES:
            if patient_id in self.ids(name):
                return name
        return None

    def ids(self, role: str) -> list[str]:
        if role not in ROLES:
            raise UsageError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return {"train": self.train, "validation": self.validation, "test": self.test}[role]


@dataclass
class Split:
    """A patient-level k-fold split with train/validation/test per fold."""

    n_folds: int
    seed: int
    val_fraction: float
    min_stratum_size: int
    patients: dict[str, SplitPatient]
    strata: dict[str, str]  # patient id -> stratum name after merging
    folds: list[Fold]
    merge_rule: str = MERGE_RULE
    version: int = SPLIT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return cohort_fingerprint(self.patients.values())

    def fold(self, k: int) -> Fold:
        if not 0 <= k < self.n_folds:
            raise UsageError(f"fold must be in 0..{self.n_folds - 1}, got {k}")
        return self.folds[k]

    def test_fold_of(self, patient_id: str) -> int:
        for f in self.folds:
            if patient_id in f.test:
                return f.index
        raise UsageError(f"patient {patient_id!r} is not in the split")

    def stratum_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self.strata.values():
            counts[s] += 1
        return dict(sorted(counts.items(), key=lambda kv: _stratum_sort_key(kv[0])))

    def subset(self, patient_ids: Iterable[str]) -> Split:
        """The same split restricted to some patients; nobody changes set. Unknown ids raise UsageError."""
        keep = set(patient_ids)
        unknown = sorted(keep - set(self.patients))
        if unknown:
            raise UsageError(f"cannot restrict the split to patients it does not contain: {_few(unknown)}")
        return Split(
            n_folds=self.n_folds, seed=self.seed, val_fraction=self.val_fraction,
            min_stratum_size=self.min_stratum_size,
            patients={p: v for p, v in self.patients.items() if p in keep},
            strata={p: s for p, s in self.strata.items() if p in keep},
            folds=[Fold(f.index, [p for p in f.train if p in keep], [p for p in f.validation if p in keep],
                        [p for p in f.test if p in keep]) for f in self.folds],
            merge_rule=self.merge_rule, version=self.version, extra=dict(self.extra),
        )

    def check_matches(self, patients: Iterable[SplitPatient | Sequence], source: str = "split") -> None:
        """Raise UsageError if the cohort's patients or labels differ from those the split was made for."""
        wanted = collapse_patients(patients)
        missing = sorted(set(wanted) - set(self.patients))
        extra = sorted(set(self.patients) - set(wanted))
        changed = sorted(p for p in set(wanted) & set(self.patients) if wanted[p] != self.patients[p])
        if missing or extra or changed:
            parts = []
            if missing:
                parts.append(f"{len(missing)} cohort patient(s) not in the split ({_few(missing)})")
            if extra:
                parts.append(f"{len(extra)} split patient(s) not in the cohort ({_few(extra)})")
            if changed:
                parts.append(f"{len(changed)} patient(s) with different N-stage or positive-station count "
                             f"({_few(changed)})")
            raise UsageError(f"{source} does not match the cohort: {'; '.join(parts)}. "
                             "Remove the split file to make a new split, or use the cohort it was made for.")

    def to_dict(self) -> dict[str, Any]:
        test_fold = {pid: f.index for f in self.folds for pid in f.test}
        return {
            "format": SPLIT_FORMAT,
            "version": self.version,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "min_stratum_size": self.min_stratum_size,
            "merge_rule": self.merge_rule,
            "fingerprint": self.fingerprint,
            "stratum_counts": self.stratum_counts(),
            "patients": [
                {"patient_id": p.patient_id, "n_stage": p.n_stage, "n_positive": p.n_positive,
                 "stratum": self.strata[p.patient_id], "test_fold": test_fold[p.patient_id]}
                for p in sorted(self.patients.values(), key=lambda q: q.patient_id)
            ],
            "folds": [{"fold": f.index, "train": f.train, "validation": f.validation, "test": f.test}
                      for f in self.folds],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "split") -> Split:
        try:
            if d.get("format") != SPLIT_FORMAT:
                raise UsageError(f"{source}: not a split file (format must be {SPLIT_FORMAT!r}, "
                                 f"got {d.get('format')!r})")
            if int(d["version"]) > SPLIT_VERSION:
                raise UsageError(f"{source}: split file version {d['version']} is newer than {SPLIT_VERSION}")
            patients = {}
            strata = {}
            for row in d["patients"]:
                pid = str(row["patient_id"])
                npos = row["n_positive"]
                patients[pid] = SplitPatient(pid, int(row["n_stage"]), None if npos is None else int(npos))
                strata[pid] = str(row["stratum"])
            folds = [Fold(int(f["fold"]), [str(p) for p in f["train"]], [str(p) for p in f["validation"]],
                          [str(p) for p in f["test"]]) for f in d["folds"]]
            split = cls(
                n_folds=int(d["n_folds"]), seed=int(d["seed"]), val_fraction=float(d["val_fraction"]),
                min_stratum_size=int(d["min_stratum_size"]), patients=patients, strata=strata,
                folds=sorted(folds, key=lambda f: f.index), merge_rule=str(d.get("merge_rule", MERGE_RULE)),
                version=int(d["version"]), extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"{source}: malformed split file ({type(exc).__name__}: {exc})") from exc
        split.validate(source)
        return split

    def validate(self, source: str = "split") -> None:
        """Check the invariants: every patient in exactly one test fold and one set per fold, no leakage."""
        if len(self.folds) != self.n_folds or [f.index for f in self.folds] != list(range(self.n_folds)):
            raise UsageError(f"{source}: expected folds 0..{self.n_folds - 1}, got {[f.index for f in self.folds]}")
        everyone = set(self.patients)
        seen_test: dict[str, int] = {}
        for f in self.folds:
            sets = [set(f.train), set(f.validation), set(f.test)]
            if sum(len(s) for s in sets) != len(f.train) + len(f.validation) + len(f.test):
                raise UsageError(f"{source}: fold {f.index} lists a patient twice")
            if sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]:
                raise UsageError(f"{source}: fold {f.index} has a patient in two of train/validation/test")
            union = sets[0] | sets[1] | sets[2]
            if union != everyone:
                raise UsageError(f"{source}: fold {f.index} does not cover exactly the split's patients "
                                 f"(missing {_few(sorted(everyone - union))}, unknown {_few(sorted(union - everyone))})")
            for p in f.test:
                if p in seen_test:
                    raise UsageError(f"{source}: patient {p!r} is in the test sets of folds {seen_test[p]} "
                                     f"and {f.index}")
                seen_test[p] = f.index
        if set(seen_test) != everyone:
            raise UsageError(f"{source}: patients in no test fold: {_few(sorted(everyone - set(seen_test)))}")


def _few(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _as_patient(item: SplitPatient | Sequence) -> SplitPatient:
    if isinstance(item, SplitPatient):
        return item
    try:
        pid, n_stage, n_pos = item
    except (TypeError, ValueError) as exc:
        raise UsageError(f"a patient must be (patient_id, n_stage, n_positive), got {item!r}") from exc
    if pid is None or str(pid).strip() == "":
        raise UsageError(f"patient_id must be a non-empty string, got {pid!r}")
    if n_stage is None or int(n_stage) not in (0, 1, 2, 3) or int(n_stage) != n_stage:
        raise UsageError(f"n_stage of patient {pid!r} must be 0..3 for the stratified split, got {n_stage!r}")
    if n_pos is not None and (int(n_pos) != n_pos or int(n_pos) < 0):
        raise UsageError(f"n_positive of patient {pid!r} must be a count >= 0 or None, got {n_pos!r}")
    return SplitPatient(str(pid), int(n_stage), None if n_pos is None else int(n_pos))


def collapse_patients(patients: Iterable[SplitPatient | Sequence]) -> dict[str, SplitPatient]:
    """One entry per patient from one entry per scan.

    Scans of one patient that disagree are combined as the highest N-stage and the highest known number of
    positive stations (unknown only when unknown for every scan), with a warning.
    """
    out: dict[str, SplitPatient] = {}
    for item in patients:
        p = _as_patient(item)
        q = out.get(p.patient_id)
        if q is None:
            out[p.patient_id] = p
        elif q != p:
            known = [v for v in (p.n_positive, q.n_positive) if v is not None]
            merged = SplitPatient(p.patient_id, max(p.n_stage, q.n_stage), max(known) if known else None)
            log.warning("scans of patient %s have different labels (%s, %s); using N%d with %s positive stations",
                        p.patient_id, q, p, merged.n_stage, merged.n_positive)
            out[p.patient_id] = merged
    if not out:
        raise UsageError("cannot split an empty cohort")
    return out


def patients_from_rows(rows: Iterable[Any]) -> list[SplitPatient]:
    """(patient_id, n_stage, n_positive) from cohort rows (objects with patient_id, n_stage, positive_stations)."""
    out = []
    for r in rows:
        pos = getattr(r, "positive_stations", None)
        out.append(_as_patient((r.patient_id, r.n_stage, None if pos is None else len(pos))))
    return out


def cohort_fingerprint(patients: Iterable[SplitPatient]) -> str:
    """SHA-256 of the sorted (patient_id, n_stage, n_positive) triples."""
    text = "\n".join(f"{p.patient_id}\t{p.n_stage}\t{p.n_positive}"
                     for p in sorted(patients, key=lambda q: q.patient_id))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- strata -----------------------------------------------------------------------------------------------------

_UNKNOWN_KEY = 10**9  # sorts an unknown positive count after every known count


@dataclass
class _Bin:
    keys: list[tuple[int, int]]  # (n_stage, n_positive or _UNKNOWN_KEY), sorted
    members: list[str]

    @property
    def first(self) -> tuple[int, int]:
        return self.keys[0]

    @property
    def last(self) -> tuple[int, int]:
        return self.keys[-1]

    @property
    def name(self) -> str:
        def fmt(k: tuple[int, int]) -> str:
            return f"N{k[0]}:{'?' if k[1] == _UNKNOWN_KEY else k[1]}"

        lo, hi = self.first, self.last
        if lo == hi:
            return fmt(lo)
        if lo[0] == hi[0]:
            hi_text = "?" if hi[1] == _UNKNOWN_KEY else str(hi[1])
            return f"{fmt(lo)}-{hi_text}"
        return f"{fmt(lo)}-{fmt(hi)}"


def _stratum_sort_key(name: str) -> tuple:
    first = name.split("-")[0]
    n, c = first[1:].split(":")
    return (int(n), _UNKNOWN_KEY if c == "?" else int(c), name)


def assign_strata(patients: dict[str, SplitPatient], min_stratum_size: int) -> dict[str, str]:
    """Stratum name of every patient after merging rare strata by the rule in MERGE_RULE."""
    if min_stratum_size < 1:
        raise UsageError(f"min_stratum_size must be >= 1, got {min_stratum_size}")
    by_key: dict[tuple[int, int], list[str]] = defaultdict(list)
    for p in sorted(patients.values(), key=lambda q: q.patient_id):
        by_key[(p.n_stage, _UNKNOWN_KEY if p.n_positive is None else p.n_positive)].append(p.patient_id)
    bins = [_Bin([k], list(v)) for k, v in sorted(by_key.items())]

    # 1. rare unknown-count strata join the largest known stratum of their N-stage
    for b in [b for b in bins if b.first[1] == _UNKNOWN_KEY and len(b.members) < min_stratum_size]:
        known = [c for c in bins if c.first[0] == b.first[0] and c.first[1] != _UNKNOWN_KEY]
        if known:
            target = max(known, key=lambda c: (len(c.members), -c.first[1]))
            target.members.extend(b.members)
            bins.remove(b)

    # 2. merge the last rare stratum into its neighbour until none is rare
    while len(bins) > 1:
        rare = [i for i, b in enumerate(bins) if len(b.members) < min_stratum_size]
        if not rare:
            break
        i = rare[-1]
        b = bins[i]
        stage = b.first[0]
        lower = i - 1 if i > 0 else None
        higher = i + 1 if i + 1 < len(bins) else None
        if lower is not None and bins[lower].last[0] == stage:
            j = lower
        elif higher is not None and bins[higher].first[0] == stage:
            j = higher
        else:
            j = lower if lower is not None else higher
        t = bins[j]
        merged = _Bin(sorted(t.keys + b.keys), t.members + b.members)
        lo, hi = min(i, j), max(i, j)
        bins[lo:hi + 1] = [merged]

    return {pid: b.name for b in bins for pid in b.members}


# --- making, writing, reading -------------------------------------------------------------------------------------


def make_split(
    patients: Iterable[SplitPatient | Sequence],
    n_folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.25,
    min_stratum_size: int | None = None,
) -> Split:
    """Stratified patient-level k-fold split (see the module docstring for the rules).

    ``patients``: (patient_id, n_stage, n_positive) per patient or per scan (scans of a patient are collapsed).
    ``val_fraction``: share of each fold's non-test patients that forms its validation set.
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise UsageError(f"n_folds (--folds) must be an integer >= 2, got {n_folds!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    table = collapse_patients(patients)
    if len(table) < n_folds:
        raise UsageError(f"cannot make {n_folds} folds from {len(table)} patient(s); need at least {n_folds}")
    min_size = n_folds if min_stratum_size is None else int(min_stratum_size)
    strata = assign_strata(table, min_size)

    members: dict[str, list[str]] = defaultdict(list)
    for pid in sorted(table):
        members[strata[pid]].append(pid)
    names = sorted(members, key=_stratum_sort_key)

    rng = np.random.default_rng(seed)
    test_fold: dict[str, int] = {}
    pos = 0
    for name in names:
        ids = members[name]
        for j in rng.permutation(len(ids)):
            test_fold[ids[j]] = pos % n_folds
            pos += 1

    folds = []
    for k in range(n_folds):
        test = sorted(p for p, f in test_fold.items() if f == k)
        rest_by_stratum = {name: [p for p in members[name] if test_fold[p] != k] for name in names}
        n_rest = sum(len(v) for v in rest_by_stratum.values())
        quotas = _largest_remainder([len(rest_by_stratum[n]) * val_fraction for n in names],
                                    round(n_rest * val_fraction))
        frng = np.random.default_rng([seed, k])
        validation: list[str] = []
        for name, q in zip(names, quotas, strict=True):
            ids = rest_by_stratum[name]
            order = frng.permutation(len(ids))
            validation.extend(ids[j] for j in order[:q])
        vset = set(validation)
        train = sorted(p for name in names for p in rest_by_stratum[name] if p not in vset)
        folds.append(Fold(k, train, sorted(validation), test))

    split = Split(n_folds=int(n_folds), seed=int(seed), val_fraction=float(val_fraction),
                  min_stratum_size=min_size, patients=table, strata=strata, folds=folds)
    split.validate()
    log.info("split: %d patients, %d folds, strata %s", len(table), n_folds, split.stratum_counts())
    return split


def _largest_remainder(ideal: Sequence[float], total: int) -> list[int]:
    """Integers that sum to ``total`` and round ``ideal`` by largest remainder (ties: earlier first)."""
    base = [int(np.floor(x)) for x in ideal]
    short = max(0, min(total - sum(base), len(ideal)))
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - base[i]), i))
    for i in order[:short]:
        base[i] += 1
    return base


def split_csv_text(split: Split) -> str:
    """The split as CSV: one row per patient with its stratum, test fold and its set in every fold."""
    buf = io.StringIO()
    buf.write(f"# {SPLIT_FORMAT} v{split.version} n_folds={split.n_folds} seed={split.seed} "
              f"val_fraction={split.val_fraction} min_stratum_size={split.min_stratum_size}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "n_stage", "n_positive", "stratum", "test_fold",
                *[f"fold_{k}" for k in range(split.n_folds)]])
    roles = [{pid: role for role in ROLES for pid in f.ids(role)} for f in split.folds]
    for pid in sorted(split.patients):
        p = split.patients[pid]
        test_fold = next(k for k, r in enumerate(roles) if r[pid] == "test")
        w.writerow([pid, p.n_stage, "" if p.n_positive is None else p.n_positive, split.strata[pid],
                    test_fold, *[r[pid] for r in roles]])
    return buf.getvalue()


def write_split(split: Split, path: str | Path) -> Path:
    """Write the split atomically: ``path`` (.json) and the same name with .csv."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise UsageError(f"split file must end in .json, got {path}")
    write_json(path, split.to_dict())
    write_text(path.with_suffix(".csv"), split_csv_text(split))
    return path


def read_split(path: str | Path) -> Split:
    """Read a split written by write_split (the .json, or the .csv beside it)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"split file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return _read_split_csv(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"split file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"split file {path}: expected a JSON object")
    return Split.from_dict(data, source=f"split file {path}")


def _read_split_csv(path: Path) -> Split:
    source = f"split file {path}"
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith(f"# {SPLIT_FORMAT}"):
        raise UsageError(f"{source}: first line must be '# {SPLIT_FORMAT} v1 n_folds=... seed=...'")
    params = dict(item.split("=", 1) for item in lines[0].split()[3:] if "=" in item)
    try:
        n_folds = int(params["n_folds"])
        rows = list(csv.DictReader(lines[1:]))
        folds = [{"fold": k, "train": [], "validation": [], "test": []} for k in range(n_folds)]
        patients = []
        for r in rows:
            patients.append({"patient_id": r["patient_id"], "n_stage": int(r["n_stage"]),
                             "n_positive": int(r["n_positive"]) if r["n_positive"] != "" else None,
                             "stratum": r["stratum"]})
            for k in range(n_folds):
                folds[k][r[f"fold_{k}"]].append(r["patient_id"])
        data = {"format": SPLIT_FORMAT, "version": int(lines[0].split()[2].lstrip("v")), "n_folds": n_folds,
                "seed": int(params["seed"]), "val_fraction": float(params["val_fraction"]),
                "min_stratum_size": int(params["min_stratum_size"]), "patients": patients, "folds": folds}
    except (KeyError, ValueError, IndexError) as exc:
        raise UsageError(f"{source}: malformed split CSV ({type(exc).__name__}: {exc})") from exc
    return Split.from_dict(data, source=source)


def load_or_make_split(
    path: str | Path,
    patients: Iterable[SplitPatient | Sequence],
    n_folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.25,
    min_stratum_size: int | None = None,
) -> Split:
    """Reuse the split at ``path`` if it exists (it must match the cohort and parameters), else make and write it."""
    path = Path(path)
    patients = list(patients)
    if path.exists():
        split = read_split(path)
        source = f"split file {path}"
        asked = {"n_folds": n_folds, "seed": seed, "val_fraction": val_fraction}
        if min_stratum_size is not None:
            asked["min_stratum_size"] = min_stratum_size
        for name, value in asked.items():
            if getattr(split, name) != value:
                raise UsageError(f"{source} was made with {name}={getattr(split, name)!r}, but {name}={value!r} "
                                 "was asked for; pass the same value or remove the file")
        split.check_matches(patients, source=source)
        log.info("reusing %s", source)
        return split
    split = make_split(patients, n_folds=n_folds, seed=seed, val_fraction=val_fraction,
                       min_stratum_size=min_stratum_size)
    write_split(split, path)
    return split
