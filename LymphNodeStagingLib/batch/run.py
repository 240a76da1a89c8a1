"""Cohort runs: every row of a cohort CSV through the pipeline steps, resumable, in parallel, locally or on Dask.

Steps (each cached per case, see ``case_cache``):

  suv       load CT and PET, PET in SUV (a DICOM series converted, QIBA; a PET image file only when declared SUV,
            see suv.inputs.decide_pet_is_suv) -> pet_suv.nii.gz (+ ct.nii.gz for a DICOM CT), suv.json
  anatomy   the cohort's anatomy_path (loaded into the TotalSegmentator vocabulary) or a TotalSegmentator run
            -> anatomy.nii.gz
  stations  station mapping (--method atlas: multi-atlas registration; network: the station network from the CT,
            no anatomy step; both: the atlas map, the network map in network/ and agreement.json)
            -> stations.nii.gz, vote_fractions.nii.gz, centroids.json, mapping.json
  assess    patches, classifier, SUV figures, staging -> result.json, result.csv, stations.nii.gz, overview.png

Output folder::

  OUT/batch.json                       parameters and versions of the last run, counts
  OUT/summary.csv, OUT/summary.json    one row per cohort row, in cohort order
  OUT/report.png                       N-stage distribution and per-station positivity
  OUT/cases/<scan_id>/case.json        the case manifest (status, step keys, timings, error)
  OUT/cases/<scan_id>/<step>/          the step's files and step.json

A later step always reads the cached files of the steps before it (never objects held in memory), so a case
resumed after a kill gives bit-for-bit the result of an uninterrupted run.

This module imports only the standard library at the top: a spawned worker sets its thread limits before numpy,
torch or SimpleITK are loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, LNSError, UsageError
from ..io.files import fingerprint, write_json
from ..mapping.store import atlas_set_identity
from ..runtime import ProgressCallback, limit_threads, parse_device, reporter
from ..suv.inputs import decide_pet_is_suv, parse_pet_is_suv, pet_is_suv_name
from .cache import CaseCache, StepSpec, clean_partial

log = logging.getLogger(__name__)


STEPS: tuple[str, ...] = ("suv", "anatomy", "stations", "assess")
DEPENDS: dict[str, tuple[str, ...]] = {"suv": (), "anatomy": (), "stations": ("suv", "anatomy"),
                                       "assess": ("suv", "anatomy", "stations")}
#: Version of each step's computation in this module; raise it when a step's output changes for the same inputs.
STEP_VERSIONS: dict[str, int] = {"suv": 1, "anatomy": 1, "stations": 1, "assess": 1}
SUMMARY_FORMAT = "lnstaging-batch-summary"
#: How often a case whose worker process died (killed, out of memory) is tried again in a fresh process.
MAX_WORKER_DEATHS = 2
OK, FAILED, PENDING = "ok", "failed", "pending"


# ------------------------------------------------------------------------------------------------ options, tasks


def parse_steps(steps: str | Sequence[str] | None) -> list[str]:
    """The steps to run, in pipeline order, with the steps they depend on added (None: all steps)."""
    if steps is None:
        wanted = list(STEPS)
    else:
        items = steps.split(",") if isinstance(steps, str) else list(steps)
        wanted = [s.strip().lower() for s in items if s and s.strip()]
        bad = [s for s in wanted if s not in STEPS]
        if bad or not wanted:
            raise UsageError(f"steps {','.join(items) if items else '(empty)'!s}: unknown step(s) "
                             f"{', '.join(bad) or '(none given)'}; expected a comma-separated subset of "
                             f"{','.join(STEPS)}")
    closure: set[str] = set()
    stack = list(wanted)
    while stack:
        s = stack.pop()
        if s not in closure:
            closure.add(s)
            stack.extend(DEPENDS[s])
    return [s for s in STEPS if s in closure]


@dataclass
class BatchOptions:
    """Parameters of a cohort run that every case shares (plain data: sent to worker processes)."""

    steps: list[str]
    device: str = "cpu"  # torch device name
    model: str | None = None
    atlases: str | None = None
    rules: str = "ajcc8"
    pet_is_suv: bool | None = None  # None: the row's pet_is_suv column decides (see suv.inputs.decide_pet_is_suv)
    suv_mode: str = "qiba"
    registration: dict = field(default_factory=dict)  # RegistrationConfig overrides (e.g. iterations)
    threads: int = 1  # threads per worker
    atlas_fingerprint: dict | None = None
    map_store: str | None = None  # the shared station-map store (None: the default in the user cache)
    model_fingerprint: dict | None = None
    method: str = "atlas"  # station mapping: atlas | network | both
    station_model: str | None = None  # station network checkpoint (method network/both)
    station_model_fingerprint: dict | None = None


@dataclass
class CaseTask:
    """One case to process: the cohort row (plain strings), its folder and the keys of its steps."""

    index: int
    scan_id: str
    row: dict[str, Any]
    case_dir: str
    options: BatchOptions
    specs: dict[str, dict] = field(default_factory=dict)  # step -> StepSpec as dict

    def spec(self, step: str) -> StepSpec:
        return StepSpec(**self.specs[step])

    @property
    def keys(self) -> dict[str, str]:
        return {s: self.spec(s).key for s in self.options.steps}


def _row_dict(row) -> dict[str, Any]:
    from ..staging.rules import N_STAGES

    d = {"line": row.line, "patient_id": row.patient_id, "study": row.study, "series": row.series,
         "n_stage": None if row.n_stage is None else N_STAGES[row.n_stage],
         "positive_stations": None if row.positive_stations is None else list(row.positive_stations),
         "tumour_side": row.tumour_side}
    for col in ("ct_path", "pet_path", "anatomy_path"):
        v = getattr(row, col)
        d[col] = None if v is None else str(v)
    d["pet_is_suv"] = row.pet_is_suv
    d["scan_id"] = row.scan_id
    return d


def case_specs(row: dict[str, Any], options: BatchOptions) -> dict[str, StepSpec]:
    """The step specifications (and so the keys) of one case; InputError for a PET that cannot be used."""
    ct_is_dicom = bool(row["ct_path"]) and Path(row["ct_path"]).is_dir()
    pet_is_suv = decide_pet_is_suv(row.get("pet_path"), column=row.get("pet_is_suv"), flag=options.pet_is_suv,
                                   where=f"line {row.get('line')} ({row.get('scan_id') or row.get('patient_id')})")
    declared = row.get("pet_is_suv") is not None or options.pet_is_suv is not None
    specs: dict[str, StepSpec] = {}
    # "auto": a DICOM series converted from its header (the value of earlier runs, kept so their caches stay valid)
    suv_params = {"pet_is_suv": pet_is_suv, "pet_is_suv_by": "user" if declared else "auto",
                  "suv_mode": options.suv_mode}
    specs["suv"] = StepSpec("suv", STEP_VERSIONS["suv"], suv_params,
                            {"ct": fingerprint(row["ct_path"]), "pet": fingerprint(row["pet_path"])})
    # the CT as the later steps see it: the cached CT of a DICOM series, else the CT file itself
    ct_dep_inputs = {} if ct_is_dicom else {"ct": fingerprint(row["ct_path"])}
    ct_dep_upstream = {"suv": specs["suv"].key} if ct_is_dicom else {}
    if row.get("anatomy_path"):
        specs["anatomy"] = StepSpec("anatomy", STEP_VERSIONS["anatomy"], {"source": "given"},
                                    {"anatomy": fingerprint(row["anatomy_path"])})
    else:
        specs["anatomy"] = StepSpec("anatomy", STEP_VERSIONS["anatomy"], {"source": "totalsegmentator", "fast": True},
                                    ct_dep_inputs, ct_dep_upstream)
    if options.method == "network":  # from the CT alone: no anatomy, no atlases
        specs["stations"] = StepSpec(
            "stations", STEP_VERSIONS["stations"], {"method": "network"},
            {"station_model": options.station_model_fingerprint, **ct_dep_inputs}, ct_dep_upstream)
    else:  # the parameters of an atlas run are those of earlier versions, so their caches stay valid
        extra = {} if options.method == "atlas" else {"method": options.method,
                                                      "station_model": options.station_model_fingerprint}
        specs["stations"] = StepSpec(
            "stations", STEP_VERSIONS["stations"],
            {"registration": options.registration, **extra},
            {"atlases": options.atlas_fingerprint, **ct_dep_inputs},
            {"anatomy": specs["anatomy"].key, **ct_dep_upstream})
    specs["assess"] = StepSpec(
        "assess", STEP_VERSIONS["assess"], {"rules": options.rules, "model": options.model_fingerprint},
        {}, {"suv": specs["suv"].key, "anatomy": specs["anatomy"].key, "stations": specs["stations"].key})
    return specs


# ------------------------------------------------------------------------------------------------ worker side


def registration_config(overrides: dict, threads: int):
    """The RegistrationConfig of the stations step: the library defaults with the given field overrides."""
    from ..mapping.registration import RegistrationConfig

    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    return RegistrationConfig(**kw, threads=threads)


def _check_registration(overrides: dict | None) -> dict:
    from dataclasses import fields

    from ..mapping.registration import RegistrationConfig

    overrides = dict(overrides or {})
    allowed = {f.name for f in fields(RegistrationConfig)} - {"structures", "threads"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise UsageError(f"registration settings {', '.join(bad)} are unknown; expected some of {sorted(allowed)}")
    clean = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(overrides.items())}
    try:
        registration_config(clean, 1)
    except (TypeError, LNSError) as exc:
        raise UsageError(f"registration settings {clean}: {exc}") from None
    return clean


def _init_worker(threads: int) -> None:
    limit_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


_ATLAS_SETS: dict[str, Any] = {}


def _atlas_set(path: str):
    """The atlas set of this worker process, loaded once (its prepared atlases are reused for every case)."""
    if path not in _ATLAS_SETS:
        from ..mapping.atlas import load_atlas_set

        _ATLAS_SETS[path] = load_atlas_set(path, allow_missing_stations=True)
    return _ATLAS_SETS[path]


_STATION_MODELS: dict[str, Any] = {}


def _station_model(path: str | None, device: str):
    """The station network of this worker process, loaded once."""
    key = f"{path}|{device}"
    if key not in _STATION_MODELS:
        from ..stationnet.model import load_station_model

        _STATION_MODELS[key] = load_station_model(path, device)
    return _STATION_MODELS[key]


class _CaseRun:
    """The steps of one case, each reading what the previous steps cached."""

    def __init__(self, task: CaseTask) -> None:
        self.task = task
        self.row = task.row
        self.opt = task.options
        self.cache = CaseCache(task.case_dir)
        self.ct_is_dicom = bool(self.row["ct_path"]) and Path(self.row["ct_path"]).is_dir()
        self.checked = None  # preflight.CheckedCase: the row's inputs, checked and loaded before the first step

    # ----- cached inputs of later steps
    def ct_file(self) -> Path:
        if self.ct_is_dicom:
            return self.cache.step_dir("suv") / "ct.nii.gz"
        return Path(self.row["ct_path"])

    def ct(self):
        from ..io.images import read_image_file

        return read_image_file(self.ct_file())

    def pet(self):
        from ..io.images import read_image_file

        return read_image_file(self.cache.step_dir("suv") / "pet_suv.nii.gz")

    def anatomy(self):
        import SimpleITK as sitk

        return sitk.ReadImage(str(self.cache.step_dir("anatomy") / "anatomy.nii.gz"))

    # ----- the steps
    def suv(self, out: Path) -> dict:
        from ..io.files import write_image
        from ..suv.inputs import load_case

        spec = self.task.spec("suv")
        if self.checked is not None:  # loaded by the preflight with the same declaration and SUV mode
            case = self.checked.case
        else:
            case = load_case(self.row["ct_path"], self.row["pet_path"], pet_is_suv=spec.params["pet_is_suv"],
                             suv_mode=spec.params["suv_mode"])
        write_image(case.pet, out / "pet_suv.nii.gz")
        if self.ct_is_dicom:
            write_image(case.ct, out / "ct.nii.gz")
        write_json(out / "suv.json", {"provenance": case.suv, "geometry": case.geometry(),
                                      "ct_series_uid": case.ct_series_uid, "pet_series_uid": case.pet_series_uid,
                                      "ct_cached": self.ct_is_dicom})
        return {"suv_mode": case.suv.get("mode"), "warnings": list(case.suv.get("warnings", []))}

    def anatomy_step(self, out: Path) -> dict:
        from ..anatomy.totalsegmentator import run_totalsegmentator
        from ..anatomy.vocabulary import load_anatomy
        from ..io.files import write_image

        if self.row.get("anatomy_path"):
            img = load_anatomy(self.row["anatomy_path"])
            write_image(img, out / "anatomy.nii.gz")
            source = "given"
        else:
            run_totalsegmentator(self.ct_file(), out / "anatomy.nii.gz",
                                 device=parse_device(self.opt.device, check=False).totalsegmentator, fast=True)
            source = "totalsegmentator"
        return {"source": source}

    def stations(self, out: Path) -> dict:
        """Station map from the shared store when this CT, anatomy and atlas set were mapped before (by any run,
        training or evaluation), else registered and filed there."""
        from ..mapping.station_mapping import map_stations, write_station_mapping
        from ..mapping.store import StationMapStore, station_map_key
        from ..runtime import torch_threads
        from ..stationnet.method import map_case

        if self.opt.method == "network":
            with torch_threads(self.opt.threads):
                run_ = map_case(self.ct(), "network", station_model=_station_model(self.opt.station_model,
                                                                                   self.opt.device),
                                device=self.opt.device, what=f"CT {self.ct_file()}")
            write_station_mapping(run_.mapping, out)
            return {"method": "network", "stations_mapped": len(run_.mapping.weight_maps),
                    "flags": {k: v for k, v in run_.mapping.flags.items() if v != "ok"}}
        anatomy_file = self.row.get("anatomy_path") or self.cache.step_dir("anatomy") / "anatomy.nii.gz"
        key = station_map_key(self.row["ct_path"], anatomy_file, self.opt.atlas_fingerprint or self.opt.atlases,
                              self.opt.registration)
        store = StationMapStore(self.opt.map_store)
        mapping = store.get(key)
        reused = mapping is not None
        if mapping is None:
            cfg = registration_config(self.opt.registration, self.opt.threads)
            mapping = map_stations(self.ct(), self.anatomy(), _atlas_set(self.opt.atlases), device=self.opt.device,
                                   config=cfg)
            store.put(key, mapping)
        write_station_mapping(mapping, out)
        present = sorted(mapping.weight_maps)
        done = {"stations_mapped": len(present), "flags": {k: v for k, v in mapping.flags.items() if v != "ok"},
                "from_store": reused}
        if self.opt.method == "both":
            from ..io.files import write_json

            with torch_threads(self.opt.threads):
                run_ = map_case(self.ct(), "both", station_model=_station_model(self.opt.station_model,
                                                                                self.opt.device),
                                device=self.opt.device, atlas_mapping=mapping, what=f"CT {self.ct_file()}")
            write_station_mapping(run_.network, out / "network")
            agreement = run_.to_dict()
            write_json(out / "agreement.json", agreement)
            done.update(method="both", agreement_dice_mean=agreement.get("agreement_dice_mean"))
        return done

    def assess(self, out: Path) -> dict:
        from ..assessment.assess import assess_case
        from ..mapping.station_mapping import read_station_mapping

        anatomy = self.anatomy() if "anatomy" in self.opt.steps else None  # none with --method network
        a = assess_case(self.ct(), self.pet(), self.row["tumour_side"], anatomy=anatomy,
                        model=self.opt.model, atlases=self.opt.atlases, rules=self.opt.rules, device=self.opt.device,
                        case_id=self.task.scan_id, out_dir=out,
                        station_mapping=read_station_mapping(self.cache.step_dir("stations")))
        return {"n_stage": a.result.n_stage}

    def preflight(self) -> None:
        """Check the row's input files (complete, finite, CT in HU, PET in SUV, grids, memory) before its first step
        reads them; the suv step uses the images loaded here. Steps that only read cached files need no check."""
        from ..preflight.case import check_row

        todo = [s for s in self.opt.steps if s != "assess" and self.cache.lookup(self.task.spec(s)) is None]
        if not todo:
            return
        spec = self.task.spec("suv")
        self.checked = check_row(self.row, pet_is_suv=spec.params["pet_is_suv"], suv_mode=spec.params["suv_mode"],
                                 atlases=self.opt.atlases, mapping="stations" in todo and self.opt.method != "network")

    def run(self) -> dict:
        """Run or reuse every step; write and return the case manifest (status ok or failed)."""
        from ..io.files import peak_memory_mb

        t_start = time.perf_counter()
        self.cache.folder.mkdir(parents=True, exist_ok=True)
        self.cache.clean_partial()
        work = {"suv": self.suv, "anatomy": self.anatomy_step, "stations": self.stations, "assess": self.assess}
        steps: dict[str, dict] = {}
        error = None
        t0 = time.perf_counter()
        try:
            self.preflight()
        except LNSError as exc:  # a file that cannot be used: the case fails at its first step, naming the file
            first = self.opt.steps[0]
            error = {"step": first, "type": type(exc).__name__, "message": str(exc).strip(), "traceback": ""}
            steps[first] = {"key": self.task.spec(first).key, "cached": False,
                            "seconds": round(time.perf_counter() - t0, 3)}
            log.warning("case %s: inputs refused: %s", self.task.scan_id, error["message"])
        for step in self.opt.steps if error is None else ():
            spec = self.task.spec(step)
            t0 = time.perf_counter()
            try:
                rec, cached = self.cache.get_or_compute(spec, work[step])
            except Exception as exc:  # noqa: BLE001 - one failing case must never stop the cohort
                error = {"step": step, "type": type(exc).__name__, "message": str(exc).strip() or repr(exc),
                         "traceback": traceback.format_exc(limit=8)}
                steps[step] = {"key": spec.key, "cached": False, "seconds": round(time.perf_counter() - t0, 3)}
                log.warning("case %s: step %s failed: %s", self.task.scan_id, step, error["message"])
                break
            steps[step] = {"key": rec.key, "cached": cached, "seconds": rec.seconds, "info": rec.info}
            if step == "suv":
                self.checked = None  # later steps read the cached files
        manifest = {
            "scan_id": self.task.scan_id, "row": self.row, "status": FAILED if error else OK,
            "steps_requested": self.opt.steps, "keys": self.task.keys, "steps": steps, "error": error,
            "result": None if error else _result_digest(self.cache),
            "library_version": _version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run": {"host": socket.gethostname(), "pid": os.getpid(), "threads": self.opt.threads,
                    "seconds": round(time.perf_counter() - t_start, 3), "peak_memory_mb": round(peak_memory_mb(), 1)},
        }
        self.cache.write_manifest(manifest)
        return self.cache.read_manifest() or manifest


def _version() -> str:
    from .. import __version__

    return __version__


def _result_digest(cache: CaseCache) -> dict | None:
    """The figures of a case that go into the cohort summary, read from its cached step files."""
    import json

    out: dict[str, Any] = {}
    mapping = cache.step_dir("stations") / "station_info.json"
    if mapping.is_file():
        info = json.loads(mapping.read_text(encoding="utf-8"))
        out["stations_mapped"] = sum(1 for v in info["voxels"].values() if int(v) > 0)
    res = cache.step_dir("assess") / "result.json"
    if res.is_file():
        r = json.loads(res.read_text(encoding="utf-8"))
        out.update({
            "n_stage": r.get("n_stage"), "tnm9": r.get("tnm9"), "rules": r.get("rules"),
            "threshold": r.get("threshold"), "deciding_stations": r.get("deciding_stations", []),
            "positive_stations": [s["name"] for s in r["stations"] if s.get("status") == "positive"],
            "probabilities": {s["name"]: s.get("probability") for s in r["stations"]},
            "learned_n_stage": r.get("learned_n_stage"),
        })
    return out or None


def process_case(task: CaseTask) -> dict:
    """Process one case in this process (the function that local workers and Dask workers run)."""
    limit_threads(task.options.threads)
    return _CaseRun(task).run()


def _failed_manifest(task: CaseTask, step: str, kind: str, message: str) -> dict:
    """Record a failure found outside the case's own process (a worker that died, a Dask error)."""
    cache = CaseCache(task.case_dir)
    manifest = {"scan_id": task.scan_id, "row": task.row, "status": FAILED, "steps_requested": task.options.steps,
                "keys": task.keys, "steps": {}, "error": {"step": step, "type": kind, "message": message,
                                                           "traceback": ""},
                "result": None, "library_version": _version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "run": {}}
    cache.write_manifest(manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ coordinator


@dataclass
class BatchSummary:
    """What a cohort run produced."""

    out_dir: Path
    rows: list[dict]  # one per cohort row, in cohort order (as in summary.csv)
    counts: dict[str, int]  # ok / failed / pending
    this_run: dict[str, int]  # computed / reused / retried / worker_deaths
    files: dict[str, Path]
    wall_s: float
    parameters: dict[str, Any]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == FAILED]

    def to_frame(self):
        """summary.csv as a pandas DataFrame: one row per cohort row, the summary columns."""
        import pandas as pd

        return pd.DataFrame([{k: r.get(k) for k in summary_columns()} for r in self.rows], columns=summary_columns())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["files"] = {k: str(v) for k, v in self.files.items()}
        return d


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (released by the OS if the process dies)."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    fh = (out_dir / ".batch.lock").open("a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"output folder {out_dir} is in use by another running batch (lock .batch.lock); "
                             "wait for it or choose another --out") from None
        yield
    finally:
        fh.close()


