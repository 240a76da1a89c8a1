"""Label ids of the anatomy vocabulary: TotalSegmentator v2 'total' class ids, plus a few ids >= 200 for structures
that 'total' lacks but station placement needs (the phantom draws them; real TotalSegmentator output lacks them)."""

from __future__ import annotations

# --- TotalSegmentator v2 'total' ids of the thorax -------------------------------------------------------
SPLEEN = 1
KIDNEY_RIGHT = 2
KIDNEY_LEFT = 3
GALLBLADDER = 4
LIVER = 5
STOMACH = 6
PANCREAS = 7
ADRENAL_GLAND_RIGHT = 8
ADRENAL_GLAND_LEFT = 9
LUNG_UPPER_LOBE_LEFT = 10
LUNG_LOWER_LOBE_LEFT = 11
LUNG_UPPER_LOBE_RIGHT = 12
LUNG_MIDDLE_LOBE_RIGHT = 13
LUNG_LOWER_LOBE_RIGHT = 14
ESOPHAGUS = 15
TRACHEA = 16
THYROID_GLAND = 17
VERTEBRAE_T12 = 32  # T12 = 32 ... T1 = 43
VERTEBRAE_T1 = 43
VERTEBRAE_C7 = 44
HEART = 51
AORTA = 52
PULMONARY_VEIN = 53
BRACHIOCEPHALIC_TRUNK = 54
SUBCLAVIAN_ARTERY_RIGHT = 55
SUBCLAVIAN_ARTERY_LEFT = 56
COMMON_CAROTID_ARTERY_RIGHT = 57
COMMON_CAROTID_ARTERY_LEFT = 58
BRACHIOCEPHALIC_VEIN_LEFT = 59
BRACHIOCEPHALIC_VEIN_RIGHT = 60
ATRIAL_APPENDAGE_LEFT = 61
SUPERIOR_VENA_CAVA = 62
INFERIOR_VENA_CAVA = 63
SCAPULA_LEFT = 71
SCAPULA_RIGHT = 72
CLAVICULA_LEFT = 73
CLAVICULA_RIGHT = 74
SPINAL_CORD = 79
AUTOCHTHON_LEFT = 86
AUTOCHTHON_RIGHT = 87
RIB_LEFT_1 = 92  # rib_left_k = 91 + k
RIB_RIGHT_1 = 104  # rib_right_k = 103 + k
STERNUM = 116
COSTAL_CARTILAGES = 117

# --- ids >= 200: not produced by TotalSegmentator ---------------------------------------------
PULMONARY_ARTERY = 200  # pulmonary trunk and both main pulmonary arteries
AZYGOS = 201  # azygos vein with its arch
MAIN_BRONCHUS_RIGHT = 202  # right main bronchus and bronchus intermedius
MAIN_BRONCHUS_LEFT = 203  # left main bronchus

EXTRA_CLASSES: dict[int, str] = {
    PULMONARY_ARTERY: "pulmonary_artery",
    AZYGOS: "azygos_vein",
    MAIN_BRONCHUS_RIGHT: "main_bronchus_right",
    MAIN_BRONCHUS_LEFT: "main_bronchus_left",
}


def vertebra_id(name: str) -> int:
    """Label id of a thoracic vertebra "T1".."T12" (or "C7")."""
    if name == "C7":
        return VERTEBRAE_C7
    k = int(name.lstrip("T"))
    if not 1 <= k <= 12:
        raise ValueError(f"thoracic vertebra must be T1..T12, got {name!r}")
    return VERTEBRAE_T1 - (k - 1)


def rib_id(side: str, k: int) -> int:
    """Label id of rib k (1..12) on side "L" or "R" (patient side)."""
    return (RIB_LEFT_1 if side == "L" else RIB_RIGHT_1) + k - 1


