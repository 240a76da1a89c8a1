"""Synthetic thoracic FDG PET/CT phantoms: anatomy in TotalSegmentator vocabulary, the 17 IASLC stations, lymph
nodes, a primary tumour, metastatic spread, confounders and image-level labels; NIfTI/DICOM output, cohorts and
atlas sets. Deterministic: the same seed gives the same bytes."""

from .atlas_cache import build_demo_atlas_set
from .patient import PhantomConfig, PhantomPatient, generate_patient, patient_seed
from .writer import generate_atlas_set, generate_cohort, write_patient

__all__ = [
    "PhantomConfig", "PhantomPatient",
    "build_demo_atlas_set", "generate_atlas_set", "generate_cohort", "generate_patient", "patient_seed", "write_patient",
]
