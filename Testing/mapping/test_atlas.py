"""Atlas set loader validation and the Lynch et al. converter, on small atlases written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.mapping.atlas import convert_lynch, load_atlas_set


def _img(a, spacing=(4.0, 4.0, 4.0)):
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    return img


def _arrays(shape=(12, 12, 12)):
    ct = np.full(shape, -800, np.int16)
    anatomy = np.zeros(shape, np.uint8)
    anatomy[2:10, 5:7, 5:7] = 16  # trachea
    anatomy[1:3, 8:11, 4:8] = 51
    stations = np.zeros(shape, np.uint8)
    for lab in range(1, 18):
        stations.reshape(-1)[lab * 50] = lab
    return ct, anatomy, stations


def _write_set(root: Path, n=2, edit=None) -> Path:
    entries = []
    for k in range(n):
        ct, anatomy, stations = _arrays()
        images = {"ct": _img(ct), "anatomy": _img(anatomy), "stations": _img(stations)}
        if edit:
            edit(k, images)
        aid = f"atlas{k + 1:02d}"
        (root / aid).mkdir(parents=True)
        for key, img in images.items():
            sitk.WriteImage(img, str(root / aid / f"{key}.nii.gz"))
        entries.append({"id": aid, **{key: f"{aid}/{key}.nii.gz" for key in images}})
    manifest = {"format": "lnstaging-atlas-set", "format_version": 1, "name": "test", "synthetic": True,
                "description": "test", "anatomy_vocabulary": "totalsegmentator-total-v2", "atlases": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_load_valid_set(tmp_path):
    aset = load_atlas_set(_write_set(tmp_path))
    assert len(aset) == 2 and aset.synthetic and [a.id for a in aset.atlases] == ["atlas01", "atlas02"]
    assert sitk.GetArrayViewFromImage(aset.atlases[0].stations()).max() == 17
    assert [a.id for a in aset.subset(["atlas02"]).atlases] == ["atlas02"]
    with pytest.raises(InputError, match="not in atlas set"):
        aset.subset(["atlas09"])


def test_missing_manifest_and_bad_format(tmp_path):
    with pytest.raises(InputError, match="manifest.json is missing"):
        load_atlas_set(tmp_path)
    root = _write_set(tmp_path / "s")
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "format_version": 7}))
    with pytest.raises(InputError, match="format_version"):
        load_atlas_set(root)
    (root / "manifest.json").write_text(json.dumps({**m, "atlases": [m["atlases"][0], m["atlases"][0]]}))
    with pytest.raises(InputError, match="unique 'id'"):
        load_atlas_set(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_atlas_set(root)


def test_missing_file(tmp_path):
    root = _write_set(tmp_path)
    (root / "atlas02" / "stations.nii.gz").unlink()
    with pytest.raises(InputError, match=r"atlas atlas02: stations file .* does not exist"):
        load_atlas_set(root)


def test_mismatched_grid(tmp_path):
    def edit(k, images):
        if k == 1:
            images["anatomy"].SetSpacing((4.0, 4.0, 3.0))

    with pytest.raises(InputError, match=r"atlas atlas02: anatomy image .* not on the CT grid \(spacing"):
        load_atlas_set(_write_set(tmp_path, edit=edit))


def test_missing_station_and_unknown_labels(tmp_path):
    def drop(k, images):
        a = sitk.GetArrayFromImage(images["stations"])
        a[a == 11] = 0
        images["stations"] = _img(a)

    root = _write_set(tmp_path / "a", edit=drop)
    with pytest.raises(InputError, match=r"lacks stations \['7'\]"):
        load_atlas_set(root)
    assert len(load_atlas_set(root, allow_missing_stations=True)) == 2

    def bad_station(k, images):
        a = sitk.GetArrayFromImage(images["stations"])
        a[0, 0, 0] = 23
        images["stations"] = _img(a)

    with pytest.raises(InputError, match=r"label values \[23\]"):
        load_atlas_set(_write_set(tmp_path / "b", edit=bad_station))

    def bad_anatomy(k, images):
        a = sitk.GetArrayFromImage(images["anatomy"])
        a[0, 0, 0] = 150
        images["anatomy"] = _img(a)

    with pytest.raises(InputError, match=r"unknown label ids \[150\]"):
        load_atlas_set(_write_set(tmp_path / "c", edit=bad_anatomy))


def test_convert_lynch_station_masks_and_substations(tmp_path):
    src = tmp_path / "lynch"
    ct, anatomy, _ = _arrays()
    for case in ("patient1", "patient2"):
        d = src / case
        d.mkdir(parents=True)
        sitk.WriteImage(_img(ct), str(d / "ct.mhd"))
        sitk.WriteImage(_img(anatomy), str(d / "anatomy.nii.gz"))
        for name, index in (("4R", (3, 3, 3)), ("7L", (6, 6, 6)), ("7R", (6, 6, 7)), ("11Rs", (8, 8, 8))):
            m = np.zeros(ct.shape, np.uint8)
            m[index] = 1
            sitk.WriteImage(_img(m), str(d / f"station_{name}.mhd"))
    aset = load_atlas_set(convert_lynch(src, tmp_path / "out"), allow_missing_stations=True)
    assert len(aset) == 2 and not aset.synthetic
    st = sitk.GetArrayFromImage(aset.atlases[0].stations())
    assert st[3, 3, 3] == 8 and st[6, 6, 6] == 11 and st[6, 6, 7] == 11 and st[8, 8, 8] == 17
    assert sorted(np.unique(st).tolist()) == [0, 8, 11, 17]


def test_convert_lynch_without_anatomy_says_what_is_needed(tmp_path):
    d = tmp_path / "lynch" / "p1"
    d.mkdir(parents=True)
    sitk.WriteImage(_img(np.zeros((4, 4, 4), np.int16)), str(d / "ct.nii.gz"))
    sitk.WriteImage(_img(np.ones((4, 4, 4), np.uint8)), str(d / "4L.nii.gz"))
    with pytest.raises(InputError, match="no anatomy"):
        convert_lynch(tmp_path / "lynch", tmp_path / "out")
    assert not (tmp_path / "out").exists()
