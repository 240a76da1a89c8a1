"""Exceptions raised for bad input. Every message names the file, tag or parameter and what was expected."""

from __future__ import annotations


class LNSError(Exception):
    """Base class of all errors the library raises for bad input or unusable data."""


class StationNameError(LNSError, ValueError):
    """A lymph node station name that is not in the catalogue."""


class RuleSetError(LNSError, ValueError):
    """An unknown or malformed N-staging rule set, or an invalid tumour side."""


class CohortError(LNSError, ValueError):
    """A cohort table that cannot be read at all (validation problems are reported, not raised)."""
