"""LymphNodeStaging: mediastinal lymph node station assessment and N-staging on FDG PET/CT.

The library is Qt-free; the 3D Slicer module and the ``lnstaging`` command line both call it.
"""

__version__ = "0.1.0"
