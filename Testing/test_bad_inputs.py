"""A corpus of bad inputs, made by the test: every one is refused before any heavy work, with the documented exit
status, a one-line message naming the culprit, no traceback, and nothing written into --out.

Images, DICOM series, cohort tables, models, atlas sets, options and output paths; run through ``lnstaging`` (the
command line's ``main``) as a user would.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_fixtures import write_series

from LymphNodeStagingLib.cli.main import main

#: Refusals of options and models must come in well under this (no station mapping before them).
FAST_S = 3.0


@dataclass
class Case:
    name: str
    make: Callable[[Path, dict], list[str]]  # (work folder, fixtures) -> argv
    exit: int
    culprit: Callable[[Path, dict], str] | str  # a text the message must contain


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A valid small phantom case (NIfTI, anatomy), a 2-atlas set, a small model, a DICOM PET series."""
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import save_checkpoint
    from LymphNodeStagingLib.classifier.model import ModelConfig, build_model
    from LymphNodeStagingLib.phantom import generate_atlas_set, generate_cohort, generate_patient, write_patient

    root = tmp_path_factory.mktemp("good")
    patient = generate_patient(4242, "small")
    paths = write_patient(patient, root / "PH4242")
    atlases = generate_atlas_set(root / "atlases", atlases=2, seed=98, size="small")
    cfg = ModelConfig.small(32)
    torch.manual_seed(0)
    model = save_checkpoint(root / "model.pt", build_model("station", cfg),
                            {"kind": "station", "model_config": cfg.to_dict(), "threshold": 0.5})
    cohort = generate_cohort(root / "cohort", 2, seed=5, size="small")
    pet_dicom = write_series(root / "pet_dicom", n=3)
    return {"root": root, "ct": Path(paths["ct"]), "pet": Path(paths["pet"]), "anatomy": Path(paths["anatomy"]),
            "side": patient.truth["tumour_side"], "atlases": Path(atlases), "model": Path(model),
            "cohort": Path(cohort), "pet_dicom": Path(pet_dicom)}


def assess(w: Path, g: dict, **over: str | None) -> list[str]:
    """An `lnstaging assess` call on the good case with some arguments replaced (None drops one)."""
    args = {"--ct": str(g["ct"]), "--pet": str(g["pet"]), "--side": g["side"], "--anatomy": str(g["anatomy"]),
            "--atlases": str(g["atlases"]), "--model": str(g["model"]), "--out": str(w / "out")}
    flags = ["--pet-is-suv"]
    for k, v in over.items():
        key = "--" + k.replace("_", "-")
        if key == "--pet-is-suv":
            flags = [] if v is None else [key, v]
        elif v is None:
            args.pop(key, None)
        else:
            args[key] = v
    return ["assess", *[x for kv in args.items() for x in kv], *flags, "--threads", "1"]


