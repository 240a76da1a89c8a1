"""The errors a caller can act on. Every message names the file, tag or parameter and what was expected.

=====================  ============================================================  ==================
class                  raised for                                                    ``lnstaging`` exit
=====================  ============================================================  ==================
``InputError``         data that cannot be used: an image, DICOM series, table,      1
                       atlas set or label map that is unreadable, inconsistent or
                       outside what the method supports
``ModelError``         a model checkpoint that is missing, corrupt, tampered with    1
                       or of another kind (an ``InputError``)
``UsageError``         an option or parameter value outside what it accepts          2
                       (unknown rule set, threshold outside 0..1, unknown device)
``ProcessingError``    work that failed: a TotalSegmentator run, a child process     1
``Cancelled``          the caller asked to stop                                      130
=====================  ============================================================  ==================

All derive from ``LNSError``; ``InputError``, ``ModelError`` and ``UsageError`` are also ``ValueError``\\ s.
"""

from __future__ import annotations


class LNSError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(LNSError, ValueError):
    """Input data that cannot be used; the message names the file (and the tag or column) and what was expected."""


class ModelError(InputError):
    """A model checkpoint that cannot be used (missing, unreadable, tampered with, wrong kind or version)."""


class UsageError(LNSError, ValueError):
    """An option or parameter value outside what it accepts; the message names the parameter."""


class ProcessingError(LNSError, RuntimeError):
    """A step that failed while running (an external program, a child process), not because of its input."""


class Cancelled(LNSError):
    """The caller asked the work to stop."""
