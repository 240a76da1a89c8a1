"""Station mapping on phantoms: small phantom patients against a small 5-atlas phantom set (other seeds), scored by
the phantom's true node-to-station assignment. One torch thread: the test machine's cores are shared, and
oversubscribed OpenMP threads make the many small tensor operations of the registration many times slower."""

from __future__ import annotations

import numpy as np
import pytest

from LymphNodeStagingLib.mapping.atlas import load_atlas_set
from LymphNodeStagingLib.mapping.registration import RegistrationConfig
from LymphNodeStagingLib.mapping.station_mapping import map_stations
from LymphNodeStagingLib.mapping.weightmap import assign_points
from LymphNodeStagingLib.phantom import generate_atlas_set, generate_patient
from LymphNodeStagingLib.staging.stations import parse_station

PATIENT_SEEDS = (4242, 7, 11)  # never an atlas seed


@pytest.fixture(scope="module")
def small_atlas_set(tmp_path_factory):
    root = generate_atlas_set(tmp_path_factory.mktemp("atlases") / "set", atlases=5, seed=1000, size="small")
    return load_atlas_set(root, allow_missing_stations=True)


def _true_nodes(truth: dict) -> list[tuple[str, np.ndarray]]:
    return [(parse_station(name).name, np.asarray(node["centre_mm"], float))
            for name, info in truth.get("stations", {}).items() for node in info.get("nodes", [])]


def test_phantom_nodes_land_in_their_stations(small_atlas_set):
    correct = total = 0
    for seed in PATIENT_SEEDS:
        patient = generate_patient(seed, size="small")
        m = map_stations(patient.ct, patient.anatomy, small_atlas_set, config=RegistrationConfig(threads=1))
        nodes = _true_nodes(patient.truth)
        assert nodes, f"phantom {seed} has no nodes"
        got = assign_points(np.array([c for _, c in nodes]), m.weight_maps)
        correct += sum(g == s for g, (s, _) in zip(got, nodes, strict=True))
        total += len(nodes)
        assert m.flags["7"] == "ok"
        assert set(m.timings) >= {"affine", "deformable", "warp_stations", "fusion", "weight_maps"}
    assert total >= 30
    assert correct / total >= 0.90, f"node-to-station accuracy {correct}/{total}"
