"""A real TotalSegmentator run (fast 3 mm model, thoracic ``roi_subset``) as a subprocess, with usage statistics
switched off, the weights checked before the call and network access blocked inside the run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError, ProcessingError, UsageError
from ..io.files import write_image, write_json
from ..paths import ENV_TOTALSEG_HOME, ENV_TOTALSEG_WEIGHTS, totalseg_home, totalseg_weights_dir
from ..runtime import ProgressCallback, reporter
from .vocabulary import THORACIC_ROI, _v2_total, load_anatomy

log = logging.getLogger(__name__)

#: Model folders (under the weights folder) by TotalSegmentator task id.
MODEL_FOLDERS: dict[int, str] = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    297: "Dataset297_TotalSegmentator_total_3mm_1559subj",
    298: "Dataset298_TotalSegmentator_total_6mm_1559subj",
}
FAST_TRAINER_FOLDER = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


def required_tasks(fast: bool = True, roi_subset: Iterable[str] | None = None) -> list[int]:
    """TotalSegmentator tasks a run needs: 297 (fast, 3 mm) or 291-295; roi_subset adds 298 (6 mm crop model)."""
    tasks = [297] if fast else [291, 292, 293, 294, 295]
    if roi_subset:
        tasks.append(298)
    return tasks


def check_weights(fast: bool = True, roi_subset: Iterable[str] | None = None,
                  home_dir: str | Path | None = None) -> Path:
    """Raise :class:`ProcessingError` (with offline installation steps) unless the weights are there."""
    wdir = totalseg_weights_dir(home_dir)
    missing = []
    for task in required_tasks(fast, roi_subset):
        folder = wdir / MODEL_FOLDERS[task]
        if not any(folder.glob("*/fold_0/checkpoint_final.pth")):
            missing.append((task, folder))
    if missing:
        lines = "; ".join(f"task {t}: {f}" for t, f in missing)
        raise ProcessingError(
            f"TotalSegmentator weights not found ({lines}). Nothing is downloaded at run time. To install them "
            "offline: on a machine with internet run `totalseg_download_weights -t total_fast` (and "
            "`-t total_fastest` for the 6 mm crop model used with roi_subset), or download the release files "
            f"{', '.join(MODEL_FOLDERS[t] + '.zip' for t, _ in missing)} from "
            "github.com/wasserth/TotalSegmentator/releases (v2.0.0-weights); copy them to this machine and unzip "
            f"them into {wdir} (or import a zip with `totalseg_import_weights -i FILE.zip`). TOTALSEG_HOME_DIR or "
            "TOTALSEG_WEIGHTS_PATH choose another folder.")
    return wdir


def write_totalseg_config(home_dir: str | Path | None = None) -> Path:
    """Write $TOTALSEG_HOME_DIR/config.json with usage statistics switched off (other keys kept)."""
    home = totalseg_home(home_dir)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config: dict = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except ValueError:
            config = {}
    config.setdefault("totalseg_id", "lnstaging")
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    write_json(path, config)
    return path


_RUNNER = r"""
import json, sys
import socket
def _offline(event, args):
    if event == "socket.connect" and getattr(args[0], "family", None) == socket.AF_UNIX:
        return  # local inter-process connections of nnU-Net's worker processes
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        raise OSError(f"network access blocked during the TotalSegmentator run ({event})")
sys.addaudithook(_offline)
if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    from totalsegmentator.python_api import totalsegmentator
    totalsegmentator(a["input"], a["output"], ml=True, fast=a["fast"], device=a["device"],
                     roi_subset=a["roi_subset"], quiet=a["quiet"], nr_thr_resamp=1, nr_thr_saving=1)
"""


def run_totalsegmentator(ct_path: str | Path, out_path: str | Path, device: str = "cpu", fast: bool = True,
                         roi_subset: Iterable[str] | None = THORACIC_ROI, *, home_dir: str | Path | None = None,
                         timeout_s: float | None = None, env: dict[str, str] | None = None,
                         progress: ProgressCallback | None = None) -> Path:
    """Run TotalSegmentator on ``ct_path`` (NIfTI) in a subprocess and write the anatomy label map (vocabulary ids,
    CT grid) to ``out_path``. ``device``: "cpu", "gpu" or "gpu:N". Usage statistics off, weights checked first,
    network blocked inside the run."""
    ct_path, out_path = Path(ct_path), Path(out_path)
    if not ct_path.is_file():
        raise InputError(f"{ct_path}: CT file not found (expected a NIfTI image)")
    if device not in ("cpu", "gpu") and not re.fullmatch(r"gpu:\d+", device):
        raise UsageError(f"device '{device}' is unknown; expected cpu, gpu or gpu:N")
    roi = list(roi_subset) if roi_subset else None
    if roi:
        v2_names = set(_v2_total().values())
        bad = [r for r in roi if r not in v2_names]
        if bad:
            raise UsageError(f"roi_subset: {', '.join(bad)} are not TotalSegmentator 'total' classes")
    home = totalseg_home(home_dir)
    write_totalseg_config(home)
    check_weights(fast, roi, home)
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env[ENV_TOTALSEG_HOME] = str(home)
    if home_dir is not None:
        run_env.pop(ENV_TOTALSEG_WEIGHTS, None)
    report = reporter(progress)
    report(0.05, "TotalSegmentator running")
    ct_img = sitk.ReadImage(str(ct_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".totalseg.") as tmp:
        raw = Path(tmp) / "segmentation.nii.gz"
        args = {"input": str(ct_path), "output": str(raw), "fast": fast, "device": device, "roi_subset": roi,
                "quiet": True}
        try:
            proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], env=run_env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ProcessingError(f"TotalSegmentator on {ct_path} did not finish within {timeout_s} s") from exc
        if proc.returncode != 0 or not raw.is_file() or raw.stat().st_size == 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise ProcessingError(f"TotalSegmentator on {ct_path} failed (exit {proc.returncode}): {tail}")
        log.debug("TotalSegmentator output: %s", proc.stdout[-2000:])
        labels = load_anatomy(raw, version="v2")
    if labels.GetSize() == ct_img.GetSize():
        labels.CopyInformation(ct_img)
    else:
        labels = sitk.Resample(labels, ct_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    write_image(labels, out_path)
    report(1.0, "TotalSegmentator done")
    return out_path
