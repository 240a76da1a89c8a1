"""Atlas sets for station mapping: loader with validation, the default synthetic set, and a converter for the
Lynch et al. station atlases (CREATIS) once a user has downloaded them.

An atlas set is a folder with ``manifest.json`` and one entry per atlas (CT, anatomy label map with TotalSegmentator
v2 'total' ids, 17-station label map with the catalogue's values 1..17, all on one grid); paths are relative to the
folder::

    {"format": "lnstaging-atlas-set", "format_version": 1, "name": "...", "synthetic": true, "description": "...",
     "anatomy_vocabulary": "totalsegmentator-total-v2",
     "atlases": [{"id": "atlas01", "ct": "atlas01/ct.nii.gz", "anatomy": "atlas01/anatomy.nii.gz",
                  "stations": "atlas01/stations.nii.gz"}, ...]}
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..anatomy.labels import EXTRA_CLASSES, TOTAL_IDS
from ..errors import InputError, LNSError
from ..io.files import atomic_dir, write_image, write_json
from ..paths import ENV_ATLASES, default_atlas_set_path
from ..staging.stations import NUM_STATIONS, STATION_NAMES, parse_station

log = logging.getLogger(__name__)

FORMAT = "lnstaging-atlas-set"
FORMAT_VERSION = 1
VOCABULARY = "totalsegmentator-total-v2"


def known_anatomy_ids() -> set[int]:
    """Anatomy ids accepted in atlases: all TotalSegmentator 'total' ids (1..117) and the extra ids >= 200."""
    return set(range(0, 118)) | set(EXTRA_CLASSES)


@dataclass
class Atlas:
    """One atlas: paths of its three images (loaded on demand)."""

    id: str
    ct_path: Path
    anatomy_path: Path
    stations_path: Path
    _cache: dict = field(default_factory=dict, repr=False)

    def _read(self, key: str, path: Path) -> sitk.Image:
        if key not in self._cache:
            try:
                self._cache[key] = sitk.ReadImage(str(path))
            except RuntimeError as exc:
                raise InputError(f"atlas {self.id}: cannot read {key} image {path}: {exc}") from None
        return self._cache[key]

    def ct(self) -> sitk.Image:
        return self._read("ct", self.ct_path)

    def anatomy(self) -> sitk.Image:
        return self._read("anatomy", self.anatomy_path)

    def stations(self) -> sitk.Image:
        return self._read("stations", self.stations_path)


@dataclass
class AtlasSet:
    """A validated atlas set."""

    root: Path
    name: str
    synthetic: bool
    description: str
    atlases: list[Atlas]
    cache: dict = field(default_factory=dict, repr=False)  # prepared registration data, keyed by parameters

    def __len__(self) -> int:
        return len(self.atlases)

    def subset(self, ids: list[str]) -> AtlasSet:
        """The atlases with the given ids (in that order), sharing the loaded images."""
        by_id = {a.id: a for a in self.atlases}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(f"atlas ids {missing} not in atlas set {self.name!r} (has {list(by_id)})")
        return AtlasSet(self.root, self.name, self.synthetic, self.description, [by_id[i] for i in ids])


def _manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not root.is_dir():
        raise InputError(f"atlas set {root}: not a folder")
    if not path.is_file():
        raise InputError(f"atlas set {root}: manifest.json is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: 'format' must be {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: 'format_version' {manifest.get('format_version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    vocab = manifest.get("anatomy_vocabulary", VOCABULARY)
    if vocab != VOCABULARY:
        raise InputError(f"{path}: 'anatomy_vocabulary' {vocab!r}: expected {VOCABULARY!r}")
    if not isinstance(manifest.get("atlases"), list) or not manifest["atlases"]:
        raise InputError(f"{path}: 'atlases' must be a non-empty list")
    return manifest


def _same_grid(a: sitk.Image, b: sitk.Image) -> str | None:
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} != {a.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-3):
        return f"spacing {b.GetSpacing()} != {a.GetSpacing()}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2):
        return f"origin {b.GetOrigin()} != {a.GetOrigin()}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        return "direction differs"
    return None


def check_atlas(atlas: Atlas, allow_missing_stations: bool = False) -> None:
    """Validate one atlas's images: same grid, station values 0..17 with every station present, known anatomy ids."""
    ct, anatomy, stations = atlas.ct(), atlas.anatomy(), atlas.stations()
    for key, img in (("anatomy", anatomy), ("stations", stations)):
        problem = _same_grid(ct, img)
        if problem:
            raise InputError(f"atlas {atlas.id}: {key} image {atlas.__dict__[key + '_path']} is not on the CT grid "
                             f"({problem}); all three images of an atlas must share one grid")
    st = sitk.GetArrayViewFromImage(stations)
    values = np.unique(st)
    bad = [int(v) for v in values if not (0 <= v <= NUM_STATIONS and float(v).is_integer())]
    if bad:
        raise InputError(f"atlas {atlas.id}: station map {atlas.stations_path} has label values {bad[:10]}; "
                         f"expected the catalogue's values 1..{NUM_STATIONS} (1L=1 ... 11R=17) and 0")
    missing = [STATION_NAMES[i - 1] for i in range(1, NUM_STATIONS + 1) if i not in set(values.tolist())]
    if missing and not allow_missing_stations:
        raise InputError(f"atlas {atlas.id}: station map {atlas.stations_path} lacks stations {missing}; "
                         "expected all 17")
    an = np.unique(sitk.GetArrayViewFromImage(anatomy))
    unknown = sorted(set(an.tolist()) - known_anatomy_ids())
    if unknown:
        raise InputError(f"atlas {atlas.id}: anatomy map {atlas.anatomy_path} has unknown label ids {unknown[:10]}; "
                         f"expected TotalSegmentator v2 'total' ids (1..117) or the phantom's ids >= 200")


