"""The documentation works as written: every command in README.md and docs/ parses or runs, every link resolves.

* Every ``lnstaging ...`` line in a fenced code block must parse with the real parser (words in capitals such as
  CT, PET, DIR, COHORT.csv are placeholders and parse as plain strings). A GPU is assumed to exist while parsing,
  so that ``--device gpu`` examples parse on a machine without one.
* ``Slicer ... --python-script LymphNodeStaging/LymphNodeStagingBatch.py ...`` lines must parse with the script's
  parser, and ``make TARGET`` lines must name a target of the Makefile.
* Every Python block must compile, and its ``from LymphNodeStagingLib... import ...`` names must exist.
* The blocks marked ``<!-- docs-test: run -->`` in the command-line tutorial are run in order in an empty folder,
  then the marked Python blocks (the README's example) in the same folder.
* Relative links between Markdown files resolve, anchors included; images exist.

Every failure names the documentation file and line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOC_FILES: tuple[Path, ...] = (REPO / "README.md", *sorted(DOCS.rglob("*.md")))
TUTORIAL = DOCS / "tutorials" / "command-line.md"
RUN_MARKER = "<!-- docs-test: run -->"
#: Programs whose command lines in shell blocks are checked.
CHECKED_PROGRAMS = ("lnstaging", "Slicer", "make")
#: Subcommands the tutorial must run, so that an edit of the tutorial cannot drop one silently.
TUTORIAL_MUST_RUN = {"phantom", "validate-cohort", "stage", "suv", "map", "assess", "batch", "train", "evaluate"}
#: Files the tutorial tells the reader to look at, relative to its folder, after all its steps.
TUTORIAL_FILES = ("cohort/cohort.csv", "cohort/PH0001/truth.json", "map-PH0001/overlay.png",
                  "map-PH0001/stations.nii.gz", "assess-PH0001/overview.png", "assess-PH0001/result.json",
                  "assess-PH0001/result.csv", "suv-PH0001.nii.gz", "assess-dicom/result.json", "runs/summary.csv",
                  "runs/report.png", "model/best.pt", "model/best.json", "model/history.json", "eval/report.md",
                  "py-PH0001/result.json")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file, the line of its first content line, its language, its lines."""

    path: Path
    line: int
    lang: str
    lines: tuple[str, ...]
    run: bool  # preceded by the run marker

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    @property
    def source(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class Command:
    """One command line of a shell block (backslash continuations joined)."""

    path: Path
    line: int
    text: str
    argv: tuple[str, ...]
    run: bool

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (also indented ones, e.g. inside list items)."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    previous = ""  # the last non-blank line before the current position, outside blocks
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, fence = len(m.group("indent")), m.group("fence")
        lang = m.group("info").strip().split(" ")[0].lower() if m.group("info").strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            text = lines[j]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            j += 1
        blocks.append(Block(path, i + 2, lang, tuple(body), previous == RUN_MARKER))
        previous = ""
        i = j + 1
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """The command lines of a shell block whose program is one of CHECKED_PROGRAMS."""
    if block.lang not in SHELL_LANGS:
        return []
    out: list[Command] = []
    pending, start = "", 0
    for k, raw in enumerate(block.lines):
        line = raw.rstrip()
        if not pending:
            start = block.line + k
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text.startswith("$ "):
            text = text[2:].strip()
        if not text or text.split()[0] not in CHECKED_PROGRAMS:
            continue
        try:
            argv = tuple(shlex.split(text, comments=True))
        except ValueError as exc:
            raise AssertionError(f"{rel(block.path)}:{start}: cannot split `{text}` like a shell: {exc}") from None
        out.append(Command(block.path, start, text, argv, block.run))
    return out


ALL_BLOCKS: list[Block] = [b for p in DOC_FILES for b in code_blocks(p)]
ALL_COMMANDS: list[Command] = [c for b in ALL_BLOCKS for c in shell_commands(b)]
LNSTAGING = [c for c in ALL_COMMANDS if c.argv[0] == "lnstaging"]
SLICER = [c for c in ALL_COMMANDS if c.argv[0] == "Slicer" and "--python-script" in c.argv]
MAKE = [c for c in ALL_COMMANDS if c.argv[0] == "make"]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


def _ids(items) -> list[str]:
    return [item.where for item in items]


# ------------------------------------------------------------------------------------------------ commands parse


def test_docs_have_commands():
    assert len(DOC_FILES) > 10, f"expected README.md and the docs/ pages, found {[rel(p) for p in DOC_FILES]}"
    assert len(LNSTAGING) > 30, "expected many lnstaging examples in the docs; did the block parser break?"
    assert PYTHON_BLOCKS and SLICER and MAKE


def _exit_code(parse, args: list[str]) -> int | str | None:
    """None when ``parse(args)`` returns; else the status argparse exits with."""
    try:
        parse(args)
    except SystemExit as exc:
        return exc.code
    return None


@pytest.fixture(scope="module")
def parser():
    from LymphNodeStagingLib.cli.main import build_parser

    return build_parser()


@pytest.mark.parametrize("cmd", LNSTAGING, ids=_ids(LNSTAGING))
def test_lnstaging_command_parses(cmd: Command, parser, monkeypatch, capsys):
    from LymphNodeStagingLib import runtime

    monkeypatch.setattr(runtime, "_cuda_count", lambda: 2, raising=False)  # a GPU exists while parsing
    args = list(cmd.argv[1:])
    code = _exit_code(parser.parse_args, args)
    if code is None or (code == 0 and {"-h", "--help", "--version"} & set(args)):
        return
    err = capsys.readouterr().err.strip().splitlines()
    pytest.fail(f"{cmd.where}: `{cmd.text}` does not parse with lnstaging's parser (exit {code}): "
                f"{err[-1] if err else ''}", pytrace=False)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"docs_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cmd", SLICER, ids=_ids(SLICER))
