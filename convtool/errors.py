"""The one exception users catch."""

from __future__ import annotations


class ConvtoolError(ValueError):
    """Raised for anything the user can fix: bad shapes, bad flags, unreadable files.

    The message is one line that quotes what the user gave and says what would work.
    The CLI turns it into a line on stderr and exit code 2.
    """
