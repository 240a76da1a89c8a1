"""Options and parameters checked before any work: threshold, rule set, device, test-time augmentation, the model
checkpoints (station classifier, node model) and the output folder. The command line checks its options while
parsing; these checks are what the library's entry points do for Python callers (and again for the command line, at
no cost)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

from ..errors import UsageError
from ..io.files import check_output
from ..runtime import Device, parse_device


def check_threshold(threshold: float | None, parameter: str = "--threshold") -> float | None:
    """A probability threshold in [0, 1] (None: the model's)."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise UsageError(f"{parameter} {threshold!r}: expected a probability between 0 and 1") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UsageError(f"{parameter} {threshold!r}: expected a probability between 0 and 1")
    return value


def check_rules(rules: str | None, parameter: str = "--rules") -> str | None:
    """A bundled rule set name or a rule-set .json file, read and validated (None: the caller's default)."""
    if rules is None:
        return None
    from ..staging.rules import load_rules

    try:
        load_rules(rules)
    except UsageError as exc:
        message = str(exc)
        raise UsageError(message if message.startswith(parameter) else f"{parameter}: {message}") from None
    return str(rules)


def check_tta(tta: int, parameter: str = "--tta") -> int:
    """Extra test-time patches per station: a whole number >= 0."""
    if isinstance(tta, bool) or not isinstance(tta, numbers.Real) or int(tta) != tta or tta < 0:
        raise UsageError(f"{parameter} {tta!r}: expected a whole number of extra patches, 0 or more")
    return int(tta)


def check_device(device: str | Device | None, parameter: str = "--device") -> Device:
    """The device (see :func:`~LymphNodeStagingLib.runtime.parse_device`), refused when torch does not see it."""
    return parse_device(device, name=parameter)


def check_model(model: str | Path | None, device: str | Device = "cpu", parameter: str = "--model", *,
                pet: bool = True):
    """Load and verify the classifier checkpoint (None: the bundled demo model); returns (network, manifest, path).

    Loading is the check: a missing, truncated, tampered or other-architecture checkpoint is a ModelError naming
    the file, before any heavy step. ``pet`` False: the case has no PET, so the default is the bundled CT-only demo
    model and a model that reads the PET is a UsageError naming the parameter."""
    from ..classifier.checkpoint import load_model
    from ..errors import ModelError
    from ..paths import demo_ct_model_path, demo_model_path

    path = Path(model) if model else (demo_model_path() if pet else demo_ct_model_path())
    if not path.is_file():
        raise ModelError(f"{parameter} {path}: the checkpoint does not exist; pass a checkpoint made by "
                         "`lnstaging train`" + ("" if pet else " --modality ct"))
    dev = device.torch if isinstance(device, Device) else str(device)
    net, manifest = load_model(path, device=dev)
    if not pet and model_modality(net) != "ct":
        raise UsageError(f"{parameter} {path}: this station classifier reads the PET as well as the CT, but no PET "
                         "was given; give the PET, or a CT-only model as --model (made by `lnstaging train "
                         "--modality ct`; without --model the bundled CT-only demo model is used)")
    return net, manifest, path


def model_modality(net) -> str:
    """What a loaded classifier reads: "petct" (CT and PET) or "ct" (the CT alone)."""
    from ..classifier.model import station_classifier_of

    return station_classifier_of(net).config.modality


def check_node_model(model: str | Path | None, device: str | Device = "cpu", parameter: str = "--node-model"):
    """Load and verify the node model (``model``, else the bundled node model when there is one; see
    ``nodes.model.resolve_node_model``); returns the NodeModel, or None when there is no node model to run.

    A missing, truncated or tampered checkpoint, or one of another kind (a station classifier), is a ModelError
    naming the parameter and the file, before any heavy step."""
    from ..errors import ModelError
    from ..nodes.model import load_node_model, resolve_node_model

    path = resolve_node_model(model, required=False)
    if path is None:
        return None
    if not path.is_file():
        raise ModelError(f"{parameter} {path}: the node model does not exist; pass a checkpoint made by "
                         "`lnstaging train-nodes` (its best.pt)")
    dev = device.torch if isinstance(device, Device) else str(device)
    try:
        return load_node_model(path, device=dev)
    except ModelError as exc:
        raise ModelError(f"{parameter}: {exc}") from None


def check_out(out: str | Path | None, parameter: str = "--out") -> Path | None:
    """An output folder that can be created and written (None: nothing is written)."""
    return None if out is None else check_output(out, folder=True, parameter=parameter)


def check_node_classifier(model: str | Path | None, has_pet: bool = True, device: str | Device = "cpu",
                          parameter: str = "--node-classifier"):
    """Load and verify the node classifier (``model``, else the bundled one for the case's modality); returns the
    NodeClassifierModel, or None when there is none. A classifier that reads the PET given for a case without PET,
    or a file of another kind, is refused naming the parameter and the file, before any heavy step."""
    from ..errors import ModelError
    from ..nodes.malignancy import load_node_classifier, resolve_node_classifier

    path = resolve_node_classifier(model, "petct" if has_pet else "ct")
    if path is None:
        return None
    if not path.is_file():
        raise ModelError(f"{parameter} {path}: file not found (expected a node classifier checkpoint made by "
                         "`lnstaging train-node-classifier`)")
    try:
        clf = load_node_classifier(path, device=parse_device(device).torch)
    except ModelError as exc:
        raise ModelError(f"{parameter}: {exc}") from None
    if clf.config.modality == "petct" and not has_pet:
        raise UsageError(f"{parameter} {path}: this node classifier reads the PET, but no PET was given; give a "
                         "CT-only node classifier (`lnstaging train-node-classifier --modality ct`)")
    return clf
