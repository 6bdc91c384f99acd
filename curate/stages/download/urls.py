"""What the downloader checks about a URL before and between hops, and how a fetch fails: a ``FetchError`` with the
row's machine-readable reason, whether a retry may help, and the server's Retry-After."""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from curate.core.stage import FAILED

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass
class FetchError(Exception):
    reason: str
    retryable: bool = False
    retry_after: float | None = None
    status: str = FAILED  # FILTERED for a publisher's opt-out


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def host_of(url: str | None) -> str:
    try:
        return (urlsplit(url).hostname or "") if url else ""
    except ValueError:
        return ""


def check_url(url: str | None) -> None:
    """Raise FetchError unless ``url`` is an http(s) URL with a host and a valid port."""
    if not url:
        raise FetchError("download:invalid_url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        raise FetchError("download:invalid_url") from None
    if parts.scheme and parts.scheme not in DEFAULT_PORTS and parts.netloc:
        raise FetchError("download:unsupported_scheme")
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise FetchError("download:invalid_url")
