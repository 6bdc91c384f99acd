"""The one exception type that reaches the user as a single line."""


class CurateError(Exception):
    """A problem the user can act on: bad config, missing input, unwritable output.

    The CLI prints ``str(error)`` on one line and exits non-zero; nothing else is printed.
    """
