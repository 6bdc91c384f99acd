"""Publisher opt-outs the downloader obeys: the X-Robots-Tag response header and robots.txt.

Both are checked for our user-agent token. An opted-out row is ``filtered`` (the publisher's choice), not ``failed``.
"""

from __future__ import annotations

import re
import threading
import urllib.robotparser
from collections.abc import Callable

# Directives that mean "do not use this for AI / do not index this image"; "none" is noindex + nofollow.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
# Directives that carry their own "name: value" form, so their prefix is not a user agent.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_SCOPED = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*:\s*(.*)$")


def x_robots_opts_out(header_values: list[str], token: str) -> bool:
    """True when an X-Robots-Tag value, unscoped or scoped to ``token``, carries an opt-out directive."""
    token = token.lower()
    for value in header_values:
        scope = None
        match = _SCOPED.match(value)
        if match and match.group(1).lower() not in _VALUED_DIRECTIVES:
            scope, value = match.group(1).lower(), match.group(2)
        if scope not in (None, token, "*"):
            continue
        directives = {d.strip().lower() for d in value.split(",")}
        if directives & OPT_OUT_DIRECTIVES:
            return True
    return False


class RobotsUnavailable(Exception):
    """robots.txt answered 5xx or could not be fetched: RFC 9309 says assume everything is disallowed, for now.

    ``reason`` is why (the fetch's own failure reason, e.g. download:connection_error), or None for a 5xx."""

    def __init__(self, origin: str, reason: str | None = None) -> None:
        super().__init__(origin)
        self.reason = reason


class RobotsCache:
    """robots.txt fetched once per origin (scheme, host, port) per worker, shared by its threads.

    ``fetch(url)`` returns (HTTP status, body); it raises for network failures. 4xx means no rules (allow all),
    5xx and network failures mean unavailable, as RFC 9309 prescribes. Only answers are cached: an unavailable
    robots.txt is asked for again next time, so a passing outage does not block a host for the worker's life.
    """

    def __init__(self, fetch: Callable[[str], tuple[int, bytes]], token: str) -> None:
        self.fetch, self.token = fetch, token
        self._rules: dict[str, urllib.robotparser.RobotFileParser] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def allowed(self, origin: str, url: str) -> bool:
        """Whether our token may fetch ``url`` on ``origin`` ("https://host:port"); raises RobotsUnavailable."""
        with self._guard:
            lock = self._locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per origin; the other threads wait for its answer
            rules = self._rules.get(origin)
            if rules is None:
                rules = self._rules[origin] = self._load(origin)
        return rules.can_fetch(self.token, url)

    def _load(self, origin: str) -> urllib.robotparser.RobotFileParser:
        try:
            status, body = self.fetch(f"{origin}/robots.txt")
        except Exception as err:  # timeouts, refused connections, DNS: unavailable
            raise RobotsUnavailable(origin, getattr(err, "reason", None)) from None
        parser = urllib.robotparser.RobotFileParser()
        if 400 <= status < 500:
            parser.parse([])  # no robots.txt: everything allowed
        elif status == 200:
            parser.parse(body.decode("utf-8", "replace").splitlines())
        else:
            raise RobotsUnavailable(origin)
        return parser
