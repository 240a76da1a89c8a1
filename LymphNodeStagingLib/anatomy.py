"""Anatomy label maps in one vocabulary: TotalSegmentator v2 'total' class ids and names, plus the phantom's ids
>= 200 for structures 'total' lacks (pulmonary artery, azygos vein, main bronchi).

* :func:`load_anatomy`: a multilabel file (v2 ids, v1 ids, a label table, or the label names TotalSegmentator stores
  in the NIfTI header extension) or a folder of per-structure masks (``<name>.nii.gz``), TotalSegmentator v1 or v2
  names; always mapped **by name**, never by id, into the vocabulary.
* :func:`run_totalsegmentator`: a real TotalSegmentator run (fast 3 mm model, thoracic ``roi_subset``) as a
  subprocess, with usage statistics switched off, the weights checked before the call and network access blocked
  inside the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LNSError
from .fileio import write_image, write_json

log = logging.getLogger(__name__)

VOCABULARY = "totalsegmentator-total-v2"


class AnatomyError(LNSError, ValueError):
    """An anatomy label map that cannot be mapped to the vocabulary, or a failed TotalSegmentator run."""


class TotalSegmentatorWeightsError(AnatomyError):
    """The TotalSegmentator model weights are not installed (nothing is downloaded at run time)."""


# Thoracic subset of the v2 'total' classes (ids as TotalSegmentator 2 writes them); the full table is taken from the
# installed TotalSegmentator package when it is available.
_V2_THORAX: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left",
    10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea", 17: "thyroid_gland",
    **{32 + i: f"vertebrae_T{12 - i}" for i in range(12)}, 44: "vertebrae_C7",
    51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right",
    56: "subclavian_artery_left", 57: "common_carotid_artery_right", 58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right", 61: "atrial_appendage_left",
    62: "superior_vena_cava", 63: "inferior_vena_cava", 71: "scapula_left", 72: "scapula_right",
    73: "clavicula_left", 74: "clavicula_right", 79: "spinal_cord", 86: "autochthon_left", 87: "autochthon_right",
    **{91 + k: f"rib_left_{k}" for k in range(1, 13)}, **{103 + k: f"rib_right_{k}" for k in range(1, 13)},
    116: "sternum", 117: "costal_cartilages",
}

_EXTRA_DEFAULT = {200: "pulmonary_artery", 201: "azygos_vein", 202: "main_bronchus_right", 203: "main_bronchus_left"}

# TotalSegmentator v1 (1.5.x) 'total' class ids -> names (104 classes).
V1_CLASSES: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta",
    8: "inferior_vena_cava", 9: "portal_vein_and_splenic_vein", 10: "pancreas", 11: "adrenal_gland_right",
    12: "adrenal_gland_left", 13: "lung_upper_lobe_left", 14: "lung_lower_lobe_left", 15: "lung_upper_lobe_right",
    16: "lung_middle_lobe_right", 17: "lung_lower_lobe_right",
    **{18 + i: v for i, v in enumerate([f"vertebrae_L{k}" for k in range(5, 0, -1)]
                                       + [f"vertebrae_T{k}" for k in range(12, 0, -1)]
                                       + [f"vertebrae_C{k}" for k in range(7, 0, -1)])},
    42: "esophagus", 43: "trachea", 44: "heart_myocardium", 45: "heart_atrium_left", 46: "heart_ventricle_left",
    47: "heart_atrium_right", 48: "heart_ventricle_right", 49: "pulmonary_artery", 50: "brain",
    51: "iliac_artery_left", 52: "iliac_artery_right", 53: "iliac_vena_left", 54: "iliac_vena_right",
    55: "small_bowel", 56: "duodenum", 57: "colon",
    **{57 + k: f"rib_left_{k}" for k in range(1, 13)}, **{69 + k: f"rib_right_{k}" for k in range(1, 13)},
    82: "humerus_left", 83: "humerus_right", 84: "scapula_left", 85: "scapula_right", 86: "clavicula_left",
    87: "clavicula_right", 88: "femur_left", 89: "femur_right", 90: "hip_left", 91: "hip_right", 92: "sacrum",
    93: "face", 94: "gluteus_maximus_left", 95: "gluteus_maximus_right", 96: "gluteus_medius_left",
    97: "gluteus_medius_right", 98: "gluteus_minimus_left", 99: "gluteus_minimus_right", 100: "autochthon_left",
    101: "autochthon_right", 102: "iliopsoas_left", 103: "iliopsoas_right", 104: "urinary_bladder",
}

#: v1 (and other) names that differ from the vocabulary's names.
NAME_ALIASES: dict[str, str] = {
    "heart_myocardium": "heart", "heart_atrium_left": "heart", "heart_ventricle_left": "heart",
    "heart_atrium_right": "heart", "heart_ventricle_right": "heart", "pulmonary_artery": "pulmonary_artery",
    "azygos": "azygos_vein", "pulmonary_trunk": "pulmonary_artery",
}

#: Named groups of structures.
GROUPS: dict[str, tuple[str, ...]] = {
    "lungs": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right"),
    "trachea": ("trachea",),
    "heart": ("heart",),
}

#: The structures the station mapping uses: TotalSegmentator's roi_subset for the thorax.
THORACIC_ROI: tuple[str, ...] = (
    *GROUPS["lungs"], "esophagus", "trachea", "thyroid_gland", *[f"vertebrae_T{k}" for k in range(1, 13)],
    "vertebrae_C7", "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava",
    "inferior_vena_cava", "clavicula_left", "clavicula_right", "sternum", "spinal_cord",
)


def _extra_classes() -> dict[int, str]:
    try:
        from .phantom.labels import EXTRA_CLASSES

        return dict(EXTRA_CLASSES)
    except ImportError:  # pragma: no cover - the phantom package is part of the library
        return dict(_EXTRA_DEFAULT)


def _v2_total() -> dict[int, str]:
    try:
        from totalsegmentator.map_to_binary import class_map

        return dict(class_map["total"])
    except Exception:  # noqa: BLE001 - TotalSegmentator is optional; the thoracic table suffices
        return dict(_V2_THORAX)


_VOCAB: dict[int, str] | None = None


def vocabulary() -> dict[int, str]:
    """id -> name of the anatomy vocabulary (v2 'total' plus the ids >= 200)."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = {**_v2_total(), **_extra_classes()}
    return dict(_VOCAB)


