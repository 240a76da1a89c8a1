"""Pinned Python dependencies for first-use installation inside 3D Slicer, derived from the repository's
``requirements.txt`` (what) and ``constraints.txt`` (which exact version). Nothing is pinned by hand here.

Slicer brings its own vtk and the MRML core, so vtk, slicer-core and the development tools are left out; torch is
installed through the PyTorch extension when it is present (it picks the CPU or CUDA build), so it is reported
separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import InputError

#: Requirements Slicer provides, or that only development needs.
PROVIDED_BY_SLICER = {"vtk", "slicer-core", "pytest", "ruff"}
TORCH = "torch"


@dataclass(frozen=True)
class Requirement:
    name: str  # distribution name as written ("dask")
    extras: str  # "[distributed]" or ""
    version: str | None  # exact version from constraints.txt

    @property
    def spec(self) -> str:
        return f"{self.name}{self.extras}" + (f"=={self.version}" if self.version else "")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(path: Path) -> list[tuple[str, str, str | None]]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?:==\s*([^\s;]+))?.*", line)
        if not m:
            raise InputError(f"{path}: cannot parse requirement line {raw!r}")
        out.append((m.group(1), m.group(2) or "", m.group(3)))
    return out


def find_requirement_files(search: list[Path] | None = None) -> tuple[Path, Path]:
    """requirements.txt and constraints.txt: in the repository root (a checkout) or next to the library."""
    here = Path(__file__).resolve().parent
    for folder in search or [here.parent, here, here / "resources"]:
        req, con = folder / "requirements.txt", folder / "constraints.txt"
        if req.is_file() and con.is_file():
            return req, con
    raise InputError(f"requirements.txt and constraints.txt not found next to {here} or in its parent folder")


def pinned_requirements(requirements: Path | None = None, constraints: Path | None = None) -> list[Requirement]:
    """Every top-level requirement with its exact version from the constraints file (torch included)."""
    if requirements is None or constraints is None:
        requirements, constraints = find_requirement_files()
    pins = {_canonical(n): v for n, _e, v in _parse(constraints) if v}
    out = []
    for name, extras, version in _parse(requirements):
        version = version or pins.get(_canonical(name))
        if version is None:
            raise InputError(f"{constraints}: no pinned version for requirement {name!r} of {requirements}")
        out.append(Requirement(name, extras, version))
    return out


def slicer_requirements(requirements: Path | None = None, constraints: Path | None = None) -> list[Requirement]:
    """What to pip-install into Slicer's Python (without torch, vtk, slicer-core and development tools)."""
    return [r for r in pinned_requirements(requirements, constraints)
            if _canonical(r.name) not in PROVIDED_BY_SLICER and _canonical(r.name) != TORCH]


def torch_requirement(requirements: Path | None = None, constraints: Path | None = None) -> Requirement:
    for r in pinned_requirements(requirements, constraints):
        if _canonical(r.name) == TORCH:
            return r
    raise InputError("requirements.txt has no torch requirement")


def missing(reqs: list[Requirement]) -> list[Requirement]:
    """The requirements not installed at their pinned version."""
    out = []
    for r in reqs:
        try:
            installed = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            out.append(r)
            continue
        if r.version and installed.split("+")[0] != r.version.split("+")[0]:
            out.append(r)
    return out
