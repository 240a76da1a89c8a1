"""Anatomy vocabulary and loading of precomputed masks (v1/v2 ids, names, folders, header label tables)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.anatomy.vocabulary import (
    V1_CLASSES,
    id_of,
    ids_for,
    load_anatomy,
    read_nifti_label_names,
    vocabulary,
)
from LymphNodeStagingLib.errors import InputError


def _write(path, arr, spacing=(3.0, 3.0, 3.0)):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 20.0))
    sitk.WriteImage(img, str(path))
    return img


def test_vocabulary_is_v2_total_plus_extras():
    v = vocabulary()
    assert v[10] == "lung_upper_lobe_left" and v[16] == "trachea" and v[51] == "heart" and v[43] == "vertebrae_T1"
    assert v[200] == "pulmonary_artery" and v[201].startswith("azygos")
    assert id_of("heart_ventricle_left") == 51 and id_of("pulmonary_artery") == 200
    assert sorted(ids_for("lungs")) == [10, 11, 12, 13, 14]
    assert V1_CLASSES[13] == "lung_upper_lobe_left" and V1_CLASSES[43] == "trachea" and V1_CLASSES[41] == "vertebrae_C1"
    assert V1_CLASSES[34] == "vertebrae_T1" and len(V1_CLASSES) == 104


def test_v1_multilabel_mapped_by_name(tmp_path):
    arr = np.zeros((4, 5, 6), np.uint8)
    arr[0, 0, 0] = 13  # v1 lung_upper_lobe_left
    arr[1, 1, 1] = 43  # v1 trachea
    arr[2, 2, 2] = 45  # v1 heart_atrium_left -> heart
    arr[3, 3, 3] = 49  # v1 pulmonary_artery -> extra id 200
    arr[3, 4, 5] = 93  # v1 face -> not in the vocabulary, dropped
    src = _write(tmp_path / "v1.nii.gz", arr)
    out = load_anatomy(tmp_path / "v1.nii.gz", version="v1")
    a = sitk.GetArrayFromImage(out)
    assert (a[0, 0, 0], a[1, 1, 1], a[2, 2, 2], a[3, 3, 3], a[3, 4, 5]) == (10, 16, 51, 200, 0)
    assert out.GetOrigin() == src.GetOrigin() and out.GetPixelID() == sitk.sitkUInt16
    # v2 ids stay as they are
    v2 = sitk.GetArrayFromImage(load_anatomy(tmp_path / "v1.nii.gz", version="v2"))
    assert v2[0, 0, 0] == 13 and v2[1, 1, 1] == 43


def test_label_table_and_nifti_header_names(tmp_path):
    arr = np.zeros((3, 3, 3), np.uint8)
    arr[0, 0, 0], arr[1, 1, 1] = 1, 2
    _write(tmp_path / "custom.nii.gz", arr)
    (tmp_path / "labels.json").write_text(json.dumps({"1": "trachea", "2": "heart_myocardium"}))
    a = sitk.GetArrayFromImage(load_anatomy(tmp_path / "custom.nii.gz", label_table=tmp_path / "labels.json"))
    assert (a[0, 0, 0], a[1, 1, 1]) == (16, 51)
    # the label names TotalSegmentator writes into the NIfTI header extension
    import nibabel as nib

    img = nib.load(str(tmp_path / "custom.nii.gz"))
    xml = ('<CaretExtension><LabelTable><Label Key="1" Red="1"><![CDATA[esophagus]]></Label>\n'
           '<Label Key="2" Red="1"><![CDATA[aorta]]></Label></LabelTable></CaretExtension>')
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode()))
    nib.save(img, str(tmp_path / "named.nii.gz"))
    assert read_nifti_label_names(tmp_path / "named.nii.gz") == {1: "esophagus", 2: "aorta"}
    a = sitk.GetArrayFromImage(load_anatomy(tmp_path / "named.nii.gz"))
    assert (a[0, 0, 0], a[1, 1, 1]) == (15, 52)


def test_folder_of_masks_v1_and_v2_names(tmp_path):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for name, idx in [("lung_lower_lobe_right", 0), ("heart_ventricle_right", 1), ("trachea", 2),
                      ("not_a_structure", 3)]:
        arr = np.zeros((4, 4, 4), np.uint8)
        arr[idx, idx, idx] = 1
        _write(folder / f"{name}.nii.gz", arr)
    a = sitk.GetArrayFromImage(load_anatomy(folder))
    assert (a[0, 0, 0], a[1, 1, 1], a[2, 2, 2], a[3, 3, 3]) == (14, 51, 16, 0)


def test_resampled_onto_reference(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[1:3, 1:3, 1:3] = 16
    _write(tmp_path / "a.nii.gz", arr)
    ref = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    ref.SetSpacing((1.5, 1.5, 1.5))
    ref.SetOrigin((-10.75, 4.25, 19.25))
    out = load_anatomy(tmp_path / "a.nii.gz", reference=ref)
    assert out.GetSize() == (8, 8, 8) and set(np.unique(sitk.GetArrayFromImage(out))) == {0, 16}


def test_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_anatomy(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no mask files"):
        load_anatomy(tmp_path / "empty")
    arr = np.zeros((2, 2, 2), np.uint16)
    arr[0, 0, 0] = 150
    _write(tmp_path / "bad.nii.gz", arr)
    with pytest.raises(InputError, match="label value 150 has no name"):
        load_anatomy(tmp_path / "bad.nii.gz", version="v1")
    with pytest.raises(InputError, match="version"):
        load_anatomy(tmp_path / "bad.nii.gz", version="v3")