def _case_folder_name(scan_id: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in scan_id).strip(".") or "case"
    return name


def _invalid_row(row, problems: list[str], step: str = "cohort", kind: str = "InputError") -> dict:
    """The manifest of a row refused before any work (kept in the summary only, nothing is written)."""
    return {"scan_id": row.scan_id, "row": _row_dict(row), "status": FAILED, "steps": {}, "result": None,
            "error": {"step": step, "type": kind, "message": "; ".join(problems), "traceback": ""},
            "run": {}}


def run_batch(
    cohort_csv: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    device: str = "cpu",
    model: str | Path | None = None,
    atlases: str | Path | None = None,
    steps: str | Sequence[str] | None = None,
    scheduler: Any = None,
    retry_failed: bool = False,
    rules: str = "ajcc8",
    progress: ProgressCallback | None = None,
    threads_per_worker: int | None = None,
    pet_is_suv: bool | str | None = None,
    suv_mode: str = "qiba",
    registration: dict | None = None,
    map_store: str | Path | None = None,
    method: str = "atlas",
    station_model: str | Path | None = None,
) -> BatchSummary:
    """Run the pipeline steps for every row of a cohort CSV; resumable, parallel, one folder per case.

    ``workers``: local worker processes (0: in this process). ``scheduler``: None for local processes, "local" for
    a Dask LocalCluster with ``workers`` workers, an address such as "tcp://host:8786", or a distributed.Client.
    ``steps``: subset of suv,anatomy,stations,assess (dependencies are added). A case whose steps are complete with
    the current parameters is reused; a failed case is kept as failed unless ``retry_failed`` or its parameters
    changed. ``registration``: RegistrationConfig field overrides, e.g. {"iterations": [60, 40]}. ``map_store``:
    the station-map store shared with training and evaluation (None: the default in the user cache).
    ``method``: station mapping by "atlas" (registration, default), "network" (the station network from the CT
    alone; the anatomy step is left out) or "both" (the atlas map is used; the network map and the per-station
    agreement are kept in the stations step); ``station_model``: its checkpoint (None: the bundled one).
    ``pet_is_suv`` (or "declared", "yes", "no"): None lets the cohort's pet_is_suv column decide per row; a row
    without it has its DICOM PET converted to SUV and its PET image file refused (a failed case naming the file:
    an image file has no header to compute SUV from). True takes every PET as SUV; False takes none (DICOM PET is
    converted, image files are refused). A row whose column contradicts True/False fails the same way.
    ``progress`` receives a :class:`~LymphNodeStagingLib.runtime.Progress` in cases: once before the first case
    and after every case.
    """
    from ..cohort.table import read_cohort
    from ..io.files import check_output
    from ..preflight.parameters import check_model, check_rules
    from ..stationnet.method import check_method, needs_network

    t_start = time.perf_counter()
    report = reporter(progress)
    method = check_method(method, "method")
    step_list = parse_steps(steps)
    if method == "network":  # the network maps from the CT alone: no anatomy (no TotalSegmentator run)
        step_list = [s for s in step_list if s != "anatomy"]
    tdev = parse_device(device).torch
    check_rules(rules, "rules")  # fails early for an unknown rule set
    check_output(out_dir, folder=True, parameter="out_dir")
    if not Path(cohort_csv).is_file():
        raise InputError(f"cohort file {cohort_csv} does not exist")
    if workers < 0:
        raise UsageError(f"workers {workers}: expected 0 (in this process) or more")
    if threads_per_worker is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads_per_worker = max(1, cores // max(1, workers))
    if threads_per_worker < 1:
        raise UsageError(f"threads_per_worker {threads_per_worker}: expected 1 or more")
    if "assess" in step_list:
        try:
            import importlib

            importlib.import_module("..assessment.assess", __package__)
        except ImportError as exc:
            raise UsageError(f"the assess step is not available ({exc}); run --steps suv,anatomy,stations") from None
    station_model_used: str | None = None
    station_fp = None
    if "stations" in step_list and needs_network(method):
        from ..stationnet.model import check_station_model

        net = check_station_model(station_model, tdev, "station_model")  # loaded and verified before any case
        station_model_used = str(Path(net.path).resolve())
        station_fp = fingerprint(net.path)
    atlas_path: str | None = None
    if "stations" in step_list and method != "network":
        from ..mapping.atlas import resolve_atlas_set

        atlas_path = str(Path(resolve_atlas_set(atlases, validate=False).root).resolve())
    model_fp = None
    model_used: str | None = None
    if "assess" in step_list:
        from ..paths import demo_model_path

        model_file = Path(model) if model else demo_model_path()
        if not model_file.is_file():
            raise UsageError(f"model {model_file} does not exist; pass a checkpoint made by `lnstaging train` "
                             "(--model), or run only --steps suv,anatomy,stations")
        check_model(model_file, parameter="model")  # loaded and verified before any case
        model_used = str(model_file.resolve())
        model_fp = fingerprint(model_file)  # the bundled model too: a new bundled model recomputes assess
    opts = BatchOptions(steps=step_list, device=tdev, model=model_used if model else None, atlases=atlas_path,
                        rules=rules, pet_is_suv=parse_pet_is_suv(pet_is_suv), suv_mode=suv_mode,
                        registration=_check_registration(registration),
                        threads=int(threads_per_worker),
                        atlas_fingerprint=atlas_set_identity(atlas_path) if atlas_path else None,
                        model_fingerprint=model_fp, map_store=str(map_store) if map_store else None,
                        method=method, station_model=station_model_used, station_model_fingerprint=station_fp)

    cohort = read_cohort(cohort_csv, rules=rules)
    out = Path(out_dir)
    parameters = {"cohort": str(Path(cohort_csv).resolve()), "steps": step_list, "device": tdev,
                  "model": model_used, "atlases": atlas_path, "rules": rules, "method": method,
                  "station_model": station_model_used,
                  "pet_is_suv": pet_is_suv_name(opts.pet_is_suv),
                  "suv_mode": suv_mode, "registration": opts.registration,
                  "workers": workers, "threads_per_worker": opts.threads,
                  "scheduler": scheduler if isinstance(scheduler, (str, type(None))) else type(scheduler).__name__,
                  "retry_failed": retry_failed, "library_version": _version()}
    with _lock(out):
        clean_partial(out)
        (out / "cases").mkdir(exist_ok=True)
        clean_partial(out / "cases", recursive=True)
        problems_by_line: dict[int, list[str]] = {}
        for p in cohort.errors:
            if p.line is not None:
                problems_by_line.setdefault(p.line, []).append(p.message)
        manifests: list[dict | None] = [None] * len(cohort.rows)
        tasks: list[CaseTask] = []
        folders: dict[str, int] = {}
        reused = retried = 0
        for i, row in enumerate(cohort.rows):
            if not row.valid:
                manifests[i] = _invalid_row(row, problems_by_line.get(row.line, ["invalid row"]))
                continue
            name = _case_folder_name(row.scan_id)
            if name in folders:
                manifests[i] = _invalid_row(row, [f"case folder name {name!r} is already used by line "
                                                  f"{cohort.rows[folders[name]].line}"])
                continue
            folders[name] = i
            rd = _row_dict(row)
            try:
                specs = case_specs(rd, opts)
            except InputError as exc:
                manifests[i] = _invalid_row(row, [str(exc)], "suv", type(exc).__name__)
                continue
            except LNSError as exc:
                manifests[i] = _invalid_row(row, [str(exc)])
                continue
            task = CaseTask(i, row.scan_id, rd, str(out / "cases" / name), opts,
                            {k: asdict(v) for k, v in specs.items()})
            cache = CaseCache(task.case_dir)
            prev = cache.read_manifest()
            if prev is not None and prev.get("keys") == task.keys:
                if prev.get("status") == OK and cache.steps_complete(task.keys):
                    manifests[i] = prev
                    reused += 1
                    continue
                if prev.get("status") == FAILED and not retry_failed:
                    manifests[i] = prev
                    reused += 1
                    continue
                if prev.get("status") == FAILED:
                    retried += 1
            tasks.append(task)

        n_total = len(cohort.rows)
        done = n_total - len(tasks)
        report(done, f"{done}/{n_total} cases complete or reused; {len(tasks)} to run", n_total)
        t_run = time.perf_counter()
        deaths = 0
        ran = 0

        def finished(task: CaseTask, manifest: dict) -> None:
            nonlocal done, ran
            manifests[task.index] = manifest
            done += 1
            ran += 1
            rate = (time.perf_counter() - t_run) / max(1, ran)
            eta = rate * (n_total - done)
            report(done, f"{task.scan_id}: {manifest['status']}, ETA {_hms(eta)}", n_total)

        try:
            if not tasks:
                pass
            elif scheduler is not None:
                _run_dask(tasks, scheduler, workers, finished)
            elif workers == 0:
                limit_threads(opts.threads)
                for task in tasks:
                    finished(task, _CaseRun(task).run())
            else:
                deaths = _run_pool(tasks, workers, opts.threads, finished)
        finally:
            rows = [_summary_row(m, out) if m is not None else _pending_row(cohort.rows[i], out)
                    for i, m in enumerate(manifests)]
            counts = {s: sum(1 for r in rows if r["status"] == s) for s in (OK, FAILED, PENDING)}
            this_run = {"computed": ran, "reused": reused, "retried": retried, "worker_deaths": deaths}
            files = _write_outputs(out, rows, counts, this_run, parameters, step_list)
        return BatchSummary(out, rows, counts, this_run, files, round(time.perf_counter() - t_start, 3), parameters)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _run_pool(tasks: list[CaseTask], workers: int, threads: int, finished: Callable[[CaseTask, dict], None]) -> int:
    """Local worker processes (spawn); at most ``workers`` cases in flight. Returns the number of worker deaths."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))

    pending = deque(tasks)
    inflight: dict[Any, CaseTask] = {}
    deaths: dict[int, int] = {}
    n_deaths = 0
    pool = new_pool()
    try:
        while pending or inflight:
            while pending and len(inflight) < workers:
                t = pending.popleft()
                inflight[pool.submit(process_case, t)] = t
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            broken = False
            for f in done:
                t = inflight.pop(f)
                try:
                    finished(t, f.result())
                except BrokenProcessPool:
                    broken = True
                    n_deaths += 1
                    deaths[t.index] = deaths.get(t.index, 0) + 1
                    if deaths[t.index] >= MAX_WORKER_DEATHS:
                        finished(t, _failed_manifest(t, "worker", "WorkerDied",
                                                     f"the worker process died {deaths[t.index]} times while "
                                                     "processing this case (killed, or out of memory)"))
                    else:
                        pending.appendleft(t)
                except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be sent back
                    finished(t, _failed_manifest(t, "worker", type(exc).__name__, str(exc)))
            if broken:
                for f, t in list(inflight.items()):  # the other cases of the broken pool are tried again
                    f.cancel()
                    pending.appendleft(t)
                inflight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return n_deaths


def _run_dask(tasks: list[CaseTask], scheduler: Any, workers: int,
              finished: Callable[[CaseTask, dict], None]) -> None:
    """Submit every case to a Dask cluster: an address, "local" (a LocalCluster here) or a distributed.Client."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise UsageError(f"scheduler {scheduler!r} needs dask.distributed ({exc})") from None
    cluster = None
    own_client = True
    if isinstance(scheduler, Client):
        client, own_client = scheduler, False
    elif scheduler == "local":
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    elif isinstance(scheduler, str):
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise UsageError(f"scheduler {scheduler}: cannot connect ({exc}); expected the address of a running "
                             "Dask scheduler, e.g. tcp://host:8786, or 'local'") from None
    else:
        raise UsageError(f"scheduler {scheduler!r}: expected 'local', an address tcp://host:port or a Client")
    try:
        futures = {client.submit(process_case, t, key=f"lnstaging-case-{t.index}-{t.scan_id}-{os.getpid()}",
                                 pure=False): t for t in tasks}
        for f in as_completed(futures):
            t = futures[f]
            try:
                finished(t, f.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker, lost connection, ...
                finished(t, _failed_manifest(t, "worker", type(exc).__name__, str(exc)))
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------------ summary


def summary_columns() -> list[str]:
    from ..staging.stations import STATION_NAMES

    return (["scan_id", "patient_id", "study", "series", "status", "error_step", "error", "n_stage", "tnm9",
             "positive_stations", "deciding_stations", "stations_mapped", "n_stage_reference",
             "positive_stations_reference", "tumour_side"] + [f"p_{s}" for s in STATION_NAMES]
            + [f"time_{s}_s" for s in STEPS] + ["time_total_s", "case_dir"])


def _summary_row(m: dict, out: Path) -> dict:
    from ..staging.stations import STATION_NAMES

    row = m.get("row") or {}
    res = m.get("result") or {}
    err = m.get("error") or {}
    probs = res.get("probabilities") or {}
    ref_pos = row.get("positive_stations")
    d: dict[str, Any] = {
        "scan_id": m.get("scan_id", ""), "patient_id": row.get("patient_id", ""), "study": row.get("study", ""),
        "series": row.get("series", ""), "status": m.get("status", FAILED),
        "error_step": err.get("step", ""), "error": (f"{err.get('type')}: {err.get('message')}" if err else ""),
        "n_stage": res.get("n_stage") or "", "tnm9": res.get("tnm9") or "",
        "positive_stations": ";".join(res.get("positive_stations") or []),
        "deciding_stations": ";".join(res.get("deciding_stations") or []),
        "stations_mapped": res.get("stations_mapped", ""),
        "n_stage_reference": row.get("n_stage") or "",
        "positive_stations_reference": "unknown" if ref_pos is None else ";".join(ref_pos),
        "tumour_side": row.get("tumour_side") or "",
    }
    for s in STATION_NAMES:
        p = probs.get(s)
        d[f"p_{s}"] = "" if p is None else round(float(p), 6)
    steps = m.get("steps") or {}
    for s in STEPS:
        d[f"time_{s}_s"] = steps[s]["seconds"] if s in steps else ""
    d["time_total_s"] = round(sum(float(v["seconds"]) for v in steps.values()), 3) if steps else ""
    name = _case_folder_name(m["scan_id"]) if m.get("scan_id") else ""
    d["case_dir"] = f"cases/{name}" if name and (out / "cases" / name).is_dir() else ""
    return d


def _pending_row(row, out: Path) -> dict:
    d = _summary_row({"scan_id": row.scan_id, "row": _row_dict(row), "status": PENDING}, out)
    return d


def _write_outputs(out: Path, rows: list[dict], counts: dict, this_run: dict, parameters: dict,
                   steps: list[str]) -> dict[str, Path]:
    import csv
    import io

    from ..io.files import write_text
    from .report import write_report

    cols = summary_columns()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cols})
    files = {"summary_csv": write_text(out / "summary.csv", buf.getvalue())}
    failures = [{"scan_id": r["scan_id"], "step": r["error_step"], "error": r["error"]}
                for r in rows if r["status"] == FAILED]
    files["summary_json"] = write_json(out / "summary.json", {
        "format": SUMMARY_FORMAT, "format_version": 1, "parameters": parameters, "counts": counts,
        "failures": failures, "cases": rows})
    files["report_png"] = write_report(rows, out / "report.png", steps)
    files["batch_json"] = write_json(out / "batch.json", {
        "format": "lnstaging-batch", "format_version": 1, "parameters": parameters, "counts": counts,
        "this_run": this_run, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return files
