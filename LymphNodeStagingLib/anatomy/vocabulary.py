"""Anatomy label maps in one vocabulary: TotalSegmentator v2 'total' class ids and names, plus the phantom's ids
>= 200 for structures 'total' lacks (pulmonary artery, azygos vein, main bronchi).

* :func:`load_anatomy`: a multilabel file (v2 ids, v1 ids, a label table, or the label names TotalSegmentator stores
  in the NIfTI header extension) or a folder of per-structure masks (``<name>.nii.gz``), TotalSegmentator v1 or v2
  names; always mapped **by name**, never by id, into the vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .labels import EXTRA_CLASSES, TOTAL_CLASSES

log = logging.getLogger(__name__)

VOCABULARY = "totalsegmentator-total-v2"


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


def _v2_total() -> dict[int, str]:
    try:
        from totalsegmentator.map_to_binary import class_map

        return dict(class_map["total"])
    except Exception:  # noqa: BLE001 - TotalSegmentator is optional; the thoracic table suffices
        return {i: n for i, n in TOTAL_CLASSES.items() if i not in EXTRA_CLASSES}


_VOCAB: dict[int, str] | None = None


def vocabulary() -> dict[int, str]:
    """id -> name of the anatomy vocabulary (v2 'total' plus the ids >= 200)."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = {**_v2_total(), **EXTRA_CLASSES}
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
            raise InputError(f"{source}: label value {v} has no name in the label table; expected ids of the "
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
        raise InputError(f"{path}: cannot read the label table (expected JSON {{id: name}}): {exc}") from exc
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
        raise InputError(f"{path}: not found; expected a multilabel image or a folder of per-structure masks")
    if reference is not None and (img.GetSize() != reference.GetSize()
                                  or not np.allclose(img.GetOrigin(), reference.GetOrigin(), atol=1e-3)
                                  or not np.allclose(img.GetSpacing(), reference.GetSpacing(), atol=1e-5)
                                  or not np.allclose(img.GetDirection(), reference.GetDirection(), atol=1e-5)):
        img = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return img


def _load_multilabel(path: Path, version: str, label_table) -> sitk.Image:
    if version not in ("auto", "v1", "v2"):
        raise InputError(f"version '{version}' is unknown; expected auto, v1 or v2")
    try:
        src = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as a label image: {exc}") from exc
    if src.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr_f = sitk.GetArrayFromImage(src)
        if not np.allclose(arr_f, np.round(arr_f)):
            raise InputError(f"{path}: label map holds non-integer values; expected integer label ids")
    arr = sitk.GetArrayFromImage(src).astype(np.int64)
    if arr.min() < 0:
        raise InputError(f"{path}: negative label values; expected label ids >= 0")
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
        raise InputError(f"{folder}: no mask files (<structure>.nii.gz) in the folder")
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
            raise InputError(f"{p}: size {m.GetSize()} differs from {files[0].name} {ref.GetSize()}; expected masks "
                             "on one grid")
        sel = sitk.GetArrayViewFromImage(m) > 0
        out[sel & (out == 0)] = target
    if ref is None:
        raise InputError(f"{folder}: none of the {len(files)} mask names is a TotalSegmentator v1/v2 structure "
                         f"(e.g. {', '.join(unknown[:5])})")
    if unknown:
        log.warning("%s: masks not in the anatomy vocabulary, ignored: %s", folder, ", ".join(unknown))
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ref)
    return img
