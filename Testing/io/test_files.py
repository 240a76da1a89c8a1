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


def test_output_checks_name_the_culprit(tmp_path):
    from LymphNodeStagingLib.errors import InputError
    from LymphNodeStagingLib.io.files import check_output

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    with pytest.raises(InputError, match="is a file; expected a folder"):
        check_output(blocker, folder=True)
    with pytest.raises(InputError, match="is a file, so no folder can be created"):
        check_output(blocker / "sub" / "out.nii.gz", folder=False)
    with pytest.raises(InputError, match="is a folder; expected a file"):
        check_output(tmp_path, folder=False, parameter="OUT")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            with pytest.raises(InputError, match="not writable"):
                check_output(ro / "x", folder=True)
    finally:
        ro.chmod(0o755)