def test_slicer_batch_command_parses(cmd: Command, capsys):
    argv = list(cmd.argv)
    k = argv.index("--python-script")
    script = REPO / argv[k + 1]
    assert script.is_file(), f"{cmd.where}: script {argv[k + 1]} does not exist"
    module = _load_script(script)
    if hasattr(module, "parse_args"):  # a parser of its own
        code = _exit_code(module.parse_args, argv[k + 2:])
    else:  # the script hands its arguments to `lnstaging batch`
        from LymphNodeStagingLib.cli.main import build_parser

        code = _exit_code(build_parser().parse_args, ["batch", *argv[k + 2:]])
    if code is not None:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{cmd.where}: `{cmd.text}` does not parse with {argv[k + 1]}'s parser (exit {code}): "
                    f"{err[-1] if err else ''}", pytrace=False)


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE)}


@pytest.mark.parametrize("cmd", MAKE, ids=_ids(MAKE))
def test_make_target_exists(cmd: Command):
    targets = [a for a in cmd.argv[1:] if not a.startswith("-") and "=" not in a]
    missing = [t for t in targets if t not in _make_targets()]
    assert not missing, f"{cmd.where}: `{cmd.text}`: no Makefile target {missing}"


# ------------------------------------------------------------------------------------------------ Python blocks


def _check_import(module: str, names: list[str], where: str) -> None:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        pytest.fail(f"{where}: `import {module}` fails: {type(exc).__name__}: {exc}", pytrace=False)
    for name in names:
        if name == "*":
            continue
        try:
            getattr(mod, name)  # the front door imports its names on first use
        except Exception as exc:
            pytest.fail(f"{where}: `from {module} import {name}` fails: {type(exc).__name__}: {exc}", pytrace=False)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_compiles_and_imports(block: Block):
    try:
        tree = ast.parse(block.source, filename=block.where)
    except SyntaxError as exc:
        pytest.fail(f"{rel(block.path)}:{block.line + (exc.lineno or 1) - 1}: Python example does not compile: "
                    f"{exc.msg}", pytrace=False)
    for node in ast.walk(tree):
        line = f"{rel(block.path)}:{block.line + getattr(node, 'lineno', 1) - 1}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "LymphNodeStagingLib":
            _check_import(node.module, [a.name for a in node.names], line)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "LymphNodeStagingLib":
                    _check_import(alias.name, [], line)


# ------------------------------------------------------------------------------------------------ links


INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"(!?)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_lines_with_code(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced blocks, with their line numbers."""
    out, fence = [], None
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group("fence")
            continue
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
            continue
        out.append((k, line))
    return out


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced blocks, inline code removed (a link inside backticks is not a link)."""
    return [(k, INLINE_CODE.sub("", line)) for k, line in _prose_lines_with_code(path)]


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for _, line in _prose_lines_with_code(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links keep their text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@dataclass(frozen=True)
class Link:
    path: Path
    line: int
    target: str
    image: bool

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def links(path: Path) -> list[Link]:
    found = []
    for k, line in _prose_lines(path):
        for m in LINK.finditer(line):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            found.append(Link(path, k, target, bool(m.group(1))))
    return found


ALL_LINKS = [link for p in DOC_FILES for link in links(p)]
DOC_LINKS = [link for link in ALL_LINKS if not link.image]
IMAGE_LINKS = [link for link in ALL_LINKS if link.image]


def test_docs_have_links():
    assert len(DOC_LINKS) > 50, "expected many links between the docs; did the link parser break?"


@pytest.mark.parametrize("link", DOC_LINKS, ids=[f"{x.where}->{x.target}" for x in DOC_LINKS])
def test_link_resolves(link: Link):
    target, _, anchor = link.target.partition("#")
    path = (link.path.parent / target).resolve() if target else link.path
    assert path.exists(), f"{link.where}: link target {link.target} does not exist ({path})"
    if anchor and path.suffix == ".md":
        anchors = github_anchors(path)
        assert anchor in anchors, (f"{link.where}: {rel(path)} has no heading for #{anchor} "
                                   f"(headings: {', '.join(sorted(anchors))})")


@pytest.mark.parametrize("link", IMAGE_LINKS, ids=[f"{x.where}->{x.target}" for x in IMAGE_LINKS])
def test_image_exists(link: Link):
    path = (link.path.parent / link.target).resolve()
    assert path.is_file(), f"{link.where}: image {link.target} does not exist ({path})"


# ------------------------------------------------------------------------------------------------ the tutorial runs


def _lnstaging() -> list[str]:
    exe = Path(sys.executable).with_name("lnstaging")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "LymphNodeStagingLib.cli.main"]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def test_tutorial_covers_the_pipeline():
    run = [c for b in code_blocks(TUTORIAL) if b.run for c in shell_commands(b)]
    others = [c for c in run if c.argv[0] != "lnstaging"]
    assert not others, f"{others[0].where}: run blocks hold lnstaging commands only, found `{others[0].text}`"
    missing = TUTORIAL_MUST_RUN - {c.argv[1] for c in run if len(c.argv) > 1}
    assert not missing, f"{rel(TUTORIAL)}: the run blocks no longer run lnstaging {', '.join(sorted(missing))}"
    python = [b for p in (REPO / "README.md", TUTORIAL) for b in code_blocks(p) if b.run and b.lang == "python"]
    assert python, "the README's Python example is no longer marked to run"


@pytest.mark.slow
def test_tutorial_and_python_example_run(tmp_path):
    """Steps 1-9 of the command-line tutorial in an empty folder, then the README's Python example there."""
    work = tmp_path / "tutorial"
    work.mkdir()
    env = dict(os.environ, LNSTAGING_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    env.pop("LNSTAGING_ATLASES", None)
    outputs: list[tuple[Command, str]] = []
    for cmd in (c for b in code_blocks(TUTORIAL) if b.run for c in shell_commands(b)):
        proc = subprocess.run([*_lnstaging(), *cmd.argv[1:]], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (f"{cmd.where}: `{cmd.text}` exited with status {proc.returncode}\n"
                                      f"{_tail(proc.stderr) or _tail(proc.stdout)}")
        outputs.append((cmd, proc.stdout))
    batches = [(c, out) for c, out in outputs if c.argv[1] == "batch"]
    if len(batches) >= 2:  # the tutorial runs the cohort twice and says the second run reuses every case
        assert "0 run now, 3 reused" in batches[-1][1], (f"{batches[-1][0].where}: the second batch run should reuse "
                                                        f"every case; it printed: {_tail(batches[-1][1], 3)}")
    sources: dict[str, Block] = {}
    for path in (REPO / "README.md", TUTORIAL):
        for block in code_blocks(path):
            if block.run and block.lang == "python":
                sources.setdefault(block.source, block)  # the same example in two places runs once
    for k, (source, block) in enumerate(sources.items()):
        script = tmp_path / f"example{k}.py"
        script.write_text(source, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (f"{block.where}: the Python example exited with status {proc.returncode}\n"
                                      f"{_tail(proc.stderr)}")
        assert proc.stdout.strip(), f"{block.where}: the Python example printed nothing"
    missing = [f for f in TUTORIAL_FILES if not (work / f).is_file()]
    assert not missing, f"{rel(TUTORIAL)}: files the tutorial points to were not written: {', '.join(missing)}"
