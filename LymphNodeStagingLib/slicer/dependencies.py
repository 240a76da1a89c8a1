"""The Python packages the Slicer module needs in Slicer's own Python, and how they get there.

* The module's requirements file (``LymphNodeStaging/Resources/requirements.txt``) lists what Slicer does not ship,
  each with the lowest version the library works with. What Slicer ships (numpy, scipy, SimpleITK, pydicom, vtk,
  ...) is never listed and never replaced.
* The repository's ``constraints.txt`` holds the versions tested together. :func:`plan` turns it into the constraints
  for pip: a package that is not installed gets its tested version, a package that is installed (by Slicer or by
  another extension) is held at the version it has. So one ``slicer.packaging.pip_ensure`` call installs the tested
  set into a fresh Python and changes nothing that is there already (a real conflict makes pip stop, not replace).
* torch comes from the PyTorch extension when it is installed (it picks the CPU or CUDA build for the computer),
  otherwise from PyPI at the tested version.

:func:`install` runs a plan with the functions Slicer provides: one confirmation, then one ``pip_ensure`` call
(``slicer.util.pip_install`` in Slicer versions without ``slicer.packaging``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import Cancelled, InputError
from ..paths import package_root

REQUESTER = "LymphNodeStaging"
TORCH = "torch"
CONSTRAINTS_FILE = "constraints.txt"

#: Packages that 3D Slicer ships (or that must never enter its Python): never listed in the module's requirements,
#: never installed or replaced by the module.
SLICER_PACKAGES = frozenset(canonicalize_name(n) for n in (
    "numpy", "scipy", "SimpleITK", "pydicom", "vtk", "slicer-core", "Pillow", "requests", "packaging", "urllib3",
    "certifi", "charset-normalizer", "idna", "six", "dicomweb-client", "pip", "setuptools", "wheel", "GitPython",
    "PyGithub",
))
#: Built together with torch: a tested version only fits the tested torch.
TORCH_FAMILY = frozenset({"torchvision", "torchaudio"})
#: Development and test tools (requirements-dev.txt): never installed into Slicer.
DEVELOPMENT_PACKAGES = frozenset(canonicalize_name(n) for n in (
    "pytest", "ruff", "scikit-learn", "statsmodels", "slicerio",
))

VersionOf = Callable[[str], "str | None"]


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_requirements(path: str | Path) -> list[Requirement]:
    """The requirements of a requirements file, read as ``slicer.packaging.load_requirements`` reads it: one
    requirement per line, ``#`` comment lines, blank lines and pip options (``-r``, ``-c``, ...) skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"requirements file {path} does not exist")
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            out.append(Requirement(line))
        except InvalidRequirement as exc:
            raise InputError(f"{path}, line {number}: {raw!r} is not a requirement ({exc}); write one requirement "
                             "per line, without trailing comments") from None
    return out


def read_pins(path: str | Path) -> dict[str, str]:
    """``canonical name -> version`` of the exact pins (``name==version``) of a constraints file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"constraints file {path} does not exist")
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def find_constraints(requirements_file: str | Path) -> Path | None:
    """The tested versions: ``constraints.txt`` next to the module's requirements file (a built extension) or in the
    repository root (a checkout)."""
    for folder in (Path(requirements_file).resolve().parent, package_root()):
        candidate = folder / CONSTRAINTS_FILE
        if candidate.is_file():
            return candidate
    return None


def is_satisfied(requirement: Requirement, version_of: VersionOf = installed_version) -> bool:
    """Whether a requirement is met by what is installed (its marker respected; the packages its extras add are
    checked one level deep, as ``slicer.packaging.pip_check`` does)."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    version = version_of(requirement.name)
    if version is None or not requirement.specifier.contains(version, prereleases=True):
        return False
    if not requirement.extras:
        return True
    try:
        declared = metadata.requires(requirement.name) or []
    except metadata.PackageNotFoundError:
        return True
    for text in declared:
        dep = Requirement(text)
        if dep.marker is None:
            continue
        if any(dep.marker.evaluate({"extra": extra}) for extra in requirement.extras):
            dep.marker = None
            if not is_satisfied(dep, version_of):
                return False
    return True


