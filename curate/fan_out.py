"""Run one function over many parts of a global decision: as Ray tasks when the run is on Ray, else in this process.

Global stages decide over stored metadata in the driver, but their heavy inner loops (a pHash banding table, the
pairs inside a k-means cluster) are independent per part. Each part runs as one task; what every task reads (the
distinct pHash codes) is put in the object store once, so a node holds one shared copy; what one part reads (a
row range, a group of clusters' vectors) travels with that part only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from curate.errors import CurateError

Part = TypeVar("Part")
Result = TypeVar("Result")


# Below this many rows a global decision runs in the driver: starting Ray and shipping data costs more than the
# work (benchmarks/dedup.py: 100k pHashes take 1.2 s in one process, 0.7 s as tasks on 2 cores).
MIN_ROWS = 100_000

# Off inside `in_process()`: a --local run, or a pool too small for tasks to pay for themselves, decides here even
# when Ray is up in this process.
_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("curate_fan_out", default=True)


@contextlib.contextmanager
def in_process(when: bool = True) -> Iterator[None]:
    token = _allowed.set(not when and _allowed.get())
    try:
        yield
    finally:
        _allowed.reset(token)


def on_ray() -> bool:
    if not _allowed.get():
        return False
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; a trimmed install still decides locally
        return False
    return ray.is_initialized()


def ships(parts: int) -> bool:
    """Whether fan_out runs this many parts as Ray tasks (else in this process, where nothing needs copying)."""
    return parts > 1 and on_ray()


def fan_out(fn: Callable[[Any, Part], Result], shared: Any, parts: Sequence[Part],
            cpus_per_task: float = 1.0) -> list[Result]:
    """``[fn(shared, part) for part in parts]``, in order; on Ray each call is a task (retried if its worker dies).

    ``shared`` is put in the object store once and read by every task: keep it to what every task needs, and pass
    what only one part needs inside that part (each part's arguments go only to its task's node)."""
    if not ships(len(parts)):
        return [fn(shared, part) for part in parts]
    import ray

    remote = ray.remote(num_cpus=cpus_per_task, max_retries=3)(fn)
    shared_ref = ray.put(shared)  # top-level refs are resolved in the task: numpy arrays arrive zero-copy
    try:
        return ray.get([remote.remote(shared_ref, part) for part in parts])
    except ray.exceptions.RayError as err:  # a task that failed its retries (out of memory, a node lost for good)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CurateError(f"{getattr(fn, '__name__', 'a task')} failed on Ray: {first}") from None


def task_count(cap: int) -> int:
    """How many parts to cut work into: two per CPU of the cluster (so a slow part does not leave CPUs idle), at
    most ``cap``; one when not on Ray."""
    if not on_ray():
        return 1
    import ray

    return max(1, min(cap, 2 * int(ray.cluster_resources().get("CPU", 1))))
