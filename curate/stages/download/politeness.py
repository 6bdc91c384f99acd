"""Per-host limits for one download worker: at most N requests in flight to a host, at most R requests a second,
and a host that answered 429/503 with Retry-After is left alone until then by every thread of the worker.

Limits are per worker: on a cluster a host sees at most (workers × N) concurrent requests. A worker meets far more
hosts than it needs to remember: idle hosts are forgotten, least recently used first, beyond ``max_hosts``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class _Host:
    slots: threading.BoundedSemaphore
    next_start: float = 0.0  # no request starts before this (rate, Retry-After)
    users: int = 0  # threads holding or waiting for a slot: while any, the entry must stay the host's only one


class HostLimiter:
    def __init__(self, max_concurrent: int, max_per_second: float | None = None, max_hosts: int = 4096) -> None:
        self.max_concurrent = max_concurrent
        self.interval = 1.0 / max_per_second if max_per_second else 0.0
        self.max_hosts = max_hosts
        self._slots: OrderedDict[str, _Host] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of the host's concurrent slots, started no sooner than its rate and back-off allow."""
        with self._lock:
            state = self._entry(host)
            state.users += 1
        try:
            with state.slots:
                with self._lock:
                    now = time.monotonic()
                    start = max(now, state.next_start)
                    state.next_start = start + self.interval
                if start > now:
                    time.sleep(start - now)
                yield
        finally:
            with self._lock:
                state.users -= 1

    def back_off(self, host: str, seconds: float) -> None:
        """The host asked us to wait (Retry-After): no thread starts a request to it before then."""
        with self._lock:
            state = self._entry(host)
            state.next_start = max(state.next_start, time.monotonic() + seconds)

    def _entry(self, host: str) -> _Host:
        """The host's entry, made most recently used (call with the lock held)."""
        state = self._slots.get(host)
        if state is None:
            state = self._slots[host] = _Host(threading.BoundedSemaphore(self.max_concurrent))
            self._forget_idle()
        else:
            self._slots.move_to_end(host)
        return state

    def _forget_idle(self) -> None:
        """Drop least recently used hosts beyond max_hosts: never one in use (a new entry for it would start
        requests beside those in flight); one still held by its rate or Retry-After only when nothing else can go.
        In use are at most as many hosts as there are threads, so the map stays within max_hosts + threads."""
        now = time.monotonic()
        excess = len(self._slots) - self.max_hosts
        for spare_waiting in (True, False):
            if excess <= 0:
                return
            victims = []
            for host, state in self._slots.items():  # oldest first; usually the first one goes
                if len(victims) == excess:
                    break
                if state.users == 0 and not (spare_waiting and state.next_start > now):
                    victims.append(host)
            for host in victims:
                del self._slots[host]
            excess -= len(victims)
