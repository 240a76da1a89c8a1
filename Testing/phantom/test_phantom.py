"""Phantom generator: determinism, anatomy/station/node consistency, labels, writing, cohort and atlas set."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.anatomy import labels as L
from LymphNodeStagingLib.anatomy.labels import TOTAL_CLASSES
from LymphNodeStagingLib.cohort.table import read_cohort
from LymphNodeStagingLib.errors import LNSError, UsageError
from LymphNodeStagingLib.phantom import (
    PhantomConfig,
    generate_atlas_set,
    generate_cohort,
    generate_patient,
    write_patient,
)
from LymphNodeStagingLib.staging.rules import N_STAGES, load_rules
from LymphNodeStagingLib.staging.stations import STATIONS, parse_station


@pytest.fixture(scope="module")
def patients():
    return [generate_patient(s, "small") for s in (1, 2, 3, 4)]


def arr(img):
    return sitk.GetArrayFromImage(img)


def test_same_seed_same_images_different_seed_different_anatomy():
    a, b, c = generate_patient(11), generate_patient(11), generate_patient(12)
    for key in ("ct", "pet", "anatomy", "stations", "nodes", "lesions"):
        assert np.array_equal(arr(getattr(a, key)), arr(getattr(b, key))), key
    assert a.truth == b.truth
    assert not np.array_equal(arr(a.anatomy), arr(c.anatomy))
    assert a.ct.GetOrigin() != c.ct.GetOrigin()


def test_grids_and_types(patients):
    p = patients[0]
    assert p.ct.GetPixelID() == sitk.sitkInt16 and p.pet.GetPixelID() == sitk.sitkFloat32
    assert p.anatomy.GetSize() == p.ct.GetSize() == p.stations.GetSize() == p.nodes.GetSize()
    assert p.anatomy.GetOrigin() == p.ct.GetOrigin()
    assert p.pet.GetSpacing() != p.ct.GetSpacing() and p.pet.GetOrigin() != p.ct.GetOrigin()
    assert np.prod(p.ct.GetSize()) < 600_000  # small size: a few 10^5 voxels
    ids = set(np.unique(arr(p.anatomy)).tolist()) - {0}
    assert ids <= set(TOTAL_CLASSES)
    for needed in (L.TRACHEA, L.AORTA, L.HEART, L.ESOPHAGUS, L.PULMONARY_ARTERY, L.AZYGOS, L.SUPERIOR_VENA_CAVA,
                   L.BRACHIOCEPHALIC_VEIN_LEFT, L.LUNG_UPPER_LOBE_RIGHT, L.LUNG_LOWER_LOBE_LEFT, L.STERNUM):
        assert needed in ids, TOTAL_CLASSES[needed]


def test_full_size_anatomy_has_all_vertebrae_and_ribs():
    p = generate_patient(5, "full")
    ids = set(np.unique(arr(p.anatomy)).tolist())
    assert {L.vertebra_id(f"T{k}") for k in range(1, 12)} <= ids
    assert {L.rib_id(s, k) for s in "LR" for k in range(1, 11)} <= ids
    assert {L.CLAVICULA_LEFT, L.CLAVICULA_RIGHT, L.SPINAL_CORD, L.LIVER} <= ids
    sp = p.ct.GetSpacing()
    assert sp == (1.0, 1.0, 3.0) and p.pet.GetSpacing() == (4.0, 4.0, 4.0)


def test_stations_all_present_inside_body_outside_airways_and_vessels(patients):
    forbidden = np.array(sorted(set(L.AIRWAY_IDS) | set(L.VESSEL_IDS) | set(L.BONE_IDS) | {L.ESOPHAGUS}))
    for p in patients:
        st, an, ct = arr(p.stations), arr(p.anatomy), arr(p.ct)
        present = set(np.unique(st).tolist()) - {0}
        assert present == set(range(1, 18)), f"{p.patient_id}: missing {set(range(1, 18)) - present}"
        assert not np.isin(an[st > 0], forbidden).any()
        assert np.median(ct[st > 0]) > -300  # soft tissue, not lung or air
        assert (ct[st > 0] > -900).mean() > 0.98


def test_station_sidedness(patients):
    """Right-sided stations lie at smaller x (patient right) than their left counterparts."""
    for p in patients:
        st = arr(p.stations)
        xs = p.ct.GetOrigin()[0] + p.ct.GetSpacing()[0] * np.arange(st.shape[2])
        mean_x = {s.name: float(xs[np.nonzero(st == s.label)[2]].mean()) for s in STATIONS}
        for num in ("1", "2", "4", "10", "11"):
            assert mean_x[num + "R"] < mean_x[num + "L"], num
        zs = p.ct.GetOrigin()[2] + p.ct.GetSpacing()[2] * np.arange(st.shape[0])
        mean_z = {s.name: float(zs[np.nonzero(st == s.label)[0]].mean()) for s in STATIONS}
        assert mean_z["1R"] > mean_z["2R"] > mean_z["4R"] > mean_z["7"] > mean_z["8"]


def test_nodes_inside_their_station_and_truth(patients):
    for p in patients:
        st, nodes, les = arr(p.stations), arr(p.nodes), arr(p.lesions)
        truth_nodes = {n["id"]: (name, n) for name, s in p.truth["stations"].items() for n in s["nodes"]}
        assert set(np.unique(nodes).tolist()) - {0} == set(truth_nodes)
        for nid, (name, n) in truth_nodes.items():
            m = nodes == nid
            assert np.all(st[m] == parse_station(name).label), (p.patient_id, nid, name)
            assert 4.0 <= n["short_axis_mm"] <= 30.0
            assert np.all(les[m] == (1 if n["malignant"] else 0))
            idx = p.ct.TransformPhysicalPointToIndex(n["centre_mm"])
            assert nodes[idx[2], idx[1], idx[0]] in (nid, 0)


def test_labels_consistent_with_rules(patients):
    rules = load_rules("ajcc8")
    for p in patients:
        t = p.truth
        assert t["n_stage"] == N_STAGES[rules.stage(t["positive_stations"], t["tumour_side"]).n_stage]
        rep = t["reported"]
        assert rep["n_stage"] == N_STAGES[rules.stage(rep["positive_stations"], t["tumour_side"]).n_stage]
        for name, s in t["stations"].items():
            malignant = any(n["malignant"] for n in s["nodes"])
            assert (s["status"] == "positive") == malignant == (name in t["positive_stations"])


def test_n_stage_mix_is_configurable():
    cfg = PhantomConfig(n_stage_mix=(0, 0, 0, 1), label_noise=0.0)
    for seed in range(3):
        t = generate_patient(seed, "small", cfg).truth
        assert t["n_stage"] == "N3"
        assert t["reported"]["positive_stations"] == t["positive_stations"]


def test_bad_parameters_raise():
    with pytest.raises(LNSError, match="size"):
        generate_patient(1, "huge")
    with pytest.raises(LNSError, match="n_stage_mix"):
        generate_patient(1, "small", PhantomConfig(n_stage_mix=(1, 2)))
    with pytest.raises(LNSError, match="format"):
        write_patient(generate_patient(1), "/tmp/never", format="png")


def test_write_patient_nifti_is_byte_reproducible(tmp_path):
    p = generate_patient(21)
    a = write_patient(p, tmp_path / "a")
    b = write_patient(generate_patient(21), tmp_path / "b")
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    ct = sitk.ReadImage(str(a["ct"]))
    assert ct.GetOrigin() == pytest.approx(p.ct.GetOrigin()) and ct.GetSpacing() == p.ct.GetSpacing()
    truth = json.loads(a["truth"].read_text())
    assert truth["manifest"]["seed"] == 21 and truth["manifest"]["generator_version"]


def test_cohort_csv_reads_back_valid(tmp_path):
    csv_path = generate_cohort(tmp_path / "cohort", patients=3, seed=5)
    cohort = read_cohort(csv_path)
    assert cohort.valid, cohort.problems
    assert len(cohort.rows) == 3
    manifest = json.loads((tmp_path / "cohort" / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["patients"] == 3


def test_atlas_set_format(tmp_path):
    out = generate_atlas_set(tmp_path / "atlases", atlases=2, seed=3, size="small")
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "lnstaging-atlas-set" and man["format_version"] == 1 and man["synthetic"] is True
    assert man["anatomy_vocabulary"] == "totalsegmentator-total-v2" and len(man["atlases"]) == 2
    for a in man["atlases"]:
        imgs = [sitk.ReadImage(str(out / a[k])) for k in ("ct", "anatomy", "stations")]
        assert len({(i.GetSize(), i.GetOrigin(), i.GetSpacing()) for i in imgs}) == 1
        assert set(np.unique(arr(imgs[2])).tolist()) == set(range(0, 18))


def test_cli_phantom_with_preview_and_atlas(tmp_path, capsys):
    from LymphNodeStagingLib.cli.main import main

    assert main(["phantom", "--out", str(tmp_path / "c"), "--patients", "1", "--seed", "2", "--preview", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert read_cohort(out["cohort"]).valid
    png = tmp_path / "c" / "PH0001" / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["phantom", "--out", str(tmp_path / "a"), "--atlas", "--patients", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["format"] == "lnstaging-atlas-set"
    assert main(["phantom", "--out", str(tmp_path / "x"), "--n-stage-mix", "a,b"]) == 2


def test_suv_ranges(patients):
    """Organ and node SUVs stay within the documented ranges."""
    for p in patients:
        t = p.truth
        assert 1.5 <= t["physiology"]["blood_pool"] <= 2.0 and 1.0 <= t["physiology"]["myocardium"] <= 10.0
        for s in t["stations"].values():
            for n in s["nodes"]:
                lo, hi = {"malignant": (2.5, 18), "benign": (0.8, 2.6), "inflammatory": (2.2, 7.5)}[n["kind"]]
                assert lo <= n["true_suvmax"] <= hi
                assert 0.0 < n["pet_suvmax"] < 25.0
        if t["tumour"]:
            assert 4.5 <= t["tumour"]["true_suvmax"] <= 22
        pet = arr(p.pet)
        assert pet.min() >= 0 and np.median(pet) < 1.0
    measured = {k: [n["pet_suvmax"] for p in patients for s in p.truth["stations"].values() for n in s["nodes"]
                    if n["kind"] == k] for k in ("malignant", "benign")}
    if measured["malignant"]:
        assert np.median(measured["malignant"]) > np.median(measured["benign"])


def test_shifted_cohort_moves_what_a_scanner_varies_and_leaves_the_standard_one_alone():
    from LymphNodeStagingLib.phantom.patient import Shift

    a = generate_patient(7, "small")
    b = generate_patient(7, "small", PhantomConfig(shift=0.0))
    assert sitk.GetArrayViewFromImage(a.ct).tobytes() == sitk.GetArrayViewFromImage(b.ct).tobytes()
    assert a.manifest["shift"] == asdict(Shift())
    s = generate_patient(7, "small", PhantomConfig(shift=1.0))
    sh = s.manifest["shift"]
    assert s.ct.GetSpacing() == pytest.approx(tuple(v * sh["spacing"] for v in a.ct.GetSpacing()))
    assert 0.8 <= sh["spacing"] <= 1.5 and 1.0 <= sh["benign_uptake"] <= 1.6
    assert max(abs(v) for v in sh["position_mm"]) <= 150 and sh["position_mm"] != (0.0, 0.0, 0.0)
    assert s.truth["n_stage"] == a.truth["n_stage"]  # the same disease, seen by another scanner
    with pytest.raises(UsageError, match="shift"):
        generate_patient(7, "small", PhantomConfig(shift=3.0))
