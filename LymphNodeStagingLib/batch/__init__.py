"""Resumable cohort runs: steps, the per-case cache, local and Dask executors, the cohort report."""
