"""Unusable checkpoints are refused fast, with a ModelError that names the file and never advises unsafe loading."""

from __future__ import annotations

import io
import math
import os
import time
import zipfile

import pytest
import torch

from LymphNodeStagingLib.classifier.checkpoint import load_model, save_checkpoint, verify_model, weights_sha256
from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier
from LymphNodeStagingLib.errors import ModelError
from LymphNodeStagingLib.paths import demo_model_path

#: torch's advice for files it refuses; a checkpoint made by lnstaging never needs it, so no message repeats it.
UNSAFE_ADVICE = ("weights_only=False", "set to `False`", "add_safe_globals", "safe_globals")


class _Pickled:
    pass


def _user_checkpoint(folder, **manifest) -> tuple:
    torch.manual_seed(0)
    cfg = ModelConfig.small(16)
    path = save_checkpoint(folder / "user.pt", StationClassifier(cfg),
                           {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5, **manifest},
                           sidecar=False)
    return path, torch.load(path, weights_only=True)


def _truncated(folder):
    data = demo_model_path().read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    return folder / "truncated.pt"


def _random_bytes(folder):
    (folder / "random.pt").write_bytes(os.urandom(4096))
    return folder / "random.pt"


def _empty(folder):
    (folder / "empty.pt").write_bytes(b"")
    return folder / "empty.pt"


def _plain_zip(folder):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    (folder / "archive.pt").write_bytes(buf.getvalue())
    return folder / "archive.pt"


def _other_torch_file(folder):
    torch.save([torch.zeros(3)], folder / "tensors.pt")
    return folder / "tensors.pt"


def _pickled_object(folder):
    torch.save({"format": "lnstaging-checkpoint", "obj": _Pickled()}, folder / "pickled.pt")
    return folder / "pickled.pt"


def _weight_changed(folder):
    path, payload = _user_checkpoint(folder)
    name = sorted(payload["state_dict"])[0]
    payload["state_dict"][name] += 0.01
    torch.save(payload, folder / "changed.pt")
    return folder / "changed.pt"


def _other_architecture(folder):
    """ModelConfig.small(16) weights under a manifest that claims the reference network."""
    path, payload = _user_checkpoint(folder)
    payload["manifest"]["model_config"] = ModelConfig().to_dict()
    torch.save(payload, folder / "other_arch.pt")
    return folder / "other_arch.pt"


def _missing_tensor(folder):
    path, payload = _user_checkpoint(folder)
    del payload["state_dict"]["fc.bias"]
    payload["manifest"]["weights_sha256"] = weights_sha256(payload["state_dict"])
    torch.save(payload, folder / "missing_tensor.pt")
    return folder / "missing_tensor.pt"


def _wrong_kind(folder):
    path, payload = _user_checkpoint(folder)
    payload["manifest"]["kind"] = "segmentation"
    torch.save(payload, folder / "kind.pt")
    return folder / "kind.pt"


def _bad_config(folder):
    path, payload = _user_checkpoint(folder)
    payload["manifest"]["model_config"]["layers"] = 3
    torch.save(payload, folder / "config.pt")
    return folder / "config.pt"


def _nan_weights(folder):
    path, payload = _user_checkpoint(folder)
    payload["state_dict"]["fc.bias"][0] = math.nan
    payload["manifest"]["weights_sha256"] = weights_sha256(payload["state_dict"])
    torch.save(payload, folder / "nan.pt")
    return folder / "nan.pt"


def _bad_threshold(folder):
    path, payload = _user_checkpoint(folder)
    payload["manifest"]["threshold"] = 2.0
    torch.save(payload, folder / "threshold.pt")
    return folder / "threshold.pt"


def _future_version(folder):
    path, payload = _user_checkpoint(folder)
    payload["format_version"] = 99
    torch.save(payload, folder / "version.pt")
    return folder / "version.pt"


def _missing(folder):
    return folder / "missing.pt"


def _folder(folder):
    (folder / "model.pt").mkdir()
    return folder / "model.pt"


CASES = {
    "truncated": (_truncated, "truncated or not a checkpoint made by `lnstaging train`"),
    "random bytes": (_random_bytes, "truncated or not a checkpoint made by `lnstaging train`"),
    "empty": (_empty, "truncated or not a checkpoint made by `lnstaging train`"),
    "zip, not a checkpoint": (_plain_zip, "truncated or not a checkpoint made by `lnstaging train`"),
    "other torch file": (_other_torch_file, "not an lnstaging checkpoint"),
    "pickled object": (_pickled_object, "pickled Python object"),
    "weight changed": (_weight_changed, "weights_sha256"),
    "other architecture": (_other_architecture, "tensor 'encoder.0.0.weight' has shape (4, 2, 3, 3, 3)"),
    "missing tensor": (_missing_tensor, "'fc.bias'"),
    "wrong kind": (_wrong_kind, "'segmentation'"),
    "bad model_config": (_bad_config, "model_config"),
    "NaN weights": (_nan_weights, "NaN"),
    "threshold": (_bad_threshold, "threshold"),
    "format version": (_future_version, "format_version 99"),
    "missing file": (_missing, "does not exist"),
    "folder": (_folder, "is a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("entry", ["load_model", "verify_model"])
def test_refused(tmp_path, case, entry):
    make, phrase = CASES[case]
    path = make(tmp_path)
    fn = load_model if entry == "load_model" else verify_model
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as info:
        fn(path)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert path.name in msg and phrase in msg, msg
    assert not any(advice in msg for advice in UNSAFE_ADVICE), msg
    assert elapsed < 3.0, f"refusing {case} took {elapsed:.2f} s"


def test_good_user_checkpoint_verifies(tmp_path):
    path, _ = _user_checkpoint(tmp_path)
    manifest = verify_model(path)
    model, manifest2 = load_model(path)
    assert manifest == manifest2 and manifest["kind"] == "station" and "bundled" not in manifest


def test_save_refuses_weights_that_do_not_fit_the_config(tmp_path):
    with pytest.raises(ModelError, match="encoder.0.0.weight"):
        save_checkpoint(tmp_path / "bad.pt", StationClassifier(ModelConfig.small(16)),
                        {"kind": "station", "model_config": ModelConfig().to_dict()})
    assert not (tmp_path / "bad.pt").exists()
