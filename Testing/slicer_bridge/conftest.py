"""Fixtures of the MRML bridge tests: a synthetic case and a headless Slicer scene (slicer-core imported on use)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def case():
    import headless_slicer

    return headless_slicer.synthetic_case()


@pytest.fixture
def app(tmp_path):
    import headless_slicer

    app = headless_slicer.HeadlessSlicer(tmp_path / "home")
    yield app
    app.close()
