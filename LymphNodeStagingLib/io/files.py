"""Atomic file output: write to a temporary name in the same folder, then rename, so that a crash or kill never
leaves a half-written file under its final name. Files and folders get the permissions the user's umask gives
(as ``open`` and ``mkdir`` would), not the private 0600/0700 of temporary files, so that a shared cohort folder stays
readable by colleagues. Also the identity of input files (``fingerprint``) that caches are keyed by."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, folder: bool = False) -> None:
    """Give a temporary file or folder the mode a normal create would: 0666 (0777 for folders) less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so writers that choose the format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _public(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing folder is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    _public(tmp, folder=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_image(image, path: str | Path, compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (format from the extension: .nii.gz, .nrrd, .mha)."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(path)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_figure(fig, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ identity


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, length: int = 20) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (first ``length`` characters)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def fingerprint(path: str | Path | None) -> dict | None:
    """Identity of an input file or folder without reading it: resolved path, size and modification time.

    A folder (a DICOM series) is summarised by a hash over the relative path, size and modification time of every
    file below it. A missing path gives ``{"path": ..., "missing": True}`` (the step that needs it then fails).
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    with contextlib.suppress(OSError):
        p = p.resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        entries = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                f = Path(root) / name
                try:
                    st = f.stat()
                except OSError:
                    continue
                entries.append((str(f.relative_to(p)), st.st_size, st.st_mtime_ns))
        return {"path": str(p), "files": len(entries), "digest": digest(entries, 32)}
    return {"path": str(p), "missing": True}


# ------------------------------------------------------------------------------------------------ output checks


def check_output(path: str | Path, *, folder: bool, parameter: str = "--out") -> Path:
    """Check, before any work, that an output folder (``folder``) or file can be created and written; returns the
    path. Raises InputError naming the parameter, the path and the reason (a file in the way, no permission)."""
    from ..errors import InputError

    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise InputError(f"{parameter} {p}: is a file; expected a folder (or a path where one can be created)")
    if not folder and p.is_dir():
        raise InputError(f"{parameter} {p}: is a folder; expected a file name, e.g. {p / 'out.nii.gz'}")
    # the nearest existing ancestor must be a writable folder
    probe = p if folder else p.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{parameter} {p}: {probe} is a file, so no folder can be created below it")
    target = p if (folder and p.exists()) else probe
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{parameter} {p}: {target} is not writable (permission denied)")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{parameter} {p}: the file exists and is not writable (permission denied)")
    return p
