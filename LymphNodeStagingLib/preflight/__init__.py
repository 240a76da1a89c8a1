"""Checks of every input before the first heavy step, in one place for assess, map, batch, train, evaluate and the
Slicer module.

* ``image_files``: an image file's header and grid without its voxels, and its data read to the end (a truncated or
  corrupt ``.nii.gz``, gzip NRRD or compressed MHA is refused, naming the file);
* ``image_values``: spacing and size bounds, finite values, CT in Hounsfield units, PET in SUV (the bounds are in
  its table);
* ``memory``: the memory of one assessment estimated from the grids before allocation, refused above
  ``$LNSTAGING_MAX_MEMORY_GB``;
* ``parameters``: threshold, rule set, device, test-time augmentation, the model checkpoint (loaded and verified)
  and the output folder;
* ``case``: ``check_case`` (one case) and ``check_row`` (a cohort row), which return the loaded, checked images.
"""
