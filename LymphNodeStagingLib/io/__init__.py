"""Reading and writing images: DICOM series, image files and their geometry, DICOM SEG, atomic writes."""
