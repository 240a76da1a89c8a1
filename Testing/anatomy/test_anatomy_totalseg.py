"""A real TotalSegmentator run, offline, with tiny random nnU-Net weights generated here at the fast models' paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.anatomy.totalsegmentator import FAST_TRAINER_FOLDER, MODEL_FOLDERS, run_totalsegmentator
from LymphNodeStagingLib.anatomy.vocabulary import THORACIC_ROI, id_of, vocabulary
from LymphNodeStagingLib.errors import ProcessingError

#: Recorded by every Python process started with this folder on PYTHONPATH: network attempts -> a file.
SITECUSTOMIZE = """
import os, socket, sys
_log = os.environ.get("LNS_NET_AUDIT_LOG")
def _hook(event, args):
    if event == "socket.connect" and getattr(args[0], "family", None) == socket.AF_UNIX:
        return  # local inter-process connections (multiprocessing managers) are not network access
    if _log and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
                          "urllib.Request"):
        with open(_log, "a") as f:
            f.write(f"{event} {args!r}\\n")
sys.addaudithook(_hook)
"""


def _plans(spacing: float, patch: int) -> dict:
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample = "resample_data_or_seg_to_shape"
    return {
        "dataset_name": "tiny", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [patch] * 3, "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "test",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": 0.0, "median": 0.0, "min": -1024.0, "percentile_00_5": -1000.0,
            "percentile_99_5": 1000.0, "std": 300.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1,
            "patch_size": [patch] * 3, "median_image_size_in_voxels": [patch] * 3, "spacing": [spacing] * 3,
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": resample, "resampling_fn_seg": resample, "resampling_fn_probabilities": resample,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": arch, "batch_dice": False,
        }},
    }


def make_tiny_weights(weights_dir: Path, task: int, spacing: float, seed: int, favour: str | None = None) -> Path:
    """plans.json, dataset.json, fold_0/checkpoint_final.pth of a random 2-stage U-Net with the 'total' labels.
    ``favour``: a class the network predicts everywhere (large output bias), so a crop model finds its ROI."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    names = vocabulary()
    labels = {"background": 0, **{names[i]: i for i in sorted(names) if i < 200}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    plans = _plans(spacing, 32)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, len(labels), allow_init=True, deep_supervision=False)
    state = net.state_dict()
    if favour is not None:
        bias_key = [k for k in state if k.endswith("bias") and state[k].shape[0] == len(labels)][-1]
        state[bias_key][labels[favour]] += 100.0
    folder = weights_dir / MODEL_FOLDERS[task] / FAST_TRAINER_FOLDER
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    torch.save({"network_weights": state, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": "cpu"},
                "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def make_ct(path: Path) -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = rng.normal(-700, 50, size=(48, 48, 48)).astype(np.int16)
    arr[16:32, 12:36, 12:36] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    img.SetOrigin((-70.0, -60.0, 100.0))
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.slow
def test_real_totalsegmentator_run_offline(tmp_path):
    home = tmp_path / "tshome"
    weights = home / "nnunet" / "results"
    make_tiny_weights(weights, 297, 3.0, seed=1)
    make_tiny_weights(weights, 298, 6.0, seed=2, favour="trachea")
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network.log"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "audit"), os.environ.get("PYTHONPATH", "")]),
           "LNS_NET_AUDIT_LOG": str(net_log), "TOTALSEG_WEIGHTS_PATH": ""}
    ct = make_ct(tmp_path / "ct.nii.gz")
    out = run_totalsegmentator(tmp_path / "ct.nii.gz", tmp_path / "anatomy.nii.gz", device="cpu", fast=True,
                               roi_subset=THORACIC_ROI, home_dir=home, env=env, timeout_s=240)
    config = json.loads((home / "config.json").read_text())
    assert config["send_usage_stats"] is False
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == ct.GetSize()
    np.testing.assert_allclose(seg.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(seg.GetDirection(), ct.GetDirection(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(seg)).tolist())
    allowed = {0} | {id_of(n) for n in THORACIC_ROI}
    assert values <= allowed and len(values) > 1
    # the audit hook was active in the run (the file is created only on an attempt) and recorded nothing
    assert not net_log.exists(), net_log.read_text()


def test_audit_hook_records_network_attempts(tmp_path):
    """The recording used above works: a process that tries to connect leaves a line."""
    import subprocess
    import sys

    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network.log"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "audit"), LNS_NET_AUDIT_LOG=str(net_log))
    code = "import socket\ntry:\n    socket.getaddrinfo('localhost', 9)\nexcept OSError:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert "socket.getaddrinfo" in net_log.read_text()


def test_missing_weights_error_says_how_to_install(tmp_path):
    (tmp_path / "ct.nii.gz").parent.mkdir(exist_ok=True)
    make_ct(tmp_path / "ct.nii.gz")
    with pytest.raises(ProcessingError) as info:
        run_totalsegmentator(tmp_path / "ct.nii.gz", tmp_path / "out.nii.gz", home_dir=tmp_path / "empty")
    msg = str(info.value)
    assert MODEL_FOLDERS[297] in msg and MODEL_FOLDERS[298] in msg
    assert "totalseg_download_weights" in msg and "offline" in msg and str(tmp_path / "empty") in msg
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["send_usage_stats"] is False
    assert not (tmp_path / "out.nii.gz").exists()
