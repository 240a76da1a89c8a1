"""What every step shares at run time: the compute device and the progress callback.

* :func:`parse_device` is the one reading of a device name, used by every command and the Slicer module:
  ``cpu``, ``gpu`` / ``cuda`` (the first GPU), ``gpu:N`` / ``cuda:N``, or ``auto`` (a GPU when torch sees one).
* :class:`Progress` is what a long step reports: how much of how much is done, and a line of text for people.
  Callbacks receive a ``Progress``; they never parse the text.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import UsageError

DEVICE_CHOICES = "cpu | gpu | cuda | cuda:N | auto"
#: Environment variables that bound the threads of OpenMP, BLAS, NumExpr and ITK in this process and its children.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@dataclass(frozen=True)
class Device:
    """A compute device: ``kind`` "cpu" or "cuda", and the GPU index (None: the first / the default)."""

    kind: str = "cpu"
    index: int | None = None

    @property
    def torch(self) -> str:
        """The torch device name: "cpu", "cuda" or "cuda:N"."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def totalsegmentator(self) -> str:
        """TotalSegmentator's device name: "cpu", "gpu" or "gpu:N"."""
        if self.kind == "cpu":
            return "cpu"
        return "gpu" if self.index is None else f"gpu:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.torch


CPU = Device()


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of every learned step
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_device(value: str | Device | None, *, check: bool = True, name: str = "--device") -> Device:
    """A :class:`Device` from ``cpu``, ``gpu``, ``cuda``, ``gpu:N``, ``cuda:N`` or ``auto`` (None: cpu).

    With ``check``, a GPU that torch does not see is refused here, before any work starts."""
    if isinstance(value, Device):
        device = value
    else:
        text = "cpu" if value is None else str(value).strip().lower()
        m = re.fullmatch(r"(cpu|gpu|cuda|auto)(?::(\d+))?", text)
        if not m or (m.group(2) is not None and m.group(1) in ("cpu", "auto")):
            raise UsageError(f"{name} {value!r}: expected {DEVICE_CHOICES}")
        kind, index = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
        if kind == "auto":
            return Device("cuda") if _cuda_count() > 0 else CPU
        device = CPU if kind == "cpu" else Device("cuda", index)
    if check and device.is_gpu:
        count = _cuda_count()
        if count == 0:
            raise UsageError(f"{name} {device.torch}: no CUDA GPU is available to torch on this machine; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{name} {device.torch}: torch sees {count} GPU(s), numbered 0..{count - 1}")
    return device


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of a step (cases, epochs, stages, or a fraction with total 1) and a message."""

    done: float
    total: float = 1.0
    message: str = ""

    @property
    def fraction(self) -> float:
        """Share done, 0..1."""
        return 0.0 if self.total <= 0 else min(max(float(self.done) / float(self.total), 0.0), 1.0)

    def __str__(self) -> str:
        return f"[{self.fraction * 100:5.1f} %] {self.message}"


ProgressCallback = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """A callback that ignores every report."""


def reporter(callback: ProgressCallback | None) -> Callable[..., None]:
    """``report(done, message="", total=1.0)``, which sends ``Progress(done, total, message)`` to ``callback`` (a
    no-op without one): the short form the steps use internally."""
    if callback is None:
        return lambda done, message="", total=1.0: None
    return lambda done, message="", total=1.0: callback(Progress(done, total, message))


def progress_part(callback: ProgressCallback | None, start: float, end: float) -> ProgressCallback:
    """A callback for a sub-step that fills the share ``start``..``end`` (fractions) of the caller's progress."""
    if callback is None:
        return no_progress

    def report(p: Progress) -> None:
        callback(Progress(start + (end - start) * p.fraction, 1.0, p.message))

    return report


def limit_threads(threads: int) -> None:
    """Bound the threads of this process: the environment for OpenMP/BLAS/ITK, torch and SimpleITK settings. On a
    busy machine fewer threads than cores is often faster (the registration ran 3.5x faster with 1 thread than with
    the default on a loaded 2-core machine, with the same result)."""
    threads = int(threads)
    if threads < 1:
        raise UsageError(f"--threads {threads}: expected 1 or more")
    for var in THREAD_ENV:
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only allowed before the first parallel work
            torch.set_num_interop_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None or 0: unchanged), restoring the previous number afterwards."""
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
