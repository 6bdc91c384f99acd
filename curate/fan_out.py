"""Run one function over many parts of a global decision: as Ray tasks when the run is on Ray, else in this process.

Global stages decide over stored metadata in the driver, but their heavy inner loops (a pHash banding table, the
pairs inside a k-means cluster) are independent per part. Each part runs as one task; what every task reads (the
codes, the embeddings) is put in the object store once, so a node holds one shared copy and each task's own memory
is only its part's work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Part = TypeVar("Part")
Result = TypeVar("Result")


def on_ray() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; a trimmed install still decides locally
        return False
    return ray.is_initialized()


def fan_out(fn: Callable[[Any, Part], Result], shared: Any, parts: Sequence[Part],
            cpus_per_task: float = 1.0) -> list[Result]:
    """``[fn(shared, part) for part in parts]``, in order; on Ray each call is a task (retried if its worker dies)."""
    if not on_ray() or len(parts) <= 1:
        return [fn(shared, part) for part in parts]
    import ray

    remote = ray.remote(num_cpus=cpus_per_task, max_retries=3)(fn)
    shared_ref = ray.put(shared)  # top-level refs are resolved in the task: numpy arrays arrive zero-copy
    return ray.get([remote.remote(shared_ref, part) for part in parts])


def task_count(cap: int) -> int:
    """How many parts to cut work into: two per CPU of the cluster (so a slow part does not leave CPUs idle), at
    most ``cap``; one when not on Ray."""
    if not on_ray():
        return 1
    import ray

    return max(1, min(cap, 2 * int(ray.cluster_resources().get("CPU", 1))))
