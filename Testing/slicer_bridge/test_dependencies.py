"""The Python dependencies: the module's requirements file for Slicer's Python (nothing Slicer ships, everything the
library imports), the development files (one pip call with requirements.txt and constraints.txt), and the install
plan run with one confirmation and one pip_ensure call."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from LymphNodeStagingLib.errors import Cancelled, InputError
from LymphNodeStagingLib.slicer import dependencies as deps

ROOT = Path(__file__).resolve().parents[2]
MODULE_REQUIREMENTS = ROOT / "LymphNodeStaging" / "Resources" / "requirements.txt"
CONSTRAINTS = ROOT / "constraints.txt"
#: Kept in requirements.txt although nothing imports them by name: the pinned stack they resolve together with.
STACK = {"torch", "totalsegmentator", "slicer-core", "vtk", "fury"}
#: Imported by the library only where Slicer's module does not go (Dask clusters) or provided by Slicer itself.
NOT_FOR_SLICER = {"distributed", "dask", "slicer-core"}


def _names(path: Path) -> set[str]:
    return {canonicalize_name(r.name) for r in deps.read_requirements(path)}


def _imported_distributions(folders: list[Path]) -> set[str]:
    """Distributions of every third-party module imported (at any depth, or by pytest.importorskip) by the Python
    files under ``folders``; a package installed through an extra counts for the requirement with that extra."""
    owners = metadata.packages_distributions()
    found = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    tops = [node.module.split(".")[0]]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
                      and isinstance(node.args[0], ast.Constant)):
                    tops = [str(node.args[0].value).split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top not in owners:
                        continue
                    found.update(canonicalize_name(d) for d in owners[top])
    if "distributed" in found:
        found.add("dask")  # dask[distributed]
    return found - {"lymphnodestaging"}


# ----- the module's requirements file --------------------------------------------------------------------------
def test_module_requirements_are_what_slicer_lacks_with_lower_bounds():
    reqs = deps.read_requirements(MODULE_REQUIREMENTS)
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"torch", "totalsegmentator"} <= names
    assert not names & deps.SLICER_PACKAGES, "Slicer's own packages must not be installed by the module"
    assert not names & deps.DEVELOPMENT_PACKAGES
    pins = deps.read_pins(CONSTRAINTS)
    for r in reqs:
        assert any(s.operator == ">=" for s in r.specifier), f"{r}: give the lowest version the library supports"
        assert r.specifier.contains(pins[canonicalize_name(r.name)]), f"{r}: the tested version does not satisfy it"
    # the format slicer.packaging.load_requirements reads: one requirement per line, no trailing comments
    for line in MODULE_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            Requirement(line.strip())
    # every module requirement is tested: it is a top-level requirement of the development environment
    assert names <= _names(ROOT / "requirements.txt")


def test_module_requirements_cover_what_the_library_imports():
    imported = _imported_distributions([ROOT / "LymphNodeStagingLib", ROOT / "LymphNodeStaging"])
    uncovered = imported - _names(MODULE_REQUIREMENTS) - deps.SLICER_PACKAGES - NOT_FOR_SLICER
    assert not uncovered, f"imported by the library but not in {MODULE_REQUIREMENTS.name}: {sorted(uncovered)}"


def test_this_environment_has_everything_the_module_needs():
    plan = deps.plan(MODULE_REQUIREMENTS)
    assert plan.missing == [] and plan.torch is None
    assert deps.find_constraints(MODULE_REQUIREMENTS) == CONSTRAINTS  # a checkout: the repository's file


# ----- the development environment ----------------------------------------------------------------------------
def test_development_tools_are_in_their_own_file_and_nothing_unused_is_required():
    runtime, dev = _names(ROOT / "requirements.txt"), _names(ROOT / "requirements-dev.txt")
    assert {"pytest", "ruff", "scikit-learn", "statsmodels"} <= dev
    assert not runtime & dev
    assert not runtime & deps.DEVELOPMENT_PACKAGES
    pins = deps.read_pins(CONSTRAINTS)
    assert not (runtime | dev) - set(pins), "every requirement has its tested version in constraints.txt"
    used = _imported_distributions([ROOT / "LymphNodeStagingLib", ROOT / "LymphNodeStaging", ROOT / "Testing"])
    unused = (runtime | dev) - used - STACK - {"ruff"}
    assert not unused, f"required but imported nowhere: {sorted(unused)}"
    assert "ruff" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_make_installs_everything_in_one_pip_call():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = [line for line in makefile.splitlines() if re.search(r"pip install .*-r requirements\.txt", line)
                and "-e ." in line]
    assert len(installs) == 1
    assert all(f in installs[0] for f in ("-c constraints.txt", "-r requirements.txt", "-r requirements-dev.txt"))


# ----- the install plan --------------------------------------------------------------------------------------------
PINS_TEXT = "torch==2.13.0\ntorchvision==0.28.0\ntotalsegmentator==2.18.0\nnibabel==5.4.2\nnumpy==2.4.6\n" \
            "pandas==3.1.1\npytest==9.2.0\nslicer-core==5.13.31053.0\nvtk==9.6.2\n"


@pytest.fixture
def files(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# what Slicer lacks\ntorch>=2.2\nTotalSegmentator>=2.4\nnibabel>=5.0\n", encoding="utf-8")
    (tmp_path / "constraints.txt").write_text(PINS_TEXT, encoding="utf-8")
    return req


def _slicer_python(**extra: str) -> dict[str, str]:
    """A Python like Slicer's: its own numpy and vtk (other versions than the tested ones), nothing of ours."""
    return {"numpy": "2.2.1", "vtk": "9.4.2", "pydicom": "3.0.1", **extra}


