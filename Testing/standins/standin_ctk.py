"""Stand-in for the ``ctk`` Python module (nothing of it is used outside the desktop GUI)."""
