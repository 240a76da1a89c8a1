"""One store of computed station maps, shared by the cohort run, training and evaluation, so that a case mapped
once is never registered again with the same inputs.

A station map is filed under a key computed from what it depends on: the CT and the anatomy label map (file or
DICOM folder identity: path, size, modification time), the atlas set (its manifest and image files), the
registration settings that differ from the library's defaults, and the store's format version. The default store
is ``<cache>/station-maps`` (``paths.station_map_store_path``); commands take another folder with ``--cache``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..io.files import atomic_dir, digest, fingerprint
from ..paths import station_map_store_path
from .station_mapping import StationMapping, read_station_mapping, write_station_mapping

log = logging.getLogger(__name__)

STORE_VERSION = 1
#: The file that marks a complete entry (written last, inside the atomically renamed folder).
COMPLETE = "station_info.json"


def atlas_set_identity(root: str | Path, ids: list[str] | None = None) -> dict:
    """Identity of an atlas set folder: its manifest and the images of its atlases (of ``ids`` only, for a subset)."""
    import json

    root = Path(root)
    manifest = root / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"manifest": fingerprint(manifest)}
    files = {}
    for entry in data.get("atlases", []):
        if ids is not None and not (isinstance(entry, dict) and str(entry.get("id")) in ids):
            continue
        for k in ("ct", "anatomy", "stations"):
            if isinstance(entry, dict) and isinstance(entry.get(k), str):
                files[f"{entry.get('id')}/{k}"] = fingerprint(root / entry[k])
    return {"manifest": fingerprint(manifest), "files": files}


def station_map_key(ct: str | Path, anatomy: str | Path, atlases: str | Path | dict,
                    registration: dict | None = None) -> str:
    """The store key of the station map of a CT with its anatomy, mapped with an atlas set (a folder, or its
    identity from :func:`atlas_set_identity`) and registration settings (overrides of the defaults; threads
    excluded: they do not change the result)."""
    reg = {k: v for k, v in sorted((registration or {}).items()) if k != "threads"}
    atlas_id = atlases if isinstance(atlases, dict) else atlas_set_identity(atlases)
    return digest({"store_version": STORE_VERSION, "ct": fingerprint(ct), "anatomy": fingerprint(anatomy),
                   "atlases": atlas_id, "registration": reg}, 32)


class StationMapStore:
    """A folder of station maps, one sub-folder per key, each written atomically."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else station_map_store_path()

    def folder(self, key: str) -> Path:
        return self.root / key

    def __contains__(self, key: str) -> bool:
        return (self.folder(key) / COMPLETE).is_file()

    def get(self, key: str) -> StationMapping | None:
        """The stored station map, or None (a damaged entry is removed and counts as missing)."""
        if key not in self:
            return None
        try:
            return read_station_mapping(self.folder(key))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("station map store: entry %s cannot be read (%s); it will be computed again", key, exc)
            shutil.rmtree(self.folder(key), ignore_errors=True)
            return None

    def put(self, key: str, mapping: StationMapping) -> Path:
        """File a station map under ``key`` (kept as it is when the key is present already)."""
        target = self.folder(key)
        if key not in self:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_dir(target) as tmp:
                write_station_mapping(mapping, tmp)
        return target

    def copy_to(self, key: str, folder: str | Path) -> bool:
        """Copy the stored files of ``key`` into ``folder``; False when the key is not stored."""
        if key not in self:
            return False
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.folder(key).iterdir()):
            if f.is_file():
                shutil.copy2(f, folder / f.name)
        return True