#: id -> name of the thoracic 'total' classes (TotalSegmentator v2 names) and the extra ids >= 200; the anatomy
#: vocabulary takes the full 'total' table from an installed TotalSegmentator and falls back to this one.
TOTAL_CLASSES: dict[int, str] = {
    SPLEEN: "spleen",
    KIDNEY_RIGHT: "kidney_right",
    KIDNEY_LEFT: "kidney_left",
    GALLBLADDER: "gallbladder",
    LIVER: "liver",
    STOMACH: "stomach",
    PANCREAS: "pancreas",
    ADRENAL_GLAND_RIGHT: "adrenal_gland_right",
    ADRENAL_GLAND_LEFT: "adrenal_gland_left",
    LUNG_UPPER_LOBE_LEFT: "lung_upper_lobe_left",
    LUNG_LOWER_LOBE_LEFT: "lung_lower_lobe_left",
    LUNG_UPPER_LOBE_RIGHT: "lung_upper_lobe_right",
    LUNG_MIDDLE_LOBE_RIGHT: "lung_middle_lobe_right",
    LUNG_LOWER_LOBE_RIGHT: "lung_lower_lobe_right",
    ESOPHAGUS: "esophagus",
    TRACHEA: "trachea",
    THYROID_GLAND: "thyroid_gland",
    **{VERTEBRAE_T1 - (k - 1): f"vertebrae_T{k}" for k in range(1, 13)},
    VERTEBRAE_C7: "vertebrae_C7",
    HEART: "heart",
    AORTA: "aorta",
    PULMONARY_VEIN: "pulmonary_vein",
    BRACHIOCEPHALIC_TRUNK: "brachiocephalic_trunk",
    SUBCLAVIAN_ARTERY_RIGHT: "subclavian_artery_right",
    SUBCLAVIAN_ARTERY_LEFT: "subclavian_artery_left",
    COMMON_CAROTID_ARTERY_RIGHT: "common_carotid_artery_right",
    COMMON_CAROTID_ARTERY_LEFT: "common_carotid_artery_left",
    BRACHIOCEPHALIC_VEIN_LEFT: "brachiocephalic_vein_left",
    BRACHIOCEPHALIC_VEIN_RIGHT: "brachiocephalic_vein_right",
    ATRIAL_APPENDAGE_LEFT: "atrial_appendage_left",
    SUPERIOR_VENA_CAVA: "superior_vena_cava",
    INFERIOR_VENA_CAVA: "inferior_vena_cava",
    SCAPULA_LEFT: "scapula_left",
    SCAPULA_RIGHT: "scapula_right",
    CLAVICULA_LEFT: "clavicula_left",
    CLAVICULA_RIGHT: "clavicula_right",
    SPINAL_CORD: "spinal_cord",
    AUTOCHTHON_LEFT: "autochthon_left",
    AUTOCHTHON_RIGHT: "autochthon_right",
    **{RIB_LEFT_1 + k - 1: f"rib_left_{k}" for k in range(1, 13)},
    **{RIB_RIGHT_1 + k - 1: f"rib_right_{k}" for k in range(1, 13)},
    STERNUM: "sternum",
    COSTAL_CARTILAGES: "costal_cartilages",
    **EXTRA_CLASSES,
}

TOTAL_IDS: dict[str, int] = {name: i for i, name in TOTAL_CLASSES.items()}

LUNG_IDS: tuple[int, ...] = (10, 11, 12, 13, 14)
LUNG_RIGHT_IDS: tuple[int, ...] = (12, 13, 14)
LUNG_LEFT_IDS: tuple[int, ...] = (10, 11)
#: Airways: the label ids a station must never overlap.
AIRWAY_IDS: tuple[int, ...] = (TRACHEA, MAIN_BRONCHUS_RIGHT, MAIN_BRONCHUS_LEFT)
#: Vessels and heart: the label ids a station must never overlap.
VESSEL_IDS: tuple[int, ...] = (
    HEART, AORTA, PULMONARY_VEIN, BRACHIOCEPHALIC_TRUNK, SUBCLAVIAN_ARTERY_RIGHT, SUBCLAVIAN_ARTERY_LEFT,
    COMMON_CAROTID_ARTERY_RIGHT, COMMON_CAROTID_ARTERY_LEFT, BRACHIOCEPHALIC_VEIN_LEFT, BRACHIOCEPHALIC_VEIN_RIGHT,
    SUPERIOR_VENA_CAVA, INFERIOR_VENA_CAVA, PULMONARY_ARTERY, AZYGOS,
)
BONE_IDS: tuple[int, ...] = (
    *range(VERTEBRAE_T12, VERTEBRAE_C7 + 1), SCAPULA_LEFT, SCAPULA_RIGHT, CLAVICULA_LEFT, CLAVICULA_RIGHT,
    *range(RIB_LEFT_1, RIB_RIGHT_1 + 12), STERNUM, COSTAL_CARTILAGES,
)
