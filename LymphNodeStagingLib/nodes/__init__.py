"""Lymph node detection and segmentation: networks, training, instances with measurements, detection metrics."""