def load_atlas_set(path: str | Path, validate: bool = True, allow_missing_stations: bool = False) -> AtlasSet:
    """Read an atlas set folder; with validate, every atlas is loaded and checked (see check_atlas)."""
    root = Path(path)
    manifest = _manifest(root)
    atlases, seen = [], set()
    for k, entry in enumerate(manifest["atlases"]):
        if not isinstance(entry, dict):
            raise InputError(f"{root / 'manifest.json'}: atlases[{k}] must be an object")
        aid = str(entry.get("id", ""))
        if not aid or aid in seen:
            raise InputError(f"{root / 'manifest.json'}: atlases[{k}] needs a unique 'id' (got {aid!r})")
        seen.add(aid)
        paths = {}
        for key in ("ct", "anatomy", "stations"):
            if not isinstance(entry.get(key), str):
                raise InputError(f"{root / 'manifest.json'}: atlas {aid} lacks the '{key}' path")
            p = root / entry[key]
            if not p.is_file():
                raise InputError(f"atlas {aid}: {key} file {p} does not exist")
            paths[key] = p
        atlases.append(Atlas(aid, paths["ct"], paths["anatomy"], paths["stations"]))
    aset = AtlasSet(root, str(manifest.get("name", root.name)), bool(manifest.get("synthetic", False)),
                    str(manifest.get("description", "")), atlases)
    if validate:
        for atlas in atlases:
            check_atlas(atlas, allow_missing_stations)
    return aset


def resolve_atlas_set(atlases: str | Path | AtlasSet | None = None, *, validate: bool = True,
                      allow_missing_stations: bool = False) -> AtlasSet:
    """The atlas set to map with: a loaded set as it is (it keeps its prepared registration data between cases), a
    folder (loaded and checked), or None for the default set (``$LNSTAGING_ATLASES``, else the synthetic demo set
    that ``lnstaging demo`` and ``lnstaging phantom --demo-atlases`` build)."""
    if isinstance(atlases, AtlasSet):
        return atlases
    if atlases is None or str(atlases) == "":
        path = default_atlas_set_path()
        if not (path / "manifest.json").is_file():
            how = (f"${ENV_ATLASES} points to {path}, which holds no manifest.json" if os.environ.get(ENV_ATLASES)
                   else f"the synthetic demo atlas set is not built yet ({path})")
            raise InputError(f"no atlas set given and {how}: pass --atlases DIR (an atlas set folder, e.g. the "
                             "Lynch et al. atlases converted with convert_lynch), set $LNSTAGING_ATLASES, or build "
                             "the synthetic demo set with `lnstaging phantom --demo-atlases`")
        atlases = path
    return load_atlas_set(atlases, validate=validate, allow_missing_stations=allow_missing_stations)


# --------------------------------------------------------------------------------------------------------------------
# Lynch et al. (CREATIS) converter

_IMAGE_EXT = re.compile(r"\.(nii\.gz|nii|mhd|mha|nrrd)$", re.IGNORECASE)


def _stem(path: Path) -> str:
    return _IMAGE_EXT.sub("", path.name)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _IMAGE_EXT.search(p.name))


def _station_of_file(path: Path) -> int | None:
    name = re.sub(r"^(mask|label|lns|station)[_\- ]*", "", _stem(path), flags=re.IGNORECASE)
    try:
        return parse_station(name).label
    except LNSError:
        return None


def _on_grid(img: sitk.Image, ref: sitk.Image) -> sitk.Image:
    if _same_grid(ref, img) is None:
        img.CopyInformation(ref)
        return img
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())


