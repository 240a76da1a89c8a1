"""SUV from PET DICOM (QIBA / IBSI) with provenance, and SUV statistics of stations."""
