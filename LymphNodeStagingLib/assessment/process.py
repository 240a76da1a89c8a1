"""The assessment of one case in a child process, streaming progress as JSON lines (Qt-free).

A GUI must not run the assessment on its own thread: it would freeze for the whole run. ``AssessmentProcess`` starts
``python -m LymphNodeStagingLib.assessment.process JOB.json`` (the same ``assess_case`` as everywhere), reads the
child's output on a thread and hands it out as ``ProcessEvent`` objects from the non-blocking ``poll()``, which a GUI
calls from a timer (the Slicer module polls from a ``qt.QTimer``). ``cancel()`` asks the child to stop through
``assess_case``'s ``cancel`` callback (a flag file in the output folder, looked at between steps) and terminates it
when it has not stopped after a grace period. ``output()`` reads the result back (result JSON, station map, the node
instance map when a node model ran, the SUV PET when the PET came from DICOM) or raises the child's error. ``run_assessment_process`` is the blocking form with
the ``progress``/``cancel`` callbacks of ``assess_case``.

Protocol: every line of the child that starts with ``@lns `` is one JSON object with an ``event`` key: ``progress``
(``fraction``, ``message``), ``log`` (``level``, ``message``), ``done`` (``files``, ``dicom_sources``), ``error``
(``kind``, ``message``) or ``cancelled``. Other lines (libraries that print) become ``log`` events.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import Cancelled, LNSError, ProcessingError
from ..io.files import write_image, write_json
from ..paths import package_root
from ..runtime import Progress, ProgressCallback

log = logging.getLogger(__name__)

PREFIX = "@lns "
CANCEL_FILE = "cancel-requested"
JOB_FILE = "job.json"
PET_SUV_FILE = "pet_suv.nrrd"
#: exit codes of the child
EXIT_OK, EXIT_CRASH, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2, 3


@dataclass
class AssessmentJob:
    """What the child assesses: ``assess_case``'s arguments as plain values (files, not images)."""

    ct: str
    pet: str | None  # None: the CT alone (CT-only mode)
    side: str
    out_dir: str
    anatomy: str | None = None
    model: str | None = None
    node_model: str | None = None  # node model checkpoint (None: the bundled one when there is one, else no nodes)
    atlases: str | None = None
    rules: str = "ajcc8"
    device: str = "cpu"
    pet_is_suv: bool = False
    suv_mode: str = "qiba"
    threshold: float | None = None
    case_id: str | None = None
    station_mapping: str | None = None  # folder written by mapping.write_station_mapping (skips registration)
    method: str = "atlas"  # station mapping: atlas | network | both (stationnet/method.py)
    station_model: str | None = None  # station network checkpoint (None: the bundled one)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "job") -> AssessmentJob:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(k for k in ("ct", "side", "out_dir") if not data.get(k))
        data = {"pet": None, **data}  # no PET: a CT alone
        if unknown or missing:
            raise ProcessingError(f"{source}: unknown keys {unknown}, missing keys {missing}; expected "
                                  f"keys among {sorted(known)}")
        return cls(**data)

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> AssessmentJob:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProcessingError(f"job file {path}: expected a JSON object ({exc})") from None
        if not isinstance(data, dict):
            raise ProcessingError(f"job file {path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, str(path))


@dataclass
class ProcessEvent:
    """One message of the child: progress, log, done, error or cancelled."""

    kind: str
    fraction: float | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProcessOutput:
    """What a finished child produced, read back into memory."""

    result: Any  # result.CaseResult
    station_map: Any  # SimpleITK label image
    pet: Any | None  # SimpleITK SUV image when the PET was a DICOM series (None: the caller's PET image is SUV)
    files: dict[str, Path]
    dicom_sources: dict[str, str]
    node_map: Any | None = None  # SimpleITK lymph node instance map (ids of result.nodes) when a node model ran


def parse_line(line: str) -> ProcessEvent:
    """A child output line as an event (lines without the prefix, or malformed ones, are log lines)."""
    text = line.rstrip("\r\n")
    if text.startswith(PREFIX):
        try:
            obj = json.loads(text[len(PREFIX):])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            kind = obj.pop("event")
            fraction = obj.pop("fraction", None)
            message = str(obj.pop("message", ""))
            return ProcessEvent(kind, None if fraction is None else float(fraction), message, obj)
    return ProcessEvent("log", None, text, {"level": "INFO"})


class AssessmentProcess:
    """One assessment in a child process; poll() from a GUI timer, or wait()."""

    def __init__(self, job: AssessmentJob, *, python: str | None = None, env: dict[str, str] | None = None,
                 cancel_grace_s: float = 10.0) -> None:
        self.job = job
        self.python = python or sys.executable
        self.env = env
        self.cancel_grace_s = cancel_grace_s
        self.events: list[ProcessEvent] = []  # every event so far
        self._queue: queue.Queue[ProcessEvent | None] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._reader_done = False
        self._cancel_at: float | None = None
        self._terminated = False

    @property
    def out_dir(self) -> Path:
        return Path(self.job.out_dir)

    def start(self) -> AssessmentProcess:
        if self._proc is not None:
            raise ProcessingError("this assessment process was started already")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / CANCEL_FILE).unlink(missing_ok=True)
        job_file = self.job.write(self.out_dir / JOB_FILE)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(package_root()), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [self.python, "-m", "LymphNodeStagingLib.assessment.process", str(job_file)]
        log.info("starting %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, text=True, encoding="utf-8", errors="replace", bufsize=1)
        except OSError as exc:
            raise ProcessingError(f"python {self.python!r}: cannot start the assessment process ({exc})") from None
        self._reader = threading.Thread(target=self._read, name="assessment-process-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():
                self._queue.put(parse_line(line))
        self._proc.stdout.close()
        self._queue.put(None)

    def poll(self) -> list[ProcessEvent]:
        """The events that arrived since the last call (never blocks); terminates a child that ignores cancel."""
        new: list[ProcessEvent] = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                self._reader_done = True
                continue
            new.append(event)
        self.events.extend(new)
        if self._cancel_at is not None and self.running and time.monotonic() - self._cancel_at > self.cancel_grace_s:
            log.warning("assessment process did not stop within %.0f s of cancel: terminating it", self.cancel_grace_s)
            self.kill()
        return new

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def finished(self) -> bool:
        """The child has exited and all its output has been read (poll() returned everything)."""
        return self._proc is not None and self._proc.poll() is not None and self._reader_done

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_at is not None

    def cancel(self) -> None:
        """Ask the child to stop at its next cancel check; poll() terminates it after ``cancel_grace_s``."""
        if self._cancel_at is None:
            self._cancel_at = time.monotonic()
            (self.out_dir / CANCEL_FILE).write_text("cancel\n", encoding="utf-8")

    def kill(self) -> None:
        """Terminate the child now (its output folder may hold partial files)."""
        if self.running:
            self._terminated = True
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def wait(self, timeout: float | None = None, on_event: Callable[[ProcessEvent], None] | None = None,
             interval_s: float = 0.05) -> ProcessOutput:
        """Poll until the child finishes (events to ``on_event``), then return its output (or raise)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise ProcessingError(f"assessment process still running after {timeout} s: terminated")
            time.sleep(interval_s)
        for event in self.poll():
            if on_event is not None:
                on_event(event)
        return self.output()

    def output(self) -> ProcessOutput:
        """The finished child's output; raises Cancelled, or ProcessingError with the child's message."""
        import SimpleITK as sitk

        from ..staging.result import CaseResult
        pass

        if not self.finished:
            raise ProcessingError("the assessment process has not finished")
        last = {e.kind: e for e in self.events}
        if "cancelled" in last or (self._terminated and self._cancel_at is not None):
            raise Cancelled("assessment cancelled")
        if "error" in last:
            err = last["error"]
            raise ProcessingError(f"{err.data.get('kind', 'error')}: {err.message}")
        if self.returncode != EXIT_OK or "done" not in last:
            tail = "\n".join(e.message for e in self.events[-15:] if e.kind == "log")
            raise ProcessingError(f"assessment process ended with exit code {self.returncode} and no result"
                                         + (f"; its last output:\n{tail}" if tail else ""))
        done = last["done"]
        files = {k: Path(v) for k, v in done.data.get("files", {}).items()}
        result = CaseResult.read_json(files["result_json"])
        station_map = sitk.ReadImage(str(files["stations"]))
        pet = sitk.ReadImage(str(files["pet_suv"])) if "pet_suv" in files else None
        node_map = sitk.ReadImage(str(files["nodes"])) if "nodes" in files else None
        return ProcessOutput(result, station_map, pet, files, dict(done.data.get("dicom_sources", {})), node_map)


def run_assessment_process(job: AssessmentJob, *, progress: ProgressCallback | None = None,
                           cancel: Callable[[], bool] | None = None, log_callback: Callable[[str], None] | None = None,
                           python: str | None = None, timeout: float | None = None) -> ProcessOutput:
    """Run ``job`` in a child process and wait, with the callbacks of ``assess_case`` (and one for log lines)."""
    process = AssessmentProcess(job, python=python).start()

    def on_event(event: ProcessEvent) -> None:
        if event.kind == "progress" and progress is not None:
            progress(Progress(event.fraction or 0.0, 1.0, event.message))
        elif event.kind == "log" and log_callback is not None:
            log_callback(event.message)
        if cancel is not None and not process.cancel_requested and cancel():
            process.cancel()

    return process.wait(timeout=timeout, on_event=on_event)


# ----- the child -----------------------------------------------------------------------------------------------
def _emit(event: str, **data: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **data}, default=str) + "\n")
    sys.stdout.flush()


class _EventLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _emit("log", level=record.levelname, message=self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of the child: run the job file's assessment, report events on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    handler = _EventLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if len(argv) != 1:
            raise ProcessingError(f"usage: python -m LymphNodeStagingLib.assessment.process JOB.json "
                                  f"(got {len(argv)} arguments)")
        job = AssessmentJob.read(argv[0])
        return _run_job(job)
    except LNSError as exc:
        pass

        if isinstance(exc, Cancelled):
            _emit("cancelled", message=str(exc))
            return EXIT_CANCELLED
        _emit("error", kind=type(exc).__name__, message=str(exc))
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - reported to the parent, with the traceback in the log
        log.exception("assessment failed")
        _emit("error", kind=type(exc).__name__, message=str(exc))
        return EXIT_CRASH


def _run_job(job: AssessmentJob) -> int:
    from .assess import assess_case, write_outputs

    out = Path(job.out_dir)
    cancel_file = out / CANCEL_FILE
    mapping = None
    if job.station_mapping:
        from ..mapping.station_mapping import read_station_mapping

        mapping = read_station_mapping(job.station_mapping)
    assessment = assess_case(
        job.ct, job.pet, job.side, anatomy=job.anatomy, model=job.model, node_model=job.node_model,
        atlases=job.atlases, rules=job.rules,
        device=job.device, pet_is_suv=job.pet_is_suv, suv_mode=job.suv_mode, threshold=job.threshold,
        case_id=job.case_id, station_mapping=mapping, method=job.method, station_model=job.station_model,
        progress=lambda p: _emit("progress", fraction=round(0.95 * p.fraction, 4), message=p.message),
        cancel=cancel_file.exists)
    _emit("progress", fraction=0.95, message="writing outputs")
    files = write_outputs(assessment, out)
    if "pet" in assessment.dicom_sources:
        files["pet_suv"] = write_image(assessment.pet, out / PET_SUV_FILE, compress=False)
    _emit("progress", fraction=1.0, message=f"done: {assessment.result.n_stage}")
    _emit("done", files={k: str(v) for k, v in files.items()}, dicom_sources=assessment.dicom_sources,
          n_stage=assessment.result.n_stage)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(child_main())
