"""The inputs of one case checked and loaded in one place: :func:`check_case` for a CT, a PET and an anatomy label
map (files, DICOM folders or images), :func:`check_row` for a cohort row. Both return the loaded, checked images, so
the caller does not read them again.

Order, cheapest first: the PET-is-SUV rule; every image file's header, grid and completeness (the file read to its
end); the memory estimate from the headers; then the voxels are read and checked (finite values, CT in HU, PET in
SUV, the grids of DICOM series and in-memory images); the anatomy label map; the memory estimate again with the
anatomy's registration box. Bounds: ``preflight.image_values`` and ``preflight.memory``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from ..errors import InputError
from ..io.images import IMAGE_SUFFIXES, check_same_space, load_ct, read_image_file
from ..suv.inputs import Case, decide_pet_is_suv, load_case, load_pet, parse_pet_is_suv
from .image_files import ImageHeader, check_complete, read_header
from .image_values import check_ct_values, check_finite, check_grid, check_image_grid, check_pet_values
from .memory import MemoryEstimate, atlas_voxels, check_memory, estimate_memory

log = logging.getLogger(__name__)

ImageInput = str | Path | sitk.Image


#: The SUV information of a case assessed from the CT alone (``CheckedCase.suv`` when no PET was given).
CT_ONLY_SUV: dict[str, Any] = {"mode": "none", "decisions": ["CT only: no PET given, no SUV"], "warnings": []}


@dataclass
class CheckedCase:
    """The checked inputs of one case: CT in HU and PET in SUV (float32; None for a CT alone) with their provenance,
    the anatomy label map when it was read, and the memory estimate it passed."""

    case: Case
    anatomy: sitk.Image | None = None
    from_dicom: bool = False
    dicom_sources: dict[str, str] = field(default_factory=dict)  # role -> DICOM folder
    memory: MemoryEstimate | None = None

    @property
    def ct(self) -> sitk.Image:
        return self.case.ct

    @property
    def pet(self) -> sitk.Image | None:
        return self.case.pet

    @property
    def ct_only(self) -> bool:
        """No PET was given: the case is assessed from the CT alone."""
        return self.case.pet is None

    @property
    def suv(self) -> dict:
        return self.case.suv


def _what(value: ImageInput, role: str, where: str, names: dict[str, str] | None) -> str:
    """How messages name an input: ``line 3 (P1): CT /data/ct.nii.gz`` or ``CT 'volume name'``."""
    if isinstance(value, sitk.Image):
        label = f"{role} {names[role]!r}" if names and role in names else f"{role} image"
    else:
        label = f"{role} {value}"
    return f"{where}: {label}" if where else label


def check_image_file(value: ImageInput, role: str, what: str) -> ImageHeader | None:
    """Before any voxel is read: an image file's header, grid and completeness (its header is returned); a folder
    must exist (a DICOM series, checked once read); an image's grid."""
    if isinstance(value, sitk.Image):
        check_image_grid(value, what)
        return None
    path = Path(value)
    if path.is_dir():
        return None
    if not path.exists():
        raise InputError(f"{what}: file or folder not found")
    try:
        header = read_header(path, role)
        check_grid(header.size, header.spacing, what)
        check_complete(path, role, header)
    except InputError as exc:
        message, prefix = str(exc), f"{role} {path}"
        if message.startswith(prefix):
            message = what + message[len(prefix):]
        elif not message.startswith(what):
            message = f"{what}: {message}"
        raise InputError(message) from None
    return header


def _check_anatomy_files(value: ImageInput, what: str) -> None:
    if isinstance(value, sitk.Image):
        check_image_grid(value, what)
        check_finite(value, what)
        return
    path = Path(value)
    if path.is_dir():  # a folder of per-structure masks
        for mask in sorted(path.iterdir()):
            if mask.is_file() and mask.name.lower().endswith(IMAGE_SUFFIXES):
                check_image_file(mask, "anatomy mask", f"{what}: mask {mask.name}")
        return
    check_image_file(path, "anatomy", what)


