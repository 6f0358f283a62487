"""The one exception users catch."""

from __future__ import annotations


class ConvtoolError(ValueError):
    """Raised for anything the user can fix: bad shapes, bad flags, unreadable files.

    The message is one line that quotes what the user gave and says what would work, in the
    library's own words: parameters as `max_memory=`, `sparse=True`, `to='lc'` or `` `layers` ``,
    never command-line flags. `params` names the parameters the message talks about, so a front end
    (the CLI's one error mapper) can say them in its own spelling (`--max-memory`, `--sparse`).

    Args:
        message: the one-line message.
        params: names of the parameters the message mentions or that the user should change.
    """

    def __init__(self, message: str, *, params: tuple[str, ...] | str = ()) -> None:
        super().__init__(message)
        self.params: tuple[str, ...] = (params,) if isinstance(params, str) else tuple(params)
