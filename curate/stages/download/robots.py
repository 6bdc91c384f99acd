"""Publisher opt-outs the downloader obeys: the X-Robots-Tag response header and robots.txt.

Both are checked for our user-agent token. An opted-out row is ``filtered`` (the publisher's choice), not ``failed``.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.robotparser
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

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
    robots.txt is asked for again next time, so a passing outage does not block a host for the worker's life (threads
    that waited for that one fetch share its failure rather than each trying again in turn).

    An answer is kept ``ttl_seconds`` (RFC 9309 §2.4: at most 24 hours); least recently used origins go first beyond
    ``max_origins`` or ``max_bytes`` of robots.txt text (each entry weighs its body plus ENTRY_WEIGHT), since a worker
    meets far more origins than it needs to remember and a robots.txt may be 500 KiB.
    """

    ENTRY_WEIGHT = 1024  # bytes an entry weighs besides its body: a parser and its bookkeeping

    def __init__(
        self,
        fetch: Callable[[str], tuple[int, bytes]],
        token: str,
        *,
        ttl_seconds: float = 24 * 3600.0,
        max_origins: int = 2048,
        max_bytes: int = 8 * 2**20,
    ) -> None:
        self.fetch, self.token = fetch, token
        self.ttl_seconds, self.max_origins, self.max_bytes = ttl_seconds, max_origins, max_bytes
        # origin → (expires at, weight, rules), least recently used first
        self._rules: OrderedDict[str, tuple[float, int, urllib.robotparser.RobotFileParser]] = OrderedDict()
        self._weight = 0
        self._loading: dict[str, Future] = {}  # origin → the one fetch in progress for it
        self._guard = threading.Lock()

    def allowed(self, origin: str, url: str) -> bool:
        """Whether our token may fetch ``url`` on ``origin`` ("https://host:port"); raises RobotsUnavailable."""
        return self._rules_for(origin).can_fetch(self.token, url)

    def _rules_for(self, origin: str) -> urllib.robotparser.RobotFileParser:
        with self._guard:
            hit = self._rules.get(origin)
            if hit is not None and hit[0] > time.monotonic():
                self._rules.move_to_end(origin)
                return hit[2]
            loading = self._loading.get(origin)
            if loading is None:
                loading = self._loading[origin] = Future()
                owner = True
            else:
                owner = False
        if not owner:  # one fetch per origin; the other threads wait for its outcome
            try:
                return loading.result()
            except RobotsUnavailable as err:
                raise RobotsUnavailable(origin, err.reason) from None
        try:
            size, rules = self._load(origin)
        except BaseException as err:
            loading.set_exception(err)
            raise
        else:
            with self._guard:
                self._store(origin, size, rules)
            loading.set_result(rules)
        finally:
            with self._guard:
                del self._loading[origin]
        return rules

    def _store(self, origin: str, size: int, rules: urllib.robotparser.RobotFileParser) -> None:
        """Cache an answer and forget the least recently used beyond the bounds (call with the guard held)."""
        old = self._rules.pop(origin, None)
        if old is not None:
            self._weight -= old[1]
        weight = size + self.ENTRY_WEIGHT
        self._rules[origin] = (time.monotonic() + self.ttl_seconds, weight, rules)
        self._weight += weight
        while len(self._rules) > 1 and (len(self._rules) > self.max_origins or self._weight > self.max_bytes):
            _, (_, dropped, _) = self._rules.popitem(last=False)
            self._weight -= dropped

    def _load(self, origin: str) -> tuple[int, urllib.robotparser.RobotFileParser]:
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
        return len(body), parser