def check_case(ct: ImageInput, pet: ImageInput | None, *, anatomy: ImageInput | None = None,
               pet_is_suv: bool | str | None = None, suv_mode: str = "qiba", atlases: Any = None,
               read_anatomy: bool = True, mapping: bool = True, where: str = "",
               names: dict[str, str] | None = None) -> CheckedCase:
    """Check and load the inputs of one case before any heavy step; InputError naming the file and the reason.

    ``ct``/``pet``: image files, DICOM folders or SimpleITK images (a PET image holds SUV); ``pet`` None: a CT alone
    (no SUV rule, no PET check; the case's pet is None and its suv is ``CT_ONLY_SUV``). ``anatomy``: a label map
    file, folder of masks or image (None: TotalSegmentator will make one); with ``read_anatomy`` it is read onto the
    CT grid and returned, else only its files are checked. ``atlases``: the atlas set the mapping will use (for the
    memory estimate, which is checked only when the station ``mapping`` will run). ``where`` prefixes every message
    (e.g. the cohort line); ``names`` names in-memory images by role ("CT", "PET", "anatomy")."""
    ct_what = _what(ct, "CT", where, names)
    pet_what = _what(pet, "PET", where, names) if pet is not None else ""
    if pet is None or isinstance(pet, sitk.Image):
        declared = True
    else:
        declared = decide_pet_is_suv(pet, flag=parse_pet_is_suv(pet_is_suv), where=where)

    # 1. files, before any voxel is read
    ct_header = check_image_file(ct, "CT", ct_what)
    pet_header = check_image_file(pet, "PET", pet_what) if pet is not None else None
    anatomy_what = _what(anatomy, "anatomy", where, names) if anatomy is not None else ""
    if anatomy is not None:
        _check_anatomy_files(anatomy, anatomy_what)
    counted = atlas_voxels(atlases) if mapping else None
    if mapping and (ct_header is not None or isinstance(ct, sitk.Image)):
        grid = ct_header if ct_header is not None else ct
        check_memory(estimate_memory(grid, pet_header if pet_header is not None else
                                     (pet if isinstance(pet, sitk.Image) else None), atlases=atlases,
                                     atlas_count_voxels=counted),
                     ct_what, [_grid_text(grid)])

    # 2. the voxels
    case = _load(ct, pet, declared, suv_mode, ct_what, pet_what) if pet is not None else _load_ct_only(ct)
    given = [(k, v) for k, v in (("ct", ct), ("pet", pet)) if v is not None and not isinstance(v, sitk.Image)]
    from_dicom = any(Path(v).is_dir() for _, v in given)
    sources = {k: str(v) for k, v in given if Path(v).is_dir()}
    if ct_header is None:
        check_image_grid(case.ct, ct_what)
    if pet is not None and pet_header is None:
        check_image_grid(case.pet, pet_what)
    check_ct_values(case.ct, ct_what)
    if pet is not None:
        check_pet_values(case.pet, pet_what)

    # 3. the anatomy and the memory with its registration box
    anatomy_img = None
    if anatomy is not None and read_anatomy:
        anatomy_img = _read_anatomy(anatomy, case.ct)
    estimate = None
    if mapping:
        estimate = check_memory(estimate_memory(case.ct, case.pet, anatomy=anatomy_img, atlases=atlases,
                                                atlas_count_voxels=counted),
                                ct_what, [_grid_text(case.ct)])
    return CheckedCase(case, anatomy_img, from_dicom, sources, estimate)


def _grid_text(grid) -> str:
    if isinstance(grid, sitk.Image):
        size, spacing = grid.GetSize(), grid.GetSpacing()
    else:
        size, spacing = grid.size, grid.spacing
    return (f"CT {' x '.join(str(int(s)) for s in size)} voxels of "
            f"{' x '.join(f'{float(s):g}' for s in spacing)} mm")


def _float32(image: sitk.Image) -> sitk.Image:
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _load_ct_only(ct: ImageInput) -> Case:
    """The CT (HU, float32) of a case without PET: its pet is None, its suv ``CT_ONLY_SUV``."""
    if isinstance(ct, sitk.Image):
        ct_img, ct_uid, ct_for = ct, None, None
    else:
        ct_img, ct_uid, ct_for = load_ct(ct)
    return Case(ct=_float32(ct_img), pet=None, suv=copy.deepcopy(CT_ONLY_SUV),
                ct_path="" if isinstance(ct, sitk.Image) else str(ct), ct_series_uid=ct_uid,
                frame_of_reference_uid=ct_for)


def _load(ct: ImageInput, pet: ImageInput, declared: bool, suv_mode: str, ct_what: str, pet_what: str) -> Case:
    """CT (HU) and PET (SUV) as float32 in one patient space, with the SUV provenance."""
    if isinstance(ct, sitk.Image) or isinstance(pet, sitk.Image):
        if isinstance(ct, sitk.Image):
            ct_img, ct_for = ct, None
        elif Path(ct).is_dir():
            ct_img, _, ct_for = load_ct(ct)
        else:
            ct_img, ct_for = read_image_file(ct), None
        if isinstance(pet, sitk.Image):
            pet_img, pet_for = pet, None
            prov = {"mode": "user", "decisions": ["PET image given as SUV"], "warnings": []}
        else:
            pet_img, prov, _, pet_for = load_pet(pet, pet_is_suv=declared, suv_mode=suv_mode)
        ct_img, pet_img = _float32(ct_img), _float32(pet_img)
        check_same_space(ct_img, pet_img, ct_for, pet_for, names=(ct_what, pet_what))
        return Case(ct=ct_img, pet=pet_img, suv=prov,
                    ct_path="" if isinstance(ct, sitk.Image) else str(ct),
                    pet_path="" if isinstance(pet, sitk.Image) else str(pet), frame_of_reference_uid=ct_for or pet_for)
    case = load_case(ct, pet, pet_is_suv=declared, suv_mode=suv_mode)
    case.ct, case.pet = _float32(case.ct), _float32(case.pet)
    return case


