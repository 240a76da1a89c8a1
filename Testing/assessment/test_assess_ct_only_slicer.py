"""CT-only mode in the Slicer module's logic, on the real MRML core (headless): no PET volume is accepted, the
background assessment runs in its child process with the CT alone, and the shown result says "CT only"."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")

import headless_slicer  # noqa: E402
import standins  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "LymphNodeStaging"


@pytest.fixture
def module(tmp_path):
    app = headless_slicer.HeadlessSlicer(tmp_path / "home")
    standins.install()
    sys.path.insert(0, str(MODULE_DIR))
    try:
        sys.modules.pop("LymphNodeStaging", None)
        yield importlib.import_module("LymphNodeStaging")
    finally:
        sys.modules.pop("LymphNodeStaging", None)
        sys.path.remove(str(MODULE_DIR))
        standins.uninstall()
        app.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A phantom case (true station map as the mapping) and a seeded random CT-only model."""
    import torch
    from case_fixtures import phantom_case_files

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model

    root = tmp_path_factory.mktemp("slicer-ct-only")
    case = phantom_case_files(root, 1618)
    cfg = ModelConfig.small(32, in_channels=1)
    torch.manual_seed(2)
    ct_model = save_checkpoint(root / "ct_model.pt", build_model("station", cfg),
                               {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    return {**case, "ct_model": str(ct_model)}


def test_background_assessment_of_a_ct_alone(module, files):
    import SimpleITK as sitk

    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(str(files["paths"]["ct"])), "PH1618 CT")
    logic = module.LymphNodeStagingLogic()
    lines: list[str] = []
    logic.logCallback = lines.append
    assert logic.checkInputs(ct, None) == []  # no PET: CT-only mode, nothing to refuse
    process = logic.startBackgroundProcess(ct, None, files["side"], modelPath=files["ct_model"], device="cpu",
                                           stationMapping=files["mapping"])
    assert process.job.pet is None
    process.wait(timeout=300)
    logic.finishBackgroundProcess(process)
    assert logic.result.modality == "ct" and logic.result.inputs["pet"] is None
    assert all(s.suv_max is None for s in logic.result.stations)
    assert any(line.startswith("CT only (no PET)") for line in lines)
    assert logic.nodes.table is not None


def test_a_petct_model_without_a_pet_fails_in_the_child_with_the_reason(module, files):
    import SimpleITK as sitk

    from LymphNodeStagingLib.errors import ProcessingError
    from LymphNodeStagingLib.slicer import mrml

    scene = headless_slicer.slicer.mrmlScene
    ct = mrml.volume_node_from_image(scene, sitk.ReadImage(str(files["paths"]["ct"])), "PH1618 CT")
    logic = module.LymphNodeStagingLogic()
    process = logic.startBackgroundProcess(ct, None, files["side"], modelPath=files["model"], device="cpu",
                                           stationMapping=files["mapping"])
    with pytest.raises(ProcessingError, match="UsageError: .*reads the PET"):
        process.wait(timeout=300)
