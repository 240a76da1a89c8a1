"""The library's layering: a subpackage imports only itself and the layers below it (function-level imports
included), and the phantom generator is imported only by the phantom itself, the benchmarks and the demo."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "LymphNodeStagingLib"

#: Lowest layer first; a module may import from its own layer and from the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "paths", "runtime"),
    ("io",),
    ("staging",),
    ("cohort",),
    ("suv",),
    ("anatomy",),
    ("phantom",),
    ("mapping",),
    ("classifier",),
    ("nodes",),
    ("stationnet",),
    ("preflight",),
    ("training",),
    ("assessment",),
    ("batch",),
    ("evaluation",),
    ("slicer",),
    ("benchmarks",),
    ("cli",),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

#: Who may import the phantom generator (synthetic data for the demo, tests and benchmarks, never the pipeline).
PHANTOM_USERS = ("phantom/", "benchmarks/", "assessment/demo.py", "cli/commands/phantom.py", "cli/commands/demo.py")


def unit_of(rel: Path) -> str:
    """Top-level unit of a file: the subpackage, or the module name for a top-level module."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    """Top-level units of LymphNodeStagingLib imported anywhere in the file."""
    rel = path.relative_to(PACKAGE)
    package = list(rel.parent.parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    raise AssertionError(f"{rel}: relative import above the package")
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # from . import x (top level)
                    parts = [a.name for a in node.names]
                    found.update(p if p in RANK else "__init__" for p in parts)
                    continue
            elif node.module and node.module.split(".")[0] == PACKAGE.name:
                parts = node.module.split(".")[1:] or ["__init__"]
            else:
                continue
            found.add(parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE.name:
                    found.add((a.name.split(".") + ["__init__"])[1])
    return found


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_layer():
    units = {unit_of(p.relative_to(PACKAGE)) for p in library_files()}
    assert units <= set(RANK), f"not in LAYERS: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path):
    rel = path.relative_to(PACKAGE)
    if rel == Path("__init__.py"):
        return  # the front door names the public API of every layer, imported on first use (Testing/test_api.py)
    own = unit_of(rel)
    higher = sorted(u for u in imported_units(path) if RANK[u] > RANK[own])
    assert not higher, f"{rel} (layer {own}) imports the higher layer(s) {higher}"


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_phantom_only_where_synthetic_data_belongs(path):
    rel = str(path.relative_to(PACKAGE))
    if rel.startswith(PHANTOM_USERS[:2]) or rel in PHANTOM_USERS:
        return
    assert "phantom" not in imported_units(path), f"{rel} imports the phantom generator"


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function is found."""
    fake = tmp_path / PACKAGE.name
    (fake / "staging").mkdir(parents=True)
    bad = fake / "staging" / "bad.py"
    bad.write_text("def f():\n    from ..assessment.assess import assess_case\n    from ..phantom import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imported_units(bad) == {"assessment", "phantom"}


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_relative_imports_resolve(path):
    """Every ``from .x import`` inside the package names a module or package that exists (lazy imports included)."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = PACKAGE.joinpath(*base, *node.module.split("."))
            assert target.with_suffix(".py").is_file() or (target / "__init__.py").is_file(), \
                f"{path.relative_to(PACKAGE)}:{node.lineno}: from {'.' * node.level}{node.module} does not exist"


def test_test_file_names_are_unique():
    """pytest imports test files by their base name (no __init__.py in Testing/): two with the same name clash."""
    names = [p.name for p in Path(__file__).parent.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


CITED = re.compile(r"(?<![\w/.$<])((?:docs|Testing|Resources|LymphNodeStaging|LymphNodeStagingLib)/[\w./-]*\w|README\.md)")


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_docstrings_cite_only_files_of_the_repository(path):
    """A file named in the code (docs/..., Testing/..., README.md) exists in the repository; nothing cites material
    outside it."""
    repo = PACKAGE.parent
    text = path.read_text(encoding="utf-8")
    missing = [m for m in CITED.findall(text) if not (repo / m).exists() and not (PACKAGE / m).exists()]
    assert not missing, f"{path.relative_to(repo)} cites {missing}, which do not exist"
    assert "METHOD_SPEC" not in text and "shared/" not in text, f"{path.relative_to(repo)} cites the shared folder"
