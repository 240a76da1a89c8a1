"""Where things live: the package's resources, the user cache, and every environment variable the library reads.

Environment variables (all optional):

============================  ===========================================================================
``LNSTAGING_CACHE``           cache folder (default ``$XDG_CACHE_HOME/lnstaging`` or ``~/.cache/lnstaging``)
``LNSTAGING_ATLASES``         atlas set used when none is given (default: the synthetic demo set in the cache)
``LNSTAGING_MAX_MEMORY_GB``   the most memory a case may need by the estimate made before any heavy step
                              (default 16; see ``preflight.memory``)
``XDG_CACHE_HOME``            base of the default cache folder
``TOTALSEG_HOME_DIR``         TotalSegmentator's home (default ``~/.totalsegmentator``)
``TOTALSEG_WEIGHTS_PATH``     TotalSegmentator's weights folder (default ``<home>/nnunet/results``)
============================  ===========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "LNSTAGING_CACHE"
ENV_ATLASES = "LNSTAGING_ATLASES"
ENV_MAX_MEMORY = "LNSTAGING_MAX_MEMORY_GB"
ENV_TOTALSEG_HOME = "TOTALSEG_HOME_DIR"
ENV_TOTALSEG_WEIGHTS = "TOTALSEG_WEIGHTS_PATH"

#: The memory limit of one case when LNSTAGING_MAX_MEMORY_GB is not set, in GB.
DEFAULT_MAX_MEMORY_GB = 16.0

#: Seed and size of the synthetic demo atlas set (patients drawn for tests and benchmarks use other seeds).
DEMO_ATLAS_SEED = 1000
DEMO_ATLAS_COUNT = 5

#: The bundled demo classifier (trained on a synthetic phantom cohort), relative to the resources folder.
DEMO_MODEL = Path("models") / "demo_ts1.pt"
#: The bundled CT-only demo classifier (the CT alone, no PET: what ``assess`` uses for a CT without PET when no model
#: is given), relative to the resources folder.
DEMO_CT_MODEL = Path("models") / "demo_ts1_ct.pt"

#: SHA-256 of every bundled model file (by file name in the bundled models folder), pinned in the code. A checkpoint
#: that is, or claims to be, a bundled model loads only when its file has this hash (classifier/checkpoint.py), so a
#: new or retrained bundled model must update its entry here (Testing/classifier/test_bundled_models.py checks it).
BUNDLED_MODELS: dict[str, str] = {
    "demo_ts1.pt": "e8e58cbab7c9ab560613bb1ee1b3a9f44b69c540cd527c3268fe9102e3913058",
    "demo_ts1_ct.pt": "bbf0d28bba3f8497985d10712ff3486e5e116f1a1106a71297079f67559715e8",
    "node_classifier_ct_demo.pt": "8190f149cb5fa05de02db07987feaa538c8e6c5e3bae89b2339a1700cb5e2993",
    "node_classifier_demo.pt": "c37e24737fa79b01bbb287cde2be7f68143516986ec1907ac989c099dc0cb8b3",
    "nodes_demo.pt": "8a64a749d9c65836fb9c6d1251816dcc0bb3112cec7d131e87eb0510fad4dea1",
    "stations_net.pt": "7ada6ed5fdb58b5b3b317fb57c7ea72df9f84741d287fcc27b50451426872c62",
}


def package_dir() -> Path:
    """The LymphNodeStagingLib folder."""
    return Path(__file__).resolve().parent


def package_root() -> Path:
    """The folder that holds the LymphNodeStagingLib package (what a child process needs on its PYTHONPATH)."""
    return package_dir().parent


def resources_dir() -> Path:
    """The package data: rule sets, bundled models."""
    return package_dir() / "resources"


def rules_dir() -> Path:
    return resources_dir() / "rules"


def bundled_models_dir() -> Path:
    """The folder of the bundled models (every ``.pt`` file in it must be pinned in ``BUNDLED_MODELS``)."""
    return resources_dir() / DEMO_MODEL.parent


def demo_model_path() -> Path:
    """The bundled demo classifier checkpoint."""
    return resources_dir() / DEMO_MODEL


def demo_ct_model_path() -> Path:
    """The bundled CT-only demo classifier checkpoint (for a CT assessed without PET)."""
    return resources_dir() / DEMO_CT_MODEL


def cache_root() -> Path:
    """``$LNSTAGING_CACHE``, else ``$XDG_CACHE_HOME/lnstaging``, else ``~/.cache/lnstaging``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lnstaging"


def demo_atlas_set_path() -> Path:
    """Where the synthetic demo atlas set lives once it is built (``lnstaging demo`` builds it)."""
    return cache_root() / "atlases" / f"synthetic-seed{DEMO_ATLAS_SEED}"


def default_atlas_set_path() -> Path:
    """The atlas set used when none is given: ``$LNSTAGING_ATLASES``, else the synthetic demo set."""
    env = os.environ.get(ENV_ATLASES)
    return Path(env) if env else demo_atlas_set_path()


def totalseg_home(home_dir: str | Path | None = None) -> Path:
    """TotalSegmentator's home: the argument, else ``$TOTALSEG_HOME_DIR``, else ``~/.totalsegmentator``."""
    if home_dir is not None:
        return Path(home_dir)
    if ENV_TOTALSEG_HOME in os.environ:
        return Path(os.environ[ENV_TOTALSEG_HOME])
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator"


def totalseg_weights_dir(home_dir: str | Path | None = None) -> Path:
    """TotalSegmentator's weights: ``$TOTALSEG_WEIGHTS_PATH`` (unless a home is given), else ``<home>/nnunet/results``."""
    if home_dir is None and ENV_TOTALSEG_WEIGHTS in os.environ:
        return Path(os.environ[ENV_TOTALSEG_WEIGHTS])
    return totalseg_home(home_dir) / "nnunet" / "results"


def station_map_store_path() -> Path:
    """The station maps shared by every command (batch, train, evaluate): ``<cache>/station-maps``."""
    return cache_root() / "station-maps"


def max_memory_gb() -> float:
    """``$LNSTAGING_MAX_MEMORY_GB`` (a positive number of GB), else DEFAULT_MAX_MEMORY_GB."""
    from .errors import UsageError

    text = os.environ.get(ENV_MAX_MEMORY, "").strip()
    if not text:
        return DEFAULT_MAX_MEMORY_GB
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"${ENV_MAX_MEMORY} {text!r}: expected a positive number of GB, e.g. 16")
    return value
