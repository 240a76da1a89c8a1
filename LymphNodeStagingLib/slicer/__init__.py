"""The bridge to 3D Slicer's MRML scene (the only part that needs slicer-core) and its dependencies."""
