"""The product's bundled synthetic atlas set: 5 atlases generated deterministically (fixed seed) on first use and
cached, so that no image binaries live in the repository."""

from __future__ import annotations

import os
from pathlib import Path

from ..fileio import atomic_dir
from .patient import GENERATOR_VERSION

BUNDLED_SEED = 20260101
BUNDLED_ATLASES = 5
BUNDLED_SIZE = "atlas"  # 2 mm isotropic mediastinal crop, noise-free


def cache_root() -> Path:
    """$LNSTAGING_CACHE, else $XDG_CACHE_HOME/lnstaging, else ~/.cache/lnstaging."""
    env = os.environ.get("LNSTAGING_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lnstaging"


def bundled_atlas_set(cache_dir: str | Path | None = None) -> Path:
    """Folder of the bundled synthetic atlas set (manifest.json inside), generating it once if missing."""
    from .writer import generate_atlas_set

    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"atlas-synthetic-v{GENERATOR_VERSION}-seed{BUNDLED_SEED}"
    if (target / "manifest.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        generate_atlas_set(tmp, BUNDLED_ATLASES, BUNDLED_SEED, BUNDLED_SIZE,
                           name="lnstaging-synthetic-phantom-atlases (synthetic)")
    return target
