"""Writing phantom patients (NIfTI or DICOM), cohorts (cohort.csv + manifest) and atlas sets."""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import SimpleITK as sitk

from ..cohort.table import write_cohort
from ..errors import UsageError
from ..io.files import atomic_path, write_json
from ..runtime import Progress, ProgressCallback
from .patient import GENERATOR, GENERATOR_VERSION, PhantomConfig, PhantomPatient, generate_patient, patient_seed

log = logging.getLogger(__name__)

COHORT_COLUMNS: tuple[str, ...] = (
    "patient_id", "study", "series", "n_stage", "positive_stations", "tumour_side", "ct_path", "pet_path",
    "pet_is_suv", "anatomy_path", "stations_path", "lesion_path", "nodes_path", "truth_path", "true_n_stage",
    "true_positive_stations",
)
ATLAS_FORMAT = "lnstaging-atlas-set"


def write_nifti(image: sitk.Image, path: str | Path) -> Path:
    """Write a .nii.gz atomically and byte-reproducibly (gzip header without time stamp)."""
    path = Path(path)
    with atomic_path(path.with_suffix("").with_suffix(".nii")) as tmp:
        sitk.WriteImage(image, str(tmp), False)
        raw = tmp.read_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(raw)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    path.with_suffix("").with_suffix(".nii").unlink(missing_ok=True)
    return path


def write_patient(patient: PhantomPatient, out_dir: str | Path, format: str = "nifti") -> dict[str, Path]:
    """Write one patient into ``out_dir`` (created): images, truth.json; returns the paths by role.

    NIfTI: ct, pet, anatomy, stations, nodes, lesions as .nii.gz. DICOM: ct/ and pet/ series folders (PET in Bq/ml
    with a standard radiopharmaceutical header) plus the label maps as .nii.gz.
    """
    if format not in ("nifti", "dicom"):
        raise UsageError(f"format must be 'nifti' or 'dicom', got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if format == "nifti":
        paths["ct"] = write_nifti(patient.ct, out / "ct.nii.gz")
        paths["pet"] = write_nifti(patient.pet, out / "pet.nii.gz")
    else:
        from .dicom import PetHeader, uids_for, write_ct_series, write_pet_series

        u = uids_for(patient.patient_id, patient.seed)
        paths["ct"] = write_ct_series(patient.ct, out / "ct", patient_id=patient.patient_id, study_uid=u["study"],
                                      frame_of_reference_uid=u["frame"], series_uid=u["ct_series"], seed=patient.seed)
        paths["pet"] = write_pet_series(patient.pet, out / "pet", PetHeader.variant("standard", patient.seed),
                                        patient_id=patient.patient_id, study_uid=u["study"],
                                        frame_of_reference_uid=u["frame"], series_uid=u["pet_series"],
                                        seed=patient.seed)
    for key, img in (("anatomy", patient.anatomy), ("stations", patient.stations), ("nodes", patient.nodes),
                     ("lesions", patient.lesions)):
        paths[key] = write_nifti(img, out / f"{key}.nii.gz")
    paths["truth"] = write_json(out / "truth.json", {**patient.truth, "manifest": patient.manifest})
    return paths


def generate_cohort(out_dir: str | Path, patients: int, seed: int, size: str = "small", format: str = "nifti",
                    config: PhantomConfig | None = None, progress: ProgressCallback | None = None,
                    preview: bool = False) -> Path:
    """Generate ``patients`` patients into out_dir/<patient_id>/ and write out_dir/cohort.csv and manifest.json."""
    if patients < 1:
        raise UsageError(f"patients must be >= 1, got {patients}")
    config = config or PhantomConfig()
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(patients):
        pid = f"PH{i + 1:04d}"
        p = generate_patient(patient_seed(seed, i), size, config, patient_id=pid)
        paths = write_patient(p, out / pid, format)
        if preview:
            from .preview import write_preview

            write_preview(p, out / pid / "preview.png")
        rel = {k: v.relative_to(out).as_posix() for k, v in paths.items()}
        rep = p.truth["reported"]
        rows.append({
            "patient_id": pid, "study": "S1", "series": "PETCT", "n_stage": rep["n_stage"],
            "positive_stations": ";".join(rep["positive_stations"]), "tumour_side": p.truth["tumour_side"],
            "ct_path": rel["ct"], "pet_path": rel["pet"],
            # NIfTI PET holds SUV (declared); a DICOM series carries its own header and is converted
            "pet_is_suv": "yes" if format == "nifti" else "", "anatomy_path": rel["anatomy"],
            "stations_path": rel["stations"], "lesion_path": rel["lesions"], "nodes_path": rel["nodes"],
            "truth_path": rel["truth"],
            "true_n_stage": p.truth["n_stage"], "true_positive_stations": ";".join(p.truth["positive_stations"]),
        })
        log.info("phantom %s: %s %s", pid, p.truth["n_stage"], p.truth["positive_stations"])
        if progress:
            progress(Progress(i + 1, patients, f"patient {i + 1} of {patients}"))
    csv_path = write_cohort(rows, out / "cohort.csv", COHORT_COLUMNS)
    write_json(out / "manifest.json", {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "synthetic": True, "seed": int(seed),
        "patients": patients, "size": size, "format": format, "config": config.to_dict(),
        "patient_seeds": {r["patient_id"]: patient_seed(seed, i) for i, r in enumerate(rows)},
    })
    return csv_path


def generate_atlas_set(out_dir: str | Path, atlases: int = 5, seed: int = 20260101, size: str = "full",
                       name: str | None = None, progress: ProgressCallback | None = None) -> Path:
    """Write an atlas set (CT, anatomy, stations per atlas; no disease, noise-free CT) in the atlas-set format."""
    if atlases < 1:
        raise UsageError(f"atlases must be >= 1, got {atlases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PhantomConfig(disease=False, ct_noise_hu=0.0, pet_noise=False, label_noise=0.0)
    entries = []
    for i in range(atlases):
        aid = f"atlas{i + 1:02d}"
        p = generate_patient(patient_seed(seed, i), size, cfg, patient_id=aid)
        d = out / aid
        d.mkdir(parents=True, exist_ok=True)
        write_nifti(p.ct, d / "ct.nii.gz")
        write_nifti(p.anatomy, d / "anatomy.nii.gz")
        write_nifti(p.stations, d / "stations.nii.gz")
        entries.append({"id": aid, "ct": f"{aid}/ct.nii.gz", "anatomy": f"{aid}/anatomy.nii.gz",
                        "stations": f"{aid}/stations.nii.gz", "seed": p.seed})
        if progress:
            progress(Progress(i + 1, atlases, f"atlas {i + 1} of {atlases}"))
    write_json(out / "manifest.json", {
        "format": ATLAS_FORMAT, "format_version": 1,
        "name": name or f"synthetic-phantom-{atlases}-seed{seed}-{size}",
        "synthetic": True,
        "description": (f"Synthetic atlas set made by the LymphNodeStaging phantom generator {GENERATOR_VERSION} "
                        f"(seed {seed}, size {size}): not patient data."),
        "anatomy_vocabulary": "totalsegmentator-total-v2",
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": int(seed), "size": size,
        "atlases": entries,
    })
    return out