_BY_NAME: dict[str, int] | None = None


def id_of(name: str) -> int | None:
    """The vocabulary id of a v1 or v2 structure name, case-insensitive (None when the vocabulary lacks it)."""
    global _BY_NAME
    if _BY_NAME is None:
        _BY_NAME = {}
        for i, n in sorted(vocabulary().items()):
            _BY_NAME.setdefault(n.lower(), i)
    return _BY_NAME.get(canonical_name(name).lower())


def canonical_name(name: str) -> str:
    """The vocabulary's name for a v1/v2 name (v1 heart chambers -> heart, ...)."""
    n = name.strip()
    return NAME_ALIASES.get(n.lower(), n)


def ids_for(group_or_names: str | Iterable[str]) -> list[int]:
    """Vocabulary ids of a group ("lungs", "trachea", "heart") or of a list of names."""
    names = GROUPS.get(group_or_names, (group_or_names,)) if isinstance(group_or_names, str) else group_or_names
    return [i for i in (id_of(n) for n in names) if i is not None]


# ------------------------------------------------------------------------------------------------ loading


def _relabel(arr: np.ndarray, id_to_name: dict[int, str], source: str) -> tuple[np.ndarray, list[str]]:
    """Map a label array with ids named by ``id_to_name`` into vocabulary ids; returns (array, dropped names)."""
    out = np.zeros(arr.shape, dtype=np.uint16)
    dropped = []
    present = [int(v) for v in np.unique(arr) if v != 0]
    for v in present:
        if v not in id_to_name:
            raise AnatomyError(f"{source}: label value {v} has no name in the label table; expected ids of the "
                               "table (v1, v2 or a label file)")
        target = id_of(id_to_name[v])
        if target is None:
            dropped.append(id_to_name[v])
            continue
        out[arr == v] = target
    if dropped:
        log.warning("%s: structures not in the anatomy vocabulary, dropped: %s", source, ", ".join(sorted(dropped)))
    return out, dropped


