"""The synthetic demo atlas set: 5 full-size atlases generated deterministically (fixed seed) on first use and kept
in the user cache, so that no image binaries live in the repository. It is the default atlas set of every command
(see ``paths.default_atlas_set_path``) until the user gives one of their own."""

from __future__ import annotations

import logging
from pathlib import Path

from ..paths import DEMO_ATLAS_COUNT, DEMO_ATLAS_SEED, demo_atlas_set_path

log = logging.getLogger(__name__)


def build_demo_atlas_set(path: str | Path | None = None) -> Path:
    """Folder of the synthetic demo atlas set (manifest.json inside), generating it once if missing."""
    from .writer import generate_atlas_set

    target = Path(path) if path else demo_atlas_set_path()
    if (target / "manifest.json").is_file():
        return target
    log.info("generating the synthetic demo atlas set in %s", target)
    return Path(generate_atlas_set(target, atlases=DEMO_ATLAS_COUNT, seed=DEMO_ATLAS_SEED, size="full"))
