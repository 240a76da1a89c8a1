"""Atomic writes: nothing half-written under the final name, and the user's umask decides the permissions."""

from __future__ import annotations

import os
import stat

import pytest

from LymphNodeStagingLib.io.files import atomic_dir, atomic_path, digest, fingerprint, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask_022):
    f = write_json(tmp_path / "a" / "result.json", {"x": 1})
    assert stat.S_IMODE(f.stat().st_mode) == 0o644  # a colleague can read a shared cohort folder
    with atomic_dir(tmp_path / "case") as d:
        (d / "x.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "case").stat().st_mode) == 0o755
    os.umask(0o077)
    g = write_json(tmp_path / "private.json", {})
    assert stat.S_IMODE(g.stat().st_mode) == 0o600


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_changes_with_the_file(tmp_path):
    p = tmp_path / "ct.nii.gz"
    p.write_bytes(b"1")
    a = digest(fingerprint(p))
    p.write_bytes(b"22")
    assert digest(fingerprint(p)) != a
    assert fingerprint(tmp_path / "missing")["missing"] is True