def read_nifti_label_names(path: str | Path) -> dict[int, str] | None:
    """The id -> name table TotalSegmentator stores in the NIfTI header extension of a multilabel file, if any."""
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        return None
    try:
        import nibabel as nib

        ext = nib.load(str(path)).header.extensions
    except Exception:  # noqa: BLE001 - a plain file without extensions
        return None
    for e in ext:
        text = e.get_content()
        text = text.decode("utf-8", errors="ignore") if isinstance(text, bytes) else str(text)
        pairs = re.findall(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]*)\]\]></Label>', text)
        if pairs:
            return {int(k): v for k, v in pairs}
    return None


def _label_table(table) -> dict[int, str]:
    if isinstance(table, dict):
        return {int(k): str(v) for k, v in table.items()}
    path = Path(table)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnatomyError(f"{path}: cannot read the label table (expected JSON {{id: name}}): {exc}") from exc
    return {int(k): str(v) for k, v in data.items()}


def _is_image(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"))


def _stem(path: Path) -> str:
    n = path.name
    for s in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if n.lower().endswith(s):
            return n[: -len(s)]
    return n


def load_anatomy(path_or_folder: str | Path, *, version: str = "auto", label_table=None,
                 reference: sitk.Image | None = None) -> sitk.Image:
    """An anatomy label map (uint16, ids of the vocabulary) from a multilabel file or a folder of per-structure files.

    ``version``: "auto" (the names in the NIfTI header extension if present, else v2 ids), "v2", "v1";
    ``label_table``: dict or JSON file {id: name} for other multilabel files (wins over ``version``).
    ``reference``: resample onto this grid (nearest neighbour) when the masks are on another grid."""
    path = Path(path_or_folder)
    if path.is_dir():
        img = _load_folder(path)
    elif path.is_file():
        img = _load_multilabel(path, version, label_table)
    else:
        raise AnatomyError(f"{path}: not found; expected a multilabel image or a folder of per-structure masks")
    if reference is not None and (img.GetSize() != reference.GetSize()
                                  or not np.allclose(img.GetOrigin(), reference.GetOrigin(), atol=1e-3)
                                  or not np.allclose(img.GetSpacing(), reference.GetSpacing(), atol=1e-5)
                                  or not np.allclose(img.GetDirection(), reference.GetDirection(), atol=1e-5)):
        img = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return img


def _load_multilabel(path: Path, version: str, label_table) -> sitk.Image:
    if version not in ("auto", "v1", "v2"):
        raise AnatomyError(f"version '{version}' is unknown; expected auto, v1 or v2")
    try:
        src = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise AnatomyError(f"{path}: cannot be read as a label image: {exc}") from exc
    if src.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr_f = sitk.GetArrayFromImage(src)
        if not np.allclose(arr_f, np.round(arr_f)):
            raise AnatomyError(f"{path}: label map holds non-integer values; expected integer label ids")
    arr = sitk.GetArrayFromImage(src).astype(np.int64)
    if arr.min() < 0:
        raise AnatomyError(f"{path}: negative label values; expected label ids >= 0")
    if label_table is not None:
        table, how = _label_table(label_table), "label table"
    elif version == "v1":
        table, how = V1_CLASSES, "TotalSegmentator v1 ids"
    else:
        names = read_nifti_label_names(path) if version == "auto" else None
        table, how = (names, "names in the NIfTI header") if names else (vocabulary(), "v2 ids")
    out, _ = _relabel(arr, table, f"{path} ({how})")
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(src)
    return img


def _load_folder(folder: Path) -> sitk.Image:
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))
    if not files:
        raise AnatomyError(f"{folder}: no mask files (<structure>.nii.gz) in the folder")
    ref = None
    out = None
    unknown = []
    for p in files:
        name = _stem(p)
        target = id_of(name)
        if target is None:
            unknown.append(name)
            continue
        m = sitk.ReadImage(str(p))
        if ref is None:
            ref = m
            out = np.zeros(sitk.GetArrayViewFromImage(m).shape, dtype=np.uint16)
        elif m.GetSize() != ref.GetSize():
            raise AnatomyError(f"{p}: size {m.GetSize()} differs from {files[0].name} {ref.GetSize()}; expected masks "
                               "on one grid")
        sel = sitk.GetArrayViewFromImage(m) > 0
        out[sel & (out == 0)] = target
    if ref is None:
        raise AnatomyError(f"{folder}: none of the {len(files)} mask names is a TotalSegmentator v1/v2 structure "
                           f"(e.g. {', '.join(unknown[:5])})")
    if unknown:
        log.warning("%s: masks not in the anatomy vocabulary, ignored: %s", folder, ", ".join(unknown))
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ref)
    return img


