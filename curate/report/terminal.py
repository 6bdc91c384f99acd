"""Text from strangers (URLs, captions, metadata keys) made safe to print to a terminal.

A URL in a URL list may carry ESC, CR or OSC sequences that, printed raw, clear the screen, retitle the window, hide
the rest of the line or forge another. Every character Python does not call printable (controls, formatting marks
such as bidi overrides, unassigned code points) is shown as its escape instead; the rest, Unicode included, as is.
"""

from __future__ import annotations


def printable(text: object) -> str:
    value = "" if text is None else str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)
