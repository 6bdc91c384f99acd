"""Per-host limits for one download worker: at most N requests in flight to a host, at most R requests a second,
and a host that answered 429/503 with Retry-After is left alone until then by every thread of the worker.

Limits are per worker: on a cluster a host sees at most (workers × N) concurrent requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class HostLimiter:
    def __init__(self, max_concurrent: int, max_per_second: float | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.interval = 1.0 / max_per_second if max_per_second else 0.0
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._next_start: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of the host's concurrent slots, started no sooner than its rate and back-off allow."""
        with self._lock:
            semaphore = self._slots.setdefault(host, threading.BoundedSemaphore(self.max_concurrent))
        with semaphore:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start.get(host, now))
                self._next_start[host] = start + self.interval
            if start > now:
                time.sleep(start - now)
            yield

    def back_off(self, host: str, seconds: float) -> None:
        """The host asked us to wait (Retry-After): no thread starts a request to it before then."""
        with self._lock:
            until = time.monotonic() + seconds
            self._next_start[host] = max(self._next_start.get(host, 0.0), until)
