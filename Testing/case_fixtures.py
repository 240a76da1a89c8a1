"""A small phantom case ready to assess in seconds (shared by the assessment and Slicer bridge tests): the patient's
files, a seeded random small station classifier and the patient's true station map written as a station mapping
folder, so that the assessment skips the registration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_truth_mapping(stations: sitk.Image, folder: Path) -> Path:
    """A station mapping folder (as the stations step writes it) holding the true station map, one 'atlas'."""
    from LymphNodeStagingLib.mapping.registration import Geometry
    from LymphNodeStagingLib.mapping.station_mapping import StationMapping, write_station_mapping
    from LymphNodeStagingLib.mapping.weightmap import station_weight_maps
    from LymphNodeStagingLib.staging.stations import STATIONS

    labels = sitk.GetArrayFromImage(stations).astype(np.uint8)
    geom = Geometry.of(stations)
    votes = np.stack([(labels == st.label) for st in STATIONS]).astype(np.uint8)
    voxels = {st.name: int(votes[st.index].sum()) for st in STATIONS}
    mapping = StationMapping(
        labels, votes, 1, geom, {st.name: (1.0 if voxels[st.name] else float("nan")) for st in STATIONS},
        {st.name: ("ok" if voxels[st.name] else "missing") for st in STATIONS}, voxels,
        station_weight_maps(labels, geom, votes.astype(np.float32)), ["truth"], {"truth": 0.0})
    write_station_mapping(mapping, folder)
    return folder


def phantom_case_files(root: Path, seed: int) -> dict:
    """A small phantom patient, a seeded random small model and the patient's true station map as a mapping."""
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    patient = generate_patient(seed, "small")
    paths = write_patient(patient, root / f"PH{seed}")
    cfg = ModelConfig.small(32)
    torch.manual_seed(0)
    model = save_checkpoint(root / "model.pt", build_model("station", cfg),
                            {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    mapping = write_truth_mapping(sitk.ReadImage(str(paths["stations"])), root / "mapping")
    return {"paths": paths, "model": str(model), "mapping": str(mapping), "side": patient.truth["tumour_side"]}


def ct_only_model(path: Path, seed: int) -> Path:
    """A seeded, untrained small CT-only station classifier (in_channels 1) saved as a checkpoint."""
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model

    cfg = ModelConfig.small(32, in_channels=1)
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model("station", cfg),
                           {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})

