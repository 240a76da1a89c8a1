"""A PET/CT case as the pipeline reads it: CT in HU, PET in SUVbw (computed from the DICOM header, or declared by the
user for an image file), both checked to lie in one patient space.

* :func:`load_case` reads CT and PET from DICOM folders (series found by modality) or image files (NIfTI, NRRD, MHA);
  PET from an image file must already be SUV (``pet_is_suv=True``).
* PET and CT keep their own grids; :func:`~LymphNodeStagingLib.io.images.check_same_space` refuses different frames
  of reference or no overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError, UsageError
from ..io.dicom_series import find_series
from ..io.images import check_same_space, describe_grid, load_ct, read_image_file
from .conversion import compute_suv


@dataclass
class Case:
    """One PET/CT study: CT in HU and PET in SUV (float32), each on its own grid, with where they came from."""

    ct: sitk.Image
    pet: sitk.Image
    suv: dict = field(default_factory=dict)  # SUV provenance (SuvProvenance.to_dict() or the user's declaration)
    ct_path: str = ""
    pet_path: str = ""
    ct_series_uid: str | None = None
    pet_series_uid: str | None = None
    frame_of_reference_uid: str | None = None

    def geometry(self) -> dict:
        return {"ct": describe_grid(self.ct), "pet": describe_grid(self.pet),
                "frame_of_reference_uid": self.frame_of_reference_uid}


def load_pet(path: str | Path, *, pet_is_suv: bool = False, suv_mode: str = "qiba",
             series: str | None = None) -> tuple[sitk.Image, dict, str | None, str | None]:
    """PET in SUVbw (float32); returns (image, SUV provenance, SeriesInstanceUID, FrameOfReferenceUID)."""
    path = Path(path)
    if path.is_dir():
        ser = find_series(path, "PT", series)
        if pet_is_suv:
            prov = {"mode": "user", "decisions": ["pet_is_suv: rescaled stored values taken as SUV as declared"],
                    "warnings": ["SUV not computed from the DICOM header (pet_is_suv)", *ser.warnings]}
            return ser.to_image(ser.rescaled_array()), prov, ser.info.series_uid, ser.frame_of_reference_uid
        res = compute_suv(ser, suv_mode)
        return res.image, res.provenance.to_dict(), ser.info.series_uid, ser.frame_of_reference_uid
    decide_pet_is_suv(path, flag=pet_is_suv or None)
    img = read_image_file(path)
    prov = {"mode": "user", "decisions": [f"{path.name}: declared SUV by the user (pet_is_suv)"], "warnings": []}
    return img, prov, None, None


def load_case(ct: str | Path, pet: str | Path, *, pet_is_suv: bool = False, suv_mode: str = "qiba",
              series: str | None = None, ct_series: str | None = None) -> Case:
    """Load CT (HU) and PET (SUV) and check that they share one patient space.

    ``series`` chooses the PET series and ``ct_series`` the CT series when a folder holds several
    (SeriesInstanceUID, SeriesNumber or SeriesDescription). CT and PET may be the same DICOM folder."""
    ct_img, ct_uid, ct_for = load_ct(ct, ct_series)
    pet_img, prov, pet_uid, pet_for = load_pet(pet, pet_is_suv=pet_is_suv, suv_mode=suv_mode, series=series)
    check_same_space(ct_img, pet_img, ct_for, pet_for, names=(str(ct), str(pet)))
    return Case(ct=ct_img, pet=pet_img, suv=prov, ct_path=str(ct), pet_path=str(pet), ct_series_uid=ct_uid,
                pet_series_uid=pet_uid, frame_of_reference_uid=ct_for or pet_for)


# ------------------------------------------------------------------------------------------------ the PET-is-SUV rule

#: The --pet-is-suv choices and their values: the cohort column decides (None), every PET holds SUV (True), none
#: does (False). A bare ``--pet-is-suv`` means yes.
PET_IS_SUV_CHOICES: dict[str, bool | None] = {"declared": None, "yes": True, "no": False}


def parse_pet_is_suv(value: str | bool | None) -> bool | None:
    """The declaration from a --pet-is-suv choice or a bool (None: declared per row by the cohort column)."""
    if value is None or isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in PET_IS_SUV_CHOICES:
        raise UsageError(f"pet_is_suv {value!r}: expected declared (the cohort's pet_is_suv column decides; "
                         "undeclared PET image files are refused), yes (every PET holds SUV) or no (none does: "
                         "DICOM PET is converted, PET image files are refused)")
    return PET_IS_SUV_CHOICES[key]


def pet_is_suv_name(value: bool | None) -> str:
    """The --pet-is-suv choice of a declaration."""
    return {None: "declared", True: "yes", False: "no"}[value]


def decide_pet_is_suv(pet: str | Path | None, *, column: bool | None = None, flag: bool | None = None,
                      where: str = "") -> bool:
    """Whether a PET is taken as SUV: the cohort row's pet_is_suv column, else the command's flag; a DICOM series
    that neither declares is converted from its header (False). Raises InputError for a PET image file that nobody
    declared, and for a column that contradicts the flag: neither is guessed, either would change every SUV figure.
    """
    where = f"{where}: " if where else ""
    if column is not None and flag is not None and bool(column) != flag:
        raise InputError(f"{where}cohort column pet_is_suv={'yes' if column else 'no'} contradicts "
                         f"--pet-is-suv {pet_is_suv_name(flag)}; correct the column, or run with --pet-is-suv "
                         "declared to let the column decide")
    declared = flag if column is None else bool(column)
    if not declared and pet and not Path(pet).is_dir():
        if declared is None:
            how = ("declare that it holds SUV (cohort column pet_is_suv=yes, or --pet-is-suv yes) or give the DICOM "
                   "PET series folder")
        elif column is None:
            how = "--pet-is-suv no refuses PET image files; give the DICOM PET series folder"
        else:
            how = "the cohort column pet_is_suv=no refuses it; give the DICOM PET series folder"
        raise InputError(f"{where}PET file {pet} is an image without a DICOM header, so its SUV cannot be "
                         f"computed; {how}")
    return bool(declared)
