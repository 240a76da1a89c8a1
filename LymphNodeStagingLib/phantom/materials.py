"""Tissue "materials" of the phantom's image formation (CT HU, default SUV): a material map is kept beside the label
map because one label (e.g. the trachea) holds several tissues (wall and lumen). Label ids: ``anatomy/labels.py``."""

from __future__ import annotations


# --- materials (tissue classes for image formation) -------------------------------------------------------------
class Material:
    """Tissue codes of the material map (uint8)."""

    OUTSIDE = 0  # air around the patient
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    AIR = 4  # air inside the body (airway lumen, stomach gas)
    AIRWAY_WALL = 5
    BLOOD = 6
    MYOCARDIUM = 7
    ESOPHAGUS = 8
    BONE_MARROW = 9
    BONE_CORTEX = 10
    CARTILAGE = 11
    LIVER = 12
    SPLEEN = 13
    STOMACH = 14
    CORD = 15
    THYROID = 16
    NODE = 17
    NODE_CALCIFIED = 18
    TUMOUR = 19
    SOFT = 20  # unlabelled soft tissue (neck, skin)
    COUNT = 21


#: Mean CT number (HU) of each material, index = material code.
MATERIAL_HU: tuple[float, ...] = (
    -1000.0, -100.0, 45.0, -850.0, -1000.0, 60.0, 40.0, 45.0, 40.0, 230.0, 900.0, 110.0, 58.0, 48.0, 35.0, 35.0,
    90.0, 35.0, 550.0, 38.0, 30.0,
)
