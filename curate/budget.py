"""A weighted semaphore: at most ``capacity`` units held at once across a worker's threads.

The download stage holds an image's decoded size (pixels × 4 bytes) while it decodes and resizes, so 64 requests in
flight cannot decode 64 large images at once: the worker's memory stays bounded by the budget, whatever the input.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Budget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0  # the most ever held at once (for tests and benchmarks)
        self._condition = threading.Condition()

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        """Wait until ``amount`` fits, hold it for the block. A single amount over capacity waits for an empty
        budget and then runs alone, so it can never deadlock."""
        amount = max(0, amount)
        with self._condition:
            self._condition.wait_for(lambda: self.held == 0 or self.held + amount <= self.capacity)
            self.held += amount
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._condition:
                self.held -= amount
                self._condition.notify_all()