def _anatomy_from_folder(folder: Path, ref: sitk.Image) -> sitk.Image:
    """A TotalSegmentator output folder of per-class masks (<class name>.nii.gz) -> one 'total' label map."""
    out = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
    found = 0
    for p in _images(folder):
        cid = TOTAL_IDS.get(_stem(p))
        if cid is None:
            continue
        mask = sitk.GetArrayViewFromImage(_on_grid(sitk.ReadImage(str(p)), ref)) > 0
        out[mask] = cid
        found += 1
    if not found:
        raise InputError(f"{folder}: no mask named after a TotalSegmentator 'total' class (e.g. trachea.nii.gz)")
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ref)
    return img


def convert_lynch(source: str | Path, out_dir: str | Path, name: str = "lynch-creatis",
                  segment: Callable[[Path, Path], Path] | None = None) -> Path:
    """Convert downloaded Lynch et al. station atlases into an atlas set (docs/how-to/use-lynch-atlases.md).

    source holds one folder per atlas with: the CT (an image whose name starts with "ct", any of .mhd .mha .nii
    .nii.gz .nrrd); the station masks, one binary image per station or sub-station named after it ("4R.mhd",
    "station_7L.nii.gz", "11Rs.mhd"; sub-stations 3AL/3AR, 3PL/3PR, 7L/7R, 8L/8R, 9L/9R, 11Rs/11Ri merge into their
    station) or a "stations" label map that already uses the catalogue's values 1..17; and the anatomy as an
    "anatomy" label map with TotalSegmentator 'total' ids or a folder "segmentations/" of TotalSegmentator masks.
    Without anatomy, segment(ct_path, out_path) is called (e.g. anatomy.run_totalsegmentator).
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise InputError(f"Lynch atlas source {source}: not a folder")
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if not folders:
        raise InputError(f"Lynch atlas source {source}: expected one sub-folder per atlas, found none")
    entries = []
    with atomic_dir(out_dir) as tmp:
        for k, folder in enumerate(folders, 1):
            files = _images(folder)
            cts = [p for p in files if _stem(p).lower().startswith("ct")]
            if len(cts) != 1:
                raise InputError(f"{folder}: expected exactly one CT image named ct.* (found {[p.name for p in cts]})")
            ct = sitk.ReadImage(str(cts[0]))
            stations = _lynch_stations(folder, files, ct)
            anatomy = _lynch_anatomy(folder, files, ct, segment, tmp)
            aid = f"atlas{k:02d}"
            (tmp / aid).mkdir()
            write_image(ct, tmp / aid / "ct.nii.gz")
            write_image(sitk.Cast(anatomy, sitk.sitkUInt16), tmp / aid / "anatomy.nii.gz")
            write_image(stations, tmp / aid / "stations.nii.gz")
            entries.append({"id": aid, "source": folder.name, "ct": f"{aid}/ct.nii.gz",
                            "anatomy": f"{aid}/anatomy.nii.gz", "stations": f"{aid}/stations.nii.gz"})
        write_json(tmp / "manifest.json", {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "synthetic": False,
            "description": "Lynch et al. lymph node station atlases (CREATIS), converted; station labels 1L=1 ... "
                           "11R=17 with sub-stations merged", "anatomy_vocabulary": VOCABULARY, "atlases": entries})
    load_atlas_set(out_dir, allow_missing_stations=True)
    return out_dir


def _lynch_stations(folder: Path, files: list[Path], ct: sitk.Image) -> sitk.Image:
    labelled = [p for p in files if _stem(p).lower() in ("stations", "lns", "station_labels")]
    if labelled:
        img = _on_grid(sitk.ReadImage(str(labelled[0])), ct)
        return sitk.Cast(img, sitk.sitkUInt8)
    out = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    found = []
    for p in files:
        lab = _station_of_file(p)
        if lab is None or _stem(p).lower().startswith("ct"):
            continue
        mask = sitk.GetArrayViewFromImage(_on_grid(sitk.ReadImage(str(p)), ct)) > 0
        out[mask & (out == 0)] = lab
        found.append(p.name)
    if not found:
        raise InputError(f"{folder}: no station mask found (expected images named after stations, e.g. 4R.mhd, "
                         "or a 'stations' label map)")
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ct)
    return img


def _lynch_anatomy(folder: Path, files: list[Path], ct: sitk.Image, segment, tmp: Path) -> sitk.Image:
    labelled = [p for p in files if _stem(p).lower() in ("anatomy", "totalsegmentator", "total")]
    if labelled:
        return _on_grid(sitk.ReadImage(str(labelled[0])), ct)
    if (folder / "segmentations").is_dir():
        return _anatomy_from_folder(folder / "segmentations", ct)
    if segment is None:
        raise InputError(f"{folder}: no anatomy ('anatomy' label map or 'segmentations/' folder); run "
                         "TotalSegmentator on the CT first or pass a segmentation function")
    ct_file = next(p for p in files if _stem(p).lower().startswith("ct"))
    out = Path(segment(ct_file, tmp / f".{folder.name}-anatomy.nii.gz"))
    return _on_grid(sitk.ReadImage(str(out)), ct)
