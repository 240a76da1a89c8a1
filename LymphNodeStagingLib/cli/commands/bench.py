"""lnstaging bench NAME: speed and memory benchmarks that print JSON (one module per benchmark)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import time

from ... import __version__
from ... import benchmarks as benchmarks_pkg
from .. import options


def benchmark_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks_pkg.__path__) if not m.name.startswith("_"))



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory benchmarks (JSON output)",
                       description="Run a benchmark and print its wall times and peak memory.")
    bsub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in benchmark_names():
        module = importlib.import_module(f"{benchmarks_pkg.__name__}.{name}")
        bp = bsub.add_parser(name, help=getattr(module, "HELP", ""), description=getattr(module, "HELP", ""))
        module.add_arguments(bp)
        options.add_json(bp)
        bp.set_defaults(func=run, bench_module=module)


def run(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    result = args.bench_module.run(args)
    out = {
        "benchmark": args.benchmark,
        "version": __version__,
        "machine": {"python": platform.python_version(), "cpu_count": _cpu_count(), "platform": platform.platform()},
        **result,
        "total_wall_s": round(time.perf_counter() - t0, 3),
    }
    options.emit(out, args.json)
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
