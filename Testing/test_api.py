"""The front door: LymphNodeStagingLib's public names, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import LymphNodeStagingLib as lns


def test_public_names_resolve():
    from LymphNodeStagingLib.assessment.assess import assess_case
    from LymphNodeStagingLib.training.from_cohort import train_from_cohort

    assert lns.assess_case is assess_case and lns.train is train_from_cohort
    for name in lns.__all__:
        assert getattr(lns, name) is not None, name
    assert set(lns.__all__) <= set(dir(lns))


def test_import_is_lazy():
    """Importing the package loads none of the heavy dependencies (torch, SimpleITK, scipy)."""
    code = ("import sys, LymphNodeStagingLib; "
            "print(sorted(m for m in ('torch', 'SimpleITK', 'scipy', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_all_lists_the_exports():
    assert set(lns.__all__) == {"__version__", *lns._EXPORTS}
