"""LymphNodeStaging: mediastinal lymph node station assessment and N-staging on FDG PET/CT.

The library is Qt-free; the 3D Slicer module and the ``lnstaging`` command line both call it. The names below are
the front door; they are imported on first use, so that ``import LymphNodeStagingLib`` (and ``lnstaging
--version``) stays fast::

    from LymphNodeStagingLib import assess_case
    result = assess_case("ct.nii.gz", "pet_suv.nii.gz", "R", anatomy="anatomy.nii.gz", pet_is_suv=True).result
    print(result.n_stage, result.explanation)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (module relative to this package, name there)
_EXPORTS: dict[str, tuple[str, str]] = {
    "assess_case": (".assessment.assess", "assess_case"),
    "run_batch": (".batch.run", "run_batch"),
    "read_cohort": (".cohort.table", "read_cohort"),
    "train": (".training.from_cohort", "train_from_cohort"),
    "run_evaluation": (".evaluation.crossval", "run_evaluation"),
    "load_rules": (".staging.rules", "load_rules"),
    "CaseResult": (".staging.result", "CaseResult"),
    "LNSError": (".errors", "LNSError"),
}

__all__ = [
    "CaseResult", "LNSError", "__version__", "assess_case", "load_rules", "read_cohort", "run_batch", "run_evaluation",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from .assessment.assess import assess_case
    from .batch.run import run_batch
    from .cohort.table import read_cohort
    from .errors import LNSError
    from .evaluation.crossval import run_evaluation
    from .staging.result import CaseResult
    from .staging.rules import load_rules
    from .training.from_cohort import train_from_cohort as train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
