"""Benchmarks run by ``lnstaging bench NAME``: each module here is one benchmark.

A benchmark module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> dict``; the dict is
printed as one JSON object (with --json) and holds wall times in seconds and peak memory in MB.
"""
