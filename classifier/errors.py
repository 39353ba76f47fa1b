"""The one error a user can fix: shown as a line, without a traceback."""

from __future__ import annotations


class StageError(RuntimeError):
    """A problem the user can fix (bad input, missing data, no network); shown without a traceback."""