def _read_anatomy(anatomy: ImageInput, ct: sitk.Image) -> sitk.Image:
    if isinstance(anatomy, sitk.Image):
        return anatomy
    from ..anatomy.vocabulary import load_anatomy

    return load_anatomy(anatomy, reference=ct)


def _field(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, dict) else getattr(row, name, None)


def row_where(row: Any) -> str:
    """How messages name a cohort row: ``line 3 (P1_S1_PETCT)``."""
    return f"line {_field(row, 'line')} ({_field(row, 'scan_id') or _field(row, 'patient_id')})"


def check_row(row: Any, *, pet_is_suv: bool | str | None = None, suv_mode: str = "qiba", atlases: Any = None,
              read_anatomy: bool = False, mapping: bool = True) -> CheckedCase:
    """:func:`check_case` for a cohort row (a ``CohortRow`` or the plain dict a cohort run sends to its workers):
    its ct_path, pet_path and anatomy_path, the PET-is-SUV rule of its pet_is_suv column and the command's
    ``pet_is_suv``; every message starts with the row's line and scan id."""
    where = row_where(row)
    ct_path, pet_path = _field(row, "ct_path"), _field(row, "pet_path")
    if not ct_path or not pet_path:
        raise InputError(f"{where}: ct_path and pet_path are required")
    declared = decide_pet_is_suv(pet_path, column=_field(row, "pet_is_suv"), flag=parse_pet_is_suv(pet_is_suv),
                                 where=where)
    return check_case(ct_path, pet_path, anatomy=_field(row, "anatomy_path") or None, pet_is_suv=declared,
                      suv_mode=suv_mode, atlases=atlases, read_anatomy=read_anatomy, mapping=mapping, where=where)


def check_mapping_inputs(ct: str | Path, anatomy: str | Path, *, atlases: Any = None,
                         names: tuple[str, str] = ("--ct", "--anatomy")) -> tuple[sitk.Image, sitk.Image]:
    """The inputs of a station mapping alone (``lnstaging map``): the CT file (its grid is the output grid) and the
    anatomy label map (a file, read as it is, or a TotalSegmentator folder), checked like :func:`check_case`'s, then
    the memory estimate with the anatomy's registration box. Returns (CT in float32, anatomy)."""
    ct_what, anatomy_what = f"{names[0]} {ct}", f"{names[1]} {anatomy}"
    if Path(ct).is_dir():
        raise InputError(f"{ct_what}: expected an image file, got a folder")
    ct_header = check_image_file(ct, "CT", ct_what)
    _check_anatomy_files(anatomy, anatomy_what)
    counted = atlas_voxels(atlases)
    check_memory(estimate_memory(ct_header, atlas_count_voxels=counted), ct_what, [_grid_text(ct_header)])
    ct_img = read_image_file(ct)
    check_ct_values(ct_img, ct_what)
    if Path(anatomy).is_dir():
        from ..anatomy.vocabulary import load_anatomy

        anatomy_img = load_anatomy(anatomy)
    else:
        try:
            anatomy_img = sitk.ReadImage(str(anatomy))
        except RuntimeError as exc:
            log.debug("SimpleITK could not read %s: %s", anatomy, exc)
            raise InputError(f"{anatomy_what}: cannot be read as a label image") from None
        check_finite(anatomy_img, anatomy_what)
    check_memory(estimate_memory(ct_img, anatomy=anatomy_img, atlas_count_voxels=counted), ct_what,
                 [_grid_text(ct_img)])
    return ct_img, anatomy_img


def check_images(ct: sitk.Image, pet: sitk.Image | None = None, *, names: dict[str, str] | None = None) -> None:
    """Images already in memory (the Slicer module's volumes), checked before a background assessment starts: the
    grids, the CT in HU and, when given, the PET as SUV (None: a PET whose SUV is computed from its DICOM header
    later, checked then). InputError naming the image (``names``: role -> name)."""
    ct_what = _what(ct, "CT", "", names)
    check_image_grid(ct, ct_what)
    check_ct_values(_float32(ct), ct_what)
    if pet is not None:
        pet_what = _what(pet, "PET", "", names)
        check_image_grid(pet, pet_what)
        check_pet_values(_float32(pet), pet_what)