def image_variant(src: Path, dst: Path, change: Callable[[np.ndarray], np.ndarray] | None = None,
                  spacing: tuple[float, ...] | None = None, origin_shift: float = 0.0,
                  pixel_type: int | None = None) -> Path:
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if change is not None:
        arr = change(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    if spacing is not None:
        out.SetSpacing(spacing)
    if origin_shift:
        out.SetOrigin(tuple(o + origin_shift for o in img.GetOrigin()))
    if pixel_type is not None:
        out = sitk.Cast(out, pixel_type)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(dst), True)
    return dst


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def nan_part(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[: 2 * a.shape[0] // 3] = np.nan
    return a


def inf_part(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[:2] = np.inf
    return a


def ct_variant(**kw):
    return lambda w, g: assess(w, g, ct=str(image_variant(g["ct"], w / "bad" / "ct.nii.gz", **kw)))


def pet_variant(**kw):
    return lambda w, g: assess(w, g, pet=str(image_variant(g["pet"], w / "bad" / "pet.nii.gz", **kw)))


def culprit_file(name: str) -> Callable[[Path, dict], str]:
    return lambda w, g: str(w / "bad" / name)


def model_variant(make_file: Callable[[Path, dict], Path]):
    return lambda w, g: assess(w, g, model=str(make_file(w, g)))


def other_architecture(w: Path, g: dict) -> Path:
    import torch

    from LymphNodeStagingLib.classifier.checkpoint import load_checkpoint

    ck = load_checkpoint(g["model"])
    payload = torch.load(g["model"], weights_only=True)
    payload["manifest"]["model_config"] = {**ck.manifest["model_config"], "patch_size": 64,
                                           "channels": [8, 16, 32, 64, 128]}
    p = w / "bad" / "other.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, p)
    return p


def edited_checkpoint(name: str, edit: Callable[[dict], None]) -> Callable[[Path, dict], Path]:
    """A copy of the good model with ``edit`` applied to its payload (the embedded hashes left as they were)."""
    def make(w: Path, g: dict) -> Path:
        import torch

        payload = torch.load(g["model"], weights_only=True)
        edit(payload)
        p = w / "bad" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, p)
        return p
    return make


def _change_a_weight(payload: dict) -> None:
    name = sorted(payload["state_dict"])[0]
    payload["state_dict"][name] = payload["state_dict"][name] + 0.5


tampered = edited_checkpoint("tampered.pt", _change_a_weight)
wrong_kind = edited_checkpoint("kind.pt", lambda payload: payload["manifest"].update(kind="segmenter"))


def bytes_file(name: str, data: bytes) -> Callable[[Path, dict], Path]:
    def make(w: Path, g: dict) -> Path:
        p = w / "bad" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p
    return make


def atlas_variant(edit: Callable[[Path], None]):
    def make(w: Path, g: dict) -> list[str]:
        dst = w / "bad" / "atlases"
        shutil.copytree(g["atlases"], dst)
        edit(dst)
        return assess(w, g, atlases=str(dst))
    return make


def drop_atlas_file(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / manifest["atlases"][0]["stations"]).unlink()


def unknown_atlas_labels(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    p = root / manifest["atlases"][0]["anatomy"]
    img = sitk.ReadImage(str(p))
    arr = sitk.GetArrayFromImage(img)
    arr[arr > 0] = 150  # not a TotalSegmentator 'total' id
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(p), True)


def cohort_file(name: str, text: str, encoding: str = "utf-8") -> Callable[[Path, dict], Path]:
    def make(w: Path, g: dict) -> Path:
        p = w / "bad" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode(encoding))
        return p
    return make


HEADER = "patient_id,study,series,n_stage,positive_stations,tumour_side,ct_path,pet_path\n"


def cohort_with(edit: Callable[[str], str]) -> Callable[[Path, dict], Path]:
    def make(w: Path, g: dict) -> Path:
        text = edit(g["cohort"].read_text())
        p = g["cohort"].parent / f"bad_{abs(hash(text)) % 10**8}.csv"
        p.write_text(text)
        return p
    return make


def unknown_station(text: str) -> str:
    """The first data row of the cohort with N2 and the positive station 12R (there is no station 12)."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    rows[0]["n_stage"], rows[0]["positive_stations"] = "N2", "12R"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def dicom_variant(**over) -> Callable[[Path, dict], list[str]]:
    def make(w: Path, g: dict) -> list[str]:
        folder = write_series(w / "bad" / "dicom", n=3, **over)
        return ["suv", str(folder), "--out", str(w / "out" / "suv.nii.gz")]
    return make


def no_pixel_data(w: Path, g: dict) -> list[str]:
    import pydicom

    folder = write_series(w / "bad" / "dicom", n=3)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    return ["suv", str(folder), "--out", str(w / "out" / "suv.nii.gz")]


def mixed_patients(w: Path, g: dict) -> list[str]:
    import pydicom

    folder = write_series(w / "bad" / "dicom", n=3)
    f = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(f)
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(f)
    return ["suv", str(folder), "--out", str(w / "out" / "suv.nii.gz")]


def file_in_the_way(w: Path, g: dict) -> Path:
    p = w / "out"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("a file where the output folder should go")
    return p


CASES: list[Case] = [
    # --- images -------------------------------------------------------------------------------------------------
    Case("ct missing", lambda w, g: assess(w, g, ct=str(w / "nothing.nii.gz")), 1, "nothing.nii.gz"),
    Case("ct truncated nii.gz", lambda w, g: assess(w, g, ct=str(truncated(g["ct"], w / "bad" / "ct.nii.gz"))), 1,
         culprit_file("ct.nii.gz")),
    Case("ct not an image", lambda w, g: assess(w, g, ct=str(bytes_file("ct.nii.gz", b"hello")(w, g))), 1,
         culprit_file("ct.nii.gz")),
    Case("ct gzip of garbage", lambda w, g: assess(w, g, ct=str(bytes_file("ct.nii.gz", gzip.compress(b"x" * 999))(w, g))),
         1, culprit_file("ct.nii.gz")),
    Case("ct two thirds NaN", ct_variant(change=nan_part), 1, culprit_file("ct.nii.gz")),
    Case("ct with Inf", ct_variant(change=inf_part), 1, culprit_file("ct.nii.gz")),
    Case("ct spacing 50 mm", ct_variant(spacing=(50.0, 50.0, 50.0)), 1, culprit_file("ct.nii.gz")),
    Case("ct spacing 0.01 mm", ct_variant(spacing=(0.01, 0.01, 0.01)), 1, culprit_file("ct.nii.gz")),
    Case("ct constant", ct_variant(change=lambda a: np.full_like(a, 40.0)), 1, culprit_file("ct.nii.gz")),
    Case("ct not in HU (0..4095)", ct_variant(change=lambda a: np.clip(a + 1024, 0, 4095), pixel_type=sitk.sitkUInt16),
         1, culprit_file("ct.nii.gz")),
    Case("ct 2D", lambda w, g: assess(w, g, ct=str(_two_d(w))), 1, culprit_file("ct2d.nii.gz")),
    Case("ct folder without DICOM", lambda w, g: assess(w, g, ct=str(_empty_dir(w))), 1, culprit_file("empty")),
    Case("pet negative SUV", pet_variant(change=lambda a: a - 10.0), 1, culprit_file("pet.nii.gz")),
    Case("pet NaN", pet_variant(change=nan_part), 1, culprit_file("pet.nii.gz")),
    Case("pet truncated", lambda w, g: assess(w, g, pet=str(truncated(g["pet"], w / "bad" / "pet.nii.gz"))), 1,
         culprit_file("pet.nii.gz")),
    Case("pet file not declared SUV", lambda w, g: assess(w, g, pet_is_suv=None), 1, lambda w, g: str(g["pet"])),
    Case("pet elsewhere in space", pet_variant(origin_shift=5000.0), 1, "overlap"),
    Case("pet not covering the mediastinum", lambda w, g: assess(w, g, pet=str(_top_slab(g, w))), 1,
         "does not cover the mediastinum"),
    Case("anatomy missing", lambda w, g: assess(w, g, anatomy=str(w / "none.nii.gz")), 1, "none.nii.gz"),
    Case("anatomy not a thorax", lambda w, g: assess(w, g, anatomy=str(
        image_variant(g["anatomy"], w / "bad" / "anat.nii.gz", change=lambda a: np.where(a > 0, 5, 0).astype(np.float32),
                      pixel_type=sitk.sitkUInt16))), 1, "not a thorax"),
    # --- options ------------------------------------------------------------------------------------------------
    Case("threshold above 1", lambda w, g: assess(w, g, threshold="1.5"), 2, "--threshold"),
    Case("threshold below 0", lambda w, g: assess(w, g, threshold="-0.1"), 2, "--threshold"),
    Case("unknown rule set", lambda w, g: assess(w, g, rules="tnm7"), 2, "tnm7"),
    Case("side X", lambda w, g: assess(w, g, side="X"), 2, "--side"),
    Case("unknown device", lambda w, g: assess(w, g, device="quantum"), 2, "quantum"),
    Case("GPU that is not there", lambda w, g: assess(w, g, device="cuda:7"), 2, "cuda:7"),
    Case("threads 0", lambda w, g: [*assess(w, g), "--threads", "0"], 2, "--threads"),
    Case("tta negative", lambda w, g: assess(w, g, tta="-1"), 2, "--tta"),
    Case("pet-is-suv maybe", lambda w, g: assess(w, g, pet_is_suv="maybe"), 2, "--pet-is-suv"),
    Case("unknown SUV mode", lambda w, g: assess(w, g, suv_mode="magic"), 2, "magic"),
    # --- models -------------------------------------------------------------------------------------------------
    Case("model missing", lambda w, g: assess(w, g, model=str(w / "none.pt")), 1, "none.pt"),
    Case("model truncated", model_variant(lambda w, g: truncated(g["model"], w / "bad" / "cut.pt")), 1, "cut.pt"),
    Case("model random bytes", model_variant(bytes_file("random.pt", np.random.default_rng(0).bytes(5000))), 1,
         "random.pt"),
    Case("model other architecture", model_variant(other_architecture), 1, "other.pt"),
    Case("model weights changed", model_variant(tampered), 1, "tampered.pt"),
    Case("model of another kind", model_variant(wrong_kind), 1, "kind.pt"),
    Case("model is a folder", lambda w, g: assess(w, g, model=str(_empty_dir(w))), 1, "empty"),
    # --- atlas sets ---------------------------------------------------------------------------------------------
    Case("atlas folder missing", lambda w, g: assess(w, g, atlases=str(w / "no-atlases")), 1, "no-atlases"),
    Case("atlas folder without manifest", atlas_variant(lambda r: (r / "manifest.json").unlink()), 1, "manifest"),
    Case("atlas manifest broken", atlas_variant(lambda r: (r / "manifest.json").write_text("{not json")), 1,
         "manifest.json"),
    Case("atlas file missing", atlas_variant(drop_atlas_file), 1, "stations"),
    Case("atlas with unknown anatomy ids", atlas_variant(unknown_atlas_labels), 1, "150"),
    # --- outputs ------------------------------------------------------------------------------------------------
    Case("--out is a file", lambda w, g: assess(w, g, out=str(file_in_the_way(w, g))), 1, "--out"),
    Case("--out under a file", lambda w, g: assess(w, g, out=str(file_in_the_way(w, g) / "sub")), 1, "--out"),
    # --- DICOM --------------------------------------------------------------------------------------------------
    Case("suv: folder without DICOM", lambda w, g: ["suv", str(_empty_dir(w)), "--out", str(w / "out" / "s.nii.gz")],
         1, "empty"),
    Case("suv: no pixel data", no_pixel_data, 1, "PixelData"),
    Case("suv: two patients in one series", mixed_patients, 1, "PatientID"),
    Case("suv: no PatientWeight", dicom_variant(PatientWeight=None), 1, "PatientWeight"),
    Case("suv: output under a file", lambda w, g: ["suv", str(g["pet_dicom"]), "--out",
                                                   str(file_in_the_way(w, g) / "s.nii.gz")], 1, "--out"),
    Case("suv: output is a folder", lambda w, g: ["suv", str(g["pet_dicom"]), "--out", str(_empty_dir(w))], 1,
         "folder"),
    # --- cohort tables ------------------------------------------------------------------------------------------
    Case("cohort empty", lambda w, g: ["validate-cohort", str(cohort_file("empty.csv", "")(w, g))], 2, "empty.csv"),
    Case("cohort UTF-16", lambda w, g: ["validate-cohort", str(cohort_file("u16.csv", HEADER, "utf-16")(w, g))], 2,
         "u16.csv"),
    Case("cohort semicolons", lambda w, g: ["validate-cohort", str(cohort_file("semi.csv", HEADER.replace(",", ";"))(
        w, g))], 2, "semi.csv"),
    Case("cohort missing column", lambda w, g: ["validate-cohort", str(cohort_with(
        lambda t: t.replace("tumour_side", "side", 1))(w, g))], 2, "tumour_side"),
    Case("cohort unknown station", lambda w, g: ["validate-cohort", str(cohort_with(unknown_station)(w, g))], 2, "12R"),
    Case("cohort missing", lambda w, g: ["batch", str(w / "none.csv"), "--out", str(w / "out")], 1, "none.csv"),
    Case("batch --out is a file", lambda w, g: ["batch", str(g["cohort"]), "--out", str(file_in_the_way(w, g))], 1,
         "--out"),
    Case("batch unknown step", lambda w, g: ["batch", str(g["cohort"]), "--out", str(w / "out"), "--steps", "x"],
         2, "x"),
    Case("train missing cohort", lambda w, g: ["train", str(w / "none.csv"), "--strategy", "ts1", "--out",
                                               str(w / "out")], 1, "none.csv"),
    Case("evaluate one fold", lambda w, g: ["evaluate", str(g["cohort"]), "--out", str(w / "out"), "--folds", "1"],
         2, "fold"),
    Case("stage unknown station", lambda w, g: ["stage", "12R", "--side", "R"], 2, "12R"),
    Case("map truncated CT", lambda w, g: ["map", "--ct", str(truncated(g["ct"], w / "bad" / "ct.nii.gz")),
                                           "--anatomy", str(g["anatomy"]), "--atlases", str(g["atlases"]), "--out",
                                           str(w / "out")], 1, culprit_file("ct.nii.gz")),
]


def _two_d(w: Path) -> Path:
    p = w / "bad" / "ct2d.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.float32)), str(p))
    return p


def _empty_dir(w: Path) -> Path:
    p = w / "bad" / "empty"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _top_slab(g: dict, w: Path) -> Path:
    img = sitk.ReadImage(str(g["pet"]))
    z = img.GetSize()[2]
    p = w / "bad" / "pet_top.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img[:, :, z - 3:], str(p), True)
    return p


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)


def result_files(out: Path) -> list[Path]:
    """What a refused run left in its output folder (a file in the way that the test put there is not a result)."""
    if not out.exists() or out.is_file():
        return []
    return [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_refused_cleanly(case: Case, good: dict, tmp_path: Path, capsys):
    argv = case.make(tmp_path, good)
    capsys.readouterr()
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    cap = capsys.readouterr()
    culprit = case.culprit(tmp_path, good) if callable(case.culprit) else case.culprit
    assert code == case.exit, f"{case.name}: exit {code}, expected {case.exit}; stderr: {cap.err.strip()}"
    said = cap.err + (cap.out if argv[0] == "validate-cohort" else "")  # a validation reports its problems
    assert culprit in said, f"{case.name}: the message does not name {culprit!r}: {said.strip()}"
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    assert not result_files(tmp_path / "out"), f"{case.name}: --out holds {result_files(tmp_path / 'out')}"
    if case.name.startswith(("threshold", "unknown rule", "side", "unknown device", "GPU", "threads", "tta",
                             "pet-is-suv", "model")):
        assert seconds < FAST_S, f"{case.name}: refused after {seconds:.1f} s"
