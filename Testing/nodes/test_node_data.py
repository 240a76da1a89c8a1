"""Node training data: the nodes_path column, the crop and working grid, the CT window, the truth on the grid, the
patient split."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.cohort.table import read_cohort, write_cohort
from LymphNodeStagingLib.errors import InputError, UsageError
from LymphNodeStagingLib.nodes.data import (
    NodeDataConfig,
    load_node_cases,
    make_case,
    node_crop,
    node_instances,
    split_by_patient,
    window_ct,
    working_grid,
)


def test_phantom_cohort_has_nodes_path(node_cohort):
    cohort = read_cohort(node_cohort)
    assert cohort.valid
    for row in cohort.rows:
        assert row.nodes_path is not None and row.nodes_path.is_file()
        assert row.nodes_path.name == "nodes.nii.gz"


def test_missing_nodes_file_is_a_cohort_error(node_cohort, tmp_path):
    rows = [r.to_dict() for r in read_cohort(node_cohort).rows[:1]]
    rows[0]["nodes_path"] = str(tmp_path / "absent.nii.gz")
    csv = write_cohort(rows, tmp_path / "c.csv")
    cohort = read_cohort(csv)
    assert not cohort.valid
    assert any(p.column == "nodes_path" and p.kind == "missing_file" for p in cohort.errors)


def test_window_ct():
    out = window_ct(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_cases_on_the_working_grid(node_cohort, node_cases, node_data_config):
    cfg = node_data_config
    rows = read_cohort(node_cohort).rows
    assert len(node_cases.cases) == len(rows) and not node_cases.skipped
    for case, row in zip(node_cases.cases, rows, strict=True):
        z, y, x = case.image.shape
        assert case.truth.shape == case.image.shape
        assert y >= cfg.min_inplane and x >= cfg.min_inplane and y % 16 == 0 and x % 16 == 0
        assert case.grid.spacing == cfg.spacing
        assert case.image.min() >= 0.0 and case.image.max() <= 1.0
        assert case.crop.source == "stations"
        # every node of the CT grid is on the working grid (the crop lies around the station map)
        truth_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(row.nodes_path)))
        ids, counts = np.unique(truth_ct[truth_ct > 0], return_counts=True)
        ids_grid = set(np.unique(case.truth).tolist()) - {0}
        assert ids_grid <= set(ids.tolist())
        # the coarse grid (8 CT voxels per working voxel) may lose the smallest nodes, never one of 16 voxels or more
        assert set(ids[counts >= 16].tolist()) <= ids_grid
        assert case.positive_slices.size > 0


def test_native_spacing_keeps_the_truth_exactly(node_cohort):
    """On the phantom's own 2 x 2 x 4 mm grid the working grid is voxel-aligned with the CT: nothing is lost."""
    row = read_cohort(node_cohort).rows[0]
    ct, nodes = sitk.ReadImage(str(row.ct_path)), sitk.ReadImage(str(row.nodes_path))
    case = make_case("x", ct, nodes, NodeDataConfig(), stations=sitk.ReadImage(str(row.stations_path)))
    truth_ct = sitk.GetArrayFromImage(nodes)
    assert case.mask.sum() == (truth_ct > 0).sum()
    assert set(np.unique(case.truth)) == set(np.unique(truth_ct))
    assert case.image.shape[1] >= 128 and case.image.shape[2] >= 128


def test_crop_sources_and_grid_padding(node_cohort):
    row = read_cohort(node_cohort).rows[0]
    ct = sitk.ReadImage(str(row.ct_path))
    by_stations = node_crop(ct, stations=sitk.ReadImage(str(row.stations_path)))
    by_anatomy = node_crop(ct, anatomy=sitk.ReadImage(str(row.anatomy_path)))
    whole = node_crop(ct)
    assert (by_stations.source, whole.source) == ("stations", "whole CT")
    assert by_anatomy.source.startswith("anatomy")
    assert np.all(by_stations.upper - by_stations.lower <= whole.upper - whole.lower + 1e-6)
    grid = working_grid(by_stations, NodeDataConfig(spacing=(2, 2, 4), min_inplane=128))
    assert grid.size[0] == grid.size[1] == 128  # 150 mm of crop at 2 mm -> padded to 128 voxels
    centre = np.asarray(grid.origin) + (np.asarray(grid.size) - 1) / 2 * np.asarray(grid.spacing)
    np.testing.assert_allclose(centre[:2], ((by_stations.lower + by_stations.upper) / 2)[:2], atol=2.0)


def test_binary_mask_becomes_instances_and_bad_maps_are_refused():
    arr = np.zeros((4, 10, 10), np.uint8)
    arr[1, 1:3, 1:3] = 1
    arr[2, 6:8, 6:8] = 1
    img = sitk.GetImageFromArray(arr)
    assert set(np.unique(sitk.GetArrayFromImage(node_instances(img)))) == {0, 1, 2}
    with pytest.raises(InputError, match="0 = background"):
        node_instances(sitk.GetImageFromArray(arr.astype(np.int16) - 1), "nodes_path x.nii.gz")
    with pytest.raises(InputError, match="fractional"):
        node_instances(sitk.GetImageFromArray(arr * 0.5), "nodes_path x.nii.gz")


def test_rows_without_nodes_are_skipped_and_counted(node_cohort, node_data_config):
    rows = read_cohort(node_cohort).rows
    rows[1].nodes_path = None
    loaded = load_node_cases(rows[:2], node_data_config)
    assert len(loaded.cases) == 1 and loaded.skipped_without_nodes == 1
    assert loaded.skipped[0]["scan_id"] == rows[1].scan_id


def test_split_by_patient_is_seeded_and_respects_the_split_column(node_cases):
    cases = node_cases.cases
    a = split_by_patient(cases, 0.25, seed=3)
    b = split_by_patient(cases, 0.25, seed=3)
    assert [c.case_id for c in a[1]] == [c.case_id for c in b[1]] and len(a[1]) == 1 and len(a[0]) == 3
    assert not {c.patient_id for c in a[0]} & {c.patient_id for c in a[1]}
    seen = {split_by_patient(cases, 0.25, seed=s)[1][0].case_id for s in range(12)}
    assert len(seen) > 1
    marked = [c for c in cases]
    original = [c.split for c in marked]
    try:
        marked[0].split, marked[1].split = "val", "test"
        train, val = split_by_patient(marked, 0.25, seed=0)
        assert [c.case_id for c in val] == [marked[0].case_id]
        assert marked[1] not in train and len(train) == len(cases) - 2
    finally:
        for c, s in zip(marked, original, strict=True):
            c.split = s


def test_bad_data_settings_are_usage_errors():
    with pytest.raises(UsageError, match="spacing"):
        NodeDataConfig(spacing=(0, 1, 1))
    with pytest.raises(UsageError, match="min_inplane"):
        NodeDataConfig(min_inplane=8)
    with pytest.raises(UsageError, match="unknown keys"):
        NodeDataConfig.from_dict({"spacing": [1, 1, 1], "colour": 3})
