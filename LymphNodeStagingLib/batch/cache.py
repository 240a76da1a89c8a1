"""Per-case step cache: a case folder holds one sub-folder per pipeline step with the step's files and a manifest.

Layout of a case folder::

    CASE/
      case.json                 the case manifest (status ok | failed, step keys, timings, error), written last
      suv/step.json + files     one folder per step, written atomically (temporary folder, then rename)
      anatomy/step.json + files
      ...

A step's *key* is a hash of everything its result depends on: the step name and version, the library version,
the step's parameters, fingerprints of its input files and the keys of the steps whose outputs it reads. A step
folder is *complete* when its ``step.json`` exists (it is written last, inside the temporary folder, so a folder
under its final name is always whole) and every output file it lists exists with the recorded size. A step is
reused when it is complete and its key equals the current key; a changed parameter changes the key of that step
and of every step downstream of it, so exactly those are computed again.

Leftovers of a killed run (``.NAME.<random>.part`` temporary files and folders, ``.NAME.old``) are removed by
``clean_partial`` before a case is worked on; they never look complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_dir, digest, write_json

STEP_FORMAT = "lnstaging-step"
CASE_FORMAT = "lnstaging-case"
STEP_MANIFEST = "step.json"
CASE_MANIFEST = "case.json"


def _library_version() -> str:
    from .. import __version__

    return __version__


def step_key(step: str, version: int, params: dict, inputs: dict, upstream: dict[str, str]) -> str:
    """The key of a step result: changes whenever anything the result depends on changes."""
    return digest({"step": step, "version": version, "library": _library_version(), "params": params,
                   "inputs": inputs, "upstream": upstream})


@dataclass
class StepRecord:
    """The manifest of one completed step (``step.json``)."""

    step: str
    key: str
    version: int
    library_version: str
    params: dict
    inputs: dict
    upstream: dict[str, str]
    outputs: dict[str, int]  # file name -> size in bytes
    info: dict = field(default_factory=dict)  # what the step reports (e.g. SUV provenance summary, flags)
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    finished: str = ""
    format: str = STEP_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepRecord:
        if data.get("format") != STEP_FORMAT:
            raise InputError(f"not a step manifest (format {data.get('format')!r}, expected {STEP_FORMAT!r})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StepSpec:
    """What a step needs to be looked up or computed: its name, version, parameters, inputs and upstream keys."""

    step: str
    version: int
    params: dict
    inputs: dict
    upstream: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return step_key(self.step, self.version, self.params, self.inputs, self.upstream)


def _is_partial(name: str) -> bool:
    return name.startswith(".") and (".part" in name or name.endswith(".old"))


def clean_partial(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files and folders a killed writer left in ``folder``; returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if _is_partial(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif recursive and entry.is_dir():
            removed += clean_partial(entry, recursive=False)
    return removed


class CaseCache:
    """The cache folder of one case."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def step_dir(self, step: str) -> Path:
        return self.folder / step

    def clean_partial(self) -> list[Path]:
        return clean_partial(self.folder, recursive=True)

    def read_step(self, step: str) -> StepRecord | None:
        """The manifest of a complete step folder, or None when absent, unreadable or incomplete."""
        path = self.step_dir(step) / STEP_MANIFEST
        try:
            rec = StepRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, InputError):
            return None
        for name, size in rec.outputs.items():
            f = self.step_dir(step) / name
            try:
                if f.stat().st_size != size:
                    return None
            except OSError:
                return None
        return rec

    def lookup(self, spec: StepSpec) -> StepRecord | None:
        """The cached result of a step if it is complete and was made with exactly this key."""
        rec = self.read_step(spec.step)
        return rec if rec is not None and rec.key == spec.key else None

    def compute(self, spec: StepSpec, work: Callable[[Path], dict | None]) -> StepRecord:
        """Run ``work(folder)`` in a temporary folder, write the manifest last, then move the folder into place.

        ``work`` writes its files into the folder and returns a dict of information for the manifest (or None).
        """
        from ..io.files import peak_memory_mb

        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with atomic_dir(self.step_dir(spec.step)) as tmp:
            info = work(tmp) or {}
            outputs = {str(p.relative_to(tmp)): p.stat().st_size
                       for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != STEP_MANIFEST}
            rec = StepRecord(spec.step, spec.key, spec.version, _library_version(), spec.params, spec.inputs,
                             spec.upstream, outputs, info, round(time.perf_counter() - t0, 3),
                             round(peak_memory_mb(), 1), time.strftime("%Y-%m-%dT%H:%M:%S"))
            write_json(tmp / STEP_MANIFEST, rec.to_dict())
        return rec

    def get_or_compute(self, spec: StepSpec, work: Callable[[Path], dict | None]) -> tuple[StepRecord, bool]:
        """(record, cached): the cached result when valid, otherwise a fresh computation."""
        rec = self.lookup(spec)
        if rec is not None:
            return rec, True
        return self.compute(spec, work), False

    # ----- the case manifest -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.folder / CASE_MANIFEST

    def read_manifest(self) -> dict | None:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == CASE_FORMAT else None

    def write_manifest(self, data: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return write_json(self.manifest_path, {"format": CASE_FORMAT, "format_version": 1, **data})

    def steps_complete(self, keys: dict[str, str]) -> bool:
        """Whether every named step is complete with the given key."""
        for step, key in keys.items():
            rec = self.read_step(step)
            if rec is None or rec.key != key:
                return False
        return True