def test_plan_holds_what_is_installed_and_pins_what_is_new(files):
    installed = _slicer_python(nibabel="4.0.0")
    plan = deps.plan(files, version_of=installed.get)
    assert [str(r) for r in plan.missing] == ["torch>=2.2", "TotalSegmentator>=2.4", "nibabel>=5.0"]
    assert plan.torch is not None and str(plan.torch.specifier) == ">=2.2"
    lines = plan.constraints(installed.get)
    assert "numpy==2.2.1" in lines and "vtk==9.4.2" in lines and "pydicom==3.0.1" in lines  # never replaced
    assert "torch==2.13.0" in lines and "totalsegmentator==2.18.0" in lines and "pandas==3.1.1" in lines
    assert "nibabel==5.4.2" in lines  # ours, too old: the tested version
    assert not [c for c in lines if c.startswith(("pytest", "slicer-core", "numpy==2.4.6", "vtk==9.6.2"))]
    assert plan.missing_specs(tested=True) == ["torch==2.13.0", "TotalSegmentator==2.18.0", "nibabel==5.4.2"]


def test_install_asks_once_and_calls_pip_ensure_once(files, tmp_path):
    installed = _slicer_python()
    plan = deps.plan(files, version_of=installed.get)
    asked, ensured, torch_calls = [], [], []

    def install_torch(requirement):  # what the PyTorch extension does: a build of its choice
        torch_calls.append(str(requirement))
        installed["torch"] = "2.5.1+cu124"

    def pip_ensure(requirements, constraints=None, requester=None, prompt_install=True):
        ensured.append((requirements, Path(constraints).read_text(encoding="utf-8").split(), requester,
                        prompt_install))

    specs = deps.install(plan, confirm=lambda s: asked.append(s) or True, pip_ensure=pip_ensure,
                         install_torch=install_torch, version_of=installed.get)
    assert specs == ["torch>=2.2", "TotalSegmentator>=2.4", "nibabel>=5.0"]
    assert len(asked) == 1 and asked[0] == specs  # one question, listing everything
    assert torch_calls == ["torch>=2.2"]
    assert len(ensured) == 1
    requirements, constraints, requester, prompt = ensured[0]
    assert requirements == ["torch>=2.2", "TotalSegmentator>=2.4", "nibabel>=5.0"]
    assert requester == "LymphNodeStaging" and prompt is False  # the one question was asked already
    assert "torch==2.5.1+cu124" in constraints  # the extension's build is kept, not replaced by the tested one
    assert not [c for c in constraints if c.startswith("torchvision")]  # must match that build: left to pip
    assert "numpy==2.2.1" in constraints and "totalsegmentator==2.18.0" in constraints


def test_install_without_slicer_packaging_makes_one_pip_install_call(files):
    installed = _slicer_python()
    plan = deps.plan(files, version_of=installed.get)
    calls = []
    deps.install(plan, pip_install=calls.append, version_of=installed.get)
    assert calls == ["torch==2.13.0 TotalSegmentator==2.18.0 nibabel==5.4.2"]


def test_declining_installs_nothing_and_a_complete_python_asks_nothing(files):
    installed = _slicer_python()
    plan = deps.plan(files, version_of=installed.get)
    calls = []
    with pytest.raises(Cancelled, match="were not installed"):
        deps.install(plan, confirm=lambda s: False, pip_ensure=lambda *a, **k: calls.append(a),
                     pip_install=calls.append)
    assert calls == []
    complete = _slicer_python(torch="2.13.0", TotalSegmentator="2.18.0", nibabel="5.4.2")
    plan = deps.plan(files, version_of=lambda n: complete.get(n) or complete.get(canonicalize_name(n)))
    assert plan.missing == []
    assert deps.install(plan, confirm=lambda s: calls.append(s), pip_ensure=lambda *a, **k: calls.append(a)) == []
    assert calls == []


def test_a_module_file_listing_slicer_packages_is_refused(tmp_path):
    bad = tmp_path / "requirements.txt"
    bad.write_text("numpy>=1.24\n", encoding="utf-8")
    with pytest.raises(InputError, match="shipped by Slicer"):
        deps.plan(bad, CONSTRAINTS)
    bad.write_text("torch>=2.2  # trailing comment\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1"):
        deps.read_requirements(bad)


def test_an_older_pip_ensure_gets_only_the_arguments_it_takes(files):
    installed = _slicer_python()
    plan = deps.plan(files, version_of=installed.get)
    calls = []

    def pip_ensure(requirements, requester=None):  # no constraints, no prompt_install
        calls.append((requirements, requester))

    deps.install(plan, pip_ensure=pip_ensure, version_of=installed.get)
    assert calls == [(["torch>=2.2", "TotalSegmentator>=2.4", "nibabel>=5.0"], "LymphNodeStaging")]