@dataclass
class InstallPlan:
    """What the module would install into this Python: its requirements, those not met, the tested versions."""

    requirements: list[Requirement]  # every requirement of the module's file
    missing: list[Requirement]  # those not met now
    pins: dict[str, str] = field(default_factory=dict)  # canonical name -> tested version (constraints.txt)

    @property
    def torch(self) -> Requirement | None:
        """The torch requirement when torch is missing (the PyTorch extension may install it)."""
        for r in self.missing:
            if canonicalize_name(r.name) == TORCH:
                return r
        return None

    def missing_specs(self, tested: bool = False) -> list[str]:
        """The missing requirements as pip arguments; with ``tested``, at their tested versions."""
        out = []
        for r in self.missing:
            version = self.pins.get(canonicalize_name(r.name)) if tested else None
            extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
            out.append(f"{r.name}{extras}=={version}" if version else str(r))
        return out

    def constraints(self, version_of: VersionOf = installed_version) -> list[str]:
        """pip constraints (``name==version`` lines) for installing the missing requirements: a package that is not
        installed gets its tested version, an installed one is held where it is (Slicer's own packages always),
        except a requirement of the module installed at too old a version, which gets its tested version.
        Development tools and slicer-core are left out, and so are torchvision and torchaudio when the installed
        torch is not the tested one (their version must match torch's)."""
        missing = {canonicalize_name(r.name) for r in self.requirements if not is_satisfied(r, version_of)}
        skip = set(DEVELOPMENT_PACKAGES | SLICER_PACKAGES)
        torch_have = version_of(TORCH)
        if torch_have is not None and torch_have.split("+")[0] != self.pins.get(TORCH, torch_have.split("+")[0]):
            skip |= TORCH_FAMILY
        lines = []
        for name in sorted(set(self.pins) | SLICER_PACKAGES):
            have = version_of(name)
            if have is not None and name not in missing:
                lines.append(f"{name}=={have}")
            elif name in self.pins and name not in skip:
                lines.append(f"{name}=={self.pins[name]}")
        return lines


def plan(requirements_file: str | Path, constraints_file: str | Path | None = None,
         version_of: VersionOf = installed_version) -> InstallPlan:
    """What to install for the module: its requirements, those not met now, and the tested versions."""
    requirements = read_requirements(requirements_file)
    for r in requirements:
        if canonicalize_name(r.name) in SLICER_PACKAGES | DEVELOPMENT_PACKAGES:
            raise InputError(f"{requirements_file}: {r.name} is shipped by Slicer or a development tool; it must not "
                             "be installed into Slicer's Python")
    missing = [r for r in requirements if not is_satisfied(r, version_of)]
    constraints_file = constraints_file or find_constraints(requirements_file)
    return InstallPlan(requirements, missing, read_pins(constraints_file) if constraints_file else {})


def install(plan: InstallPlan, *, confirm: Callable[[list[str]], bool] | None = None,
            pip_ensure: Callable | None = None, pip_install: Callable | None = None,
            install_torch: Callable[[Requirement], object] | None = None,
            version_of: VersionOf = installed_version, requester: str = REQUESTER) -> list[str]:
    """Install what ``plan`` lacks: one confirmation (``confirm(specs)``; None: no question), torch through
    ``install_torch`` (the PyTorch extension) when given, then everything in ONE ``pip_ensure(requirements,
    constraints=..., requester=..., prompt_install=False)`` call, or, in Slicer versions without
    ``slicer.packaging``, one ``pip_install`` call with the missing packages at their tested versions.
    Returns the specs asked for; raises Cancelled when the user declines."""
    if not plan.missing:
        return []
    specs = plan.missing_specs()
    if confirm is not None and not confirm(specs):
        raise Cancelled(f"{requester}: the Python packages it needs were not installed ({', '.join(specs)})")
    torch_by_extension = plan.torch is not None and install_torch is not None
    if torch_by_extension:
        install_torch(plan.torch)
        importlib.invalidate_caches()
    if pip_ensure is not None:
        with tempfile.TemporaryDirectory(prefix="lnstaging-pip-") as tmp:
            lines = plan.constraints(version_of)  # after torch: its build is held, not replaced
            constraints = None
            if lines:
                constraints = Path(tmp) / CONSTRAINTS_FILE
                constraints.write_text("\n".join(lines) + "\n", encoding="utf-8")
            _call(pip_ensure, [str(r) for r in plan.requirements], constraints=constraints, requester=requester,
                  prompt_install=False)
    elif pip_install is not None:
        rest = [s for r, s in zip(plan.missing, plan.missing_specs(tested=True), strict=True)
                if not (torch_by_extension and canonicalize_name(r.name) == TORCH)]
        if rest:
            pip_install(" ".join(rest))
    else:
        raise InputError("install: neither pip_ensure nor pip_install was given")
    return specs


def _call(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` without the keyword arguments it does not take (an older Slicer's
    ``pip_ensure`` may lack some)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in parameters}
    return function(*args, **kwargs)


__all__ = [
    "DEVELOPMENT_PACKAGES", "InstallPlan", "SLICER_PACKAGES", "find_constraints", "install",
    "installed_version", "is_satisfied", "plan", "read_pins", "read_requirements",
]
