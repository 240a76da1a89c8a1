"""Station segmentation network: the mediastinum and the 17 lymph node stations straight from the CT."""
