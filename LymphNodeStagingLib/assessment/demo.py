"""The demo: a synthetic PET/CT patient assessed with the bundled model and atlas set, end to end.

It generates one phantom patient (NIfTI, PET in SUV, the phantom's anatomy label map standing in for
TotalSegmentator), maps the stations with the bundled synthetic atlas set (generated once and cached), runs the
bundled TS1 model and writes the report files. The phantom knows its truth, so the demo shows it next to the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import Device, ProgressCallback, progress_part, reporter

DEMO_SEED = 12
DEMO_SIZE = "full"


@dataclass
class DemoResult:
    assessment: object  # assessment.Assessment
    patient_dir: Path
    out_dir: Path
    truth: dict  # the phantom's truth.json (true N-stage, true positive stations, reported labels)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        r = self.assessment.result
        return {"case": r.to_dict(), "truth": {"n_stage": self.truth["n_stage"],
                                               "positive_stations": self.truth["positive_stations"]},
                "patient_dir": str(self.patient_dir), "out": str(self.out_dir),
                "files": {k: str(v) for k, v in self.files.items()},
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


def run_demo(out_dir: str | Path = "demo-out", *, seed: int = DEMO_SEED, size: str = DEMO_SIZE,
             model: str | Path | None = None, atlases: str | Path | None = None, device: str | Device = "cpu",
             progress: ProgressCallback | None = None) -> DemoResult:
    """Generate a phantom patient into OUT/patient and assess it into OUT/assessment."""
    import json

    from ..io.files import check_output
    from ..phantom import build_demo_atlas_set, generate_patient, write_patient
    from ..preflight.parameters import check_device, check_model
    from .assess import assess_case

    report = reporter(progress)
    out_dir = check_output(out_dir, folder=True, parameter="out_dir")
    device = check_device(device, "device")
    check_model(model, parameter="model")  # before the phantom and the atlas set are made
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    report(0.0, f"generating phantom patient (seed {seed}, {size})")
    patient = generate_patient(seed, size=size, patient_id=f"DEMO{seed:04d}")
    paths = write_patient(patient, out_dir / "patient")
    seconds["phantom"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(0.15, "synthetic demo atlas set (built on first use)")
    atlas_path = Path(atlases) if atlases else build_demo_atlas_set()
    seconds["atlas_set"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = json.loads(Path(paths["truth"]).read_text())
    res = assess_case(paths["ct"], paths["pet"], truth["tumour_side"], anatomy=paths["anatomy"], model=model,
                      atlases=atlas_path, device=device, pet_is_suv=True, case_id=patient.patient_id,
                      out_dir=out_dir / "assessment", progress=progress_part(progress, 0.2, 1.0))
    seconds["assessment"] = time.perf_counter() - t0
    return DemoResult(res, out_dir / "patient", out_dir / "assessment", truth, dict(res.files), seconds)
