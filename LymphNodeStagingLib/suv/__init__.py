"""SUV from PET DICOM (QIBA / IBSI) with provenance, and SUV statistics of stations."""

#: The SUV conversions: vendor-neutral QIBA / IBSI, and the autoPET conversion (for comparisons only).
SUV_MODES: tuple[str, ...] = ("qiba", "gatidis")
