"""A weighted semaphore: at most ``capacity`` units held at once across a worker's threads.

The download stage holds an image's decode cost (its peak allocation, in bytes) while it decodes and resizes, so 64
requests in flight cannot decode 64 large images at once: the worker's memory stays bounded by the budget, whatever
the input. One request larger than the whole budget is refused, never run alone: running it would break the bound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class OverBudget(Exception):
    """An amount that could never fit: more than the budget's whole capacity."""

    def __init__(self, amount: int, capacity: int) -> None:
        super().__init__(f"{amount} is more than the whole budget of {capacity}")
        self.amount = amount
        self.capacity = capacity


class Budget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0  # the most ever held at once (for tests and benchmarks)
        self._condition = threading.Condition()

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        """Wait until ``amount`` fits, hold it for the block. Raises OverBudget at once for an amount over capacity,
        which no wait would let fit."""
        amount = max(0, amount)
        if amount > self.capacity:
            raise OverBudget(amount, self.capacity)
        with self._condition:
            self._condition.wait_for(lambda: self.held + amount <= self.capacity)
            self.held += amount
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._condition:
                self.held -= amount
                self._condition.notify_all()