# ------------------------------------------------------------------------------------------------ TotalSegmentator

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


def totalseg_home(home_dir: str | Path | None = None) -> Path:
    if home_dir is not None:
        return Path(home_dir)
    if "TOTALSEG_HOME_DIR" in os.environ:
        return Path(os.environ["TOTALSEG_HOME_DIR"])
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator"


def weights_dir(home_dir: str | Path | None = None) -> Path:
    if home_dir is None and "TOTALSEG_WEIGHTS_PATH" in os.environ:
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    return totalseg_home(home_dir) / "nnunet" / "results"


def required_tasks(fast: bool = True, roi_subset: Iterable[str] | None = None) -> list[int]:
    """TotalSegmentator tasks a run needs: 297 (fast, 3 mm) or 291-295; roi_subset adds 298 (6 mm crop model)."""
    tasks = [297] if fast else [291, 292, 293, 294, 295]
    if roi_subset:
        tasks.append(298)
    return tasks


def check_weights(fast: bool = True, roi_subset: Iterable[str] | None = None,
                  home_dir: str | Path | None = None) -> Path:
    """Raise :class:`TotalSegmentatorWeightsError` (with offline installation steps) unless the weights are there."""
    wdir = weights_dir(home_dir)
    missing = []
    for task in required_tasks(fast, roi_subset):
        folder = wdir / MODEL_FOLDERS[task]
        if not any(folder.glob("*/fold_0/checkpoint_final.pth")):
            missing.append((task, folder))
    if missing:
        lines = "; ".join(f"task {t}: {f}" for t, f in missing)
        raise TotalSegmentatorWeightsError(
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
                         progress: Callable[[float, str], None] | None = None) -> Path:
    """Run TotalSegmentator on ``ct_path`` (NIfTI) in a subprocess and write the anatomy label map (vocabulary ids,
    CT grid) to ``out_path``. ``device``: "cpu", "gpu" or "gpu:N". Usage statistics off, weights checked first,
    network blocked inside the run."""
    ct_path, out_path = Path(ct_path), Path(out_path)
    if not ct_path.is_file():
        raise AnatomyError(f"{ct_path}: CT file not found (expected a NIfTI image)")
    if device not in ("cpu", "gpu") and not re.fullmatch(r"gpu:\d+", device):
        raise AnatomyError(f"device '{device}' is unknown; expected cpu, gpu or gpu:N")
    roi = list(roi_subset) if roi_subset else None
    if roi:
        v2_names = set(_v2_total().values())
        bad = [r for r in roi if r not in v2_names]
        if bad:
            raise AnatomyError(f"roi_subset: {', '.join(bad)} are not TotalSegmentator 'total' classes")
    home = totalseg_home(home_dir)
    write_totalseg_config(home)
    check_weights(fast, roi, home)
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["TOTALSEG_HOME_DIR"] = str(home)
    if home_dir is not None:
        run_env.pop("TOTALSEG_WEIGHTS_PATH", None)
    if progress is not None:
        progress(0.05, "TotalSegmentator running")
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
            raise AnatomyError(f"TotalSegmentator on {ct_path} did not finish within {timeout_s} s") from exc
        if proc.returncode != 0 or not raw.is_file() or raw.stat().st_size == 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise AnatomyError(f"TotalSegmentator on {ct_path} failed (exit {proc.returncode}): {tail}")
        log.debug("TotalSegmentator output: %s", proc.stdout[-2000:])
        labels = load_anatomy(raw, version="v2")
    if labels.GetSize() == ct_img.GetSize():
        labels.CopyInformation(ct_img)
    else:
        labels = sitk.Resample(labels, ct_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    write_image(labels, out_path)
    if progress is not None:
        progress(1.0, "TotalSegmentator done")
    return out_path
