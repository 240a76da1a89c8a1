"""DICOM SEG export of the station map over a CT series, read back with highdicom and pydicom."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import headless_slicer
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from LymphNodeStagingLib.assessment.dicom_seg import station_codes, write_dicom_seg
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.staging.colors import probability_color
from LymphNodeStagingLib.staging.stations import STATIONS

hd = pytest.importorskip("highdicom")


def write_ct_series(image: sitk.Image, folder: Path, *, reverse_files: bool = True) -> list[Path]:
    """A minimal, valid CT series (one file per slice) with the geometry of ``image``; files named out of order."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nz = arr.shape[0]
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "CT", "Phantom"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Case", "SYN001", "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = dt.date(2026, 1, 2).strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.PixelSpacing = [image.GetSpacing()[1], image.GetSpacing()[0]]
        ds.SliceThickness = image.GetSpacing()[2]
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.clip(arr[k] + 1024, 0, 65535).astype(np.uint16).tobytes()
        path = folder / f"ct_{(nz - 1 - k) if reverse_files else k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def case():
    return headless_slicer.synthetic_case(size=(40, 36, 24), spacing=4.0)


def test_dicom_seg_round_trip(case, tmp_path):
    ct_dir = tmp_path / "ct"
    write_ct_series(case.ct, ct_dir)
    out = write_dicom_seg(case.stations, case.result, ct_dir, tmp_path / "out" / "stations.seg.dcm")
    assert out.is_file() and not list(out.parent.glob(".*part*"))

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    present = [st for st in STATIONS if np.any(sitk.GetArrayViewFromImage(case.stations) == st.label)]
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert labels == [f"Station {st.name}" for st in present]
    seg_4r = ds.SegmentSequence[labels.index("Station 4R")]
    assert seg_4r.SegmentedPropertyTypeCodeSequence[0].CodeValue == station_codes("4R")[1].value
    assert seg_4r.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning \
        == "Right"
    assert "malignancy probability 0.920; positive" in seg_4r.SegmentDescription
    rgb = hd.color.CIELabColor.from_dicom_value(seg_4r.RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(np.array(rgb) / 255.0, probability_color(0.92), atol=0.02)

    # pixels: highdicom rebuilds the label volume on the CT grid; compare with the station map
    seg = hd.seg.segread(out)
    ct_files = sorted(ct_dir.glob("*.dcm"))
    ct_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct_files]
    ct_pos = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in ct_files]
    order = np.argsort(ct_pos)
    uids = [ct_uids[i] for i in order]  # ascending z = sitk slice order
    volume = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False, ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True)
    expected = np.zeros_like(sitk.GetArrayFromImage(case.stations))
    lab = sitk.GetArrayFromImage(case.stations)
    for number, st in enumerate(present, start=1):
        expected[lab == st.label] = number
    assert np.array_equal(volume, expected)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(ct_files[0]).SeriesInstanceUID


def test_cropped_station_map_lands_on_the_ct_grid(case, tmp_path):
    ct_dir = tmp_path / "ct"
    write_ct_series(case.ct, ct_dir, reverse_files=False)
    crop = case.stations[5:35, 4:30, 3:21]  # a crop keeps physical positions
    out = write_dicom_seg(crop, case.result, ct_dir, tmp_path / "crop.seg.dcm")
    seg = hd.seg.segread(out)
    full_count = int((sitk.GetArrayViewFromImage(case.stations) == 8).sum())
    number = [s.SegmentLabel for s in seg.SegmentSequence].index("Station 4R") + 1
    mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                  for f in sorted(ct_dir.glob("*.dcm"))],
        segment_numbers=[number], ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    assert int(mask.sum()) == full_count


def test_bad_inputs(case, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_dicom_seg(case.stations, case.result, tmp_path / "nope", tmp_path / "x.dcm")
    ct_dir = tmp_path / "ct"
    write_ct_series(case.ct, ct_dir)
    empty = sitk.Image(case.stations.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(case.stations)
    with pytest.raises(InputError, match="no station voxels"):
        write_dicom_seg(empty, case.result, ct_dir, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
