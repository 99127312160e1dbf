"""Errors about what the user gave, reported by ``blip-core`` as one line (exit status 2)."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad input: a missing or empty source, a wrong kind of file, an unknown file layout.

    The message says what is wrong and what to give instead; ``blip-core`` prints it as
    ``blip-core COMMAND: error: MESSAGE`` without a traceback.
    """
