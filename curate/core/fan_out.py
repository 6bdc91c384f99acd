"""Run the work of a global decision over many parts: as Ray tasks when the run is on Ray, else in this process.

``fan_out`` maps one function over parts (a group of stored part files, a group of eval images). ``shuffle`` is a
map-reduce: each map task cuts what it read into ``partitions`` pieces by a key (a pHash band, a k-means cluster,
a digest), and reduce task ``j`` gets piece ``j`` of every map task, so rows that may be duplicates meet in one task
while no task, and not the driver, holds the whole pool. What every task reads (centroids, banding tables) is put
in the object store once; what one part reads travels with that part only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from curate.errors import CurateError

Part = TypeVar("Part")
Result = TypeVar("Result")


# Below this many rows a global decision runs in the driver's process: starting Ray and shipping data costs more
# than the work (benchmarks/dedup.py: 10k pHashes take 0.5 s in one process, 0.8 s as tasks on 2 cores; 100k about
# the same either way).
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
            cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> list[Result]:
    """``[fn(shared, part) for part in parts]``, in order; on Ray each call is a task (retried if its worker dies).

    ``shared`` is put in the object store once and read by every task: keep it to what every task needs, and pass
    what only one part needs inside that part (each part's arguments go only to its task's node)."""
    if not ships(len(parts)):
        return [fn(shared, part) for part in parts]
    import ray

    remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task or None, max_retries=3)(fn)
    shared_ref = ray.put(shared)  # top-level refs are resolved in the task: numpy arrays arrive zero-copy
    try:
        return ray.get([remote.remote(shared_ref, part) for part in parts])
    except ray.exceptions.RayError as err:
        raise _failed(fn, err) from None


def _map(fn: Callable[[Any, Part], list[Any]], shared: Any, part: Part, partitions: int) -> Any:
    """A map task: with one partition Ray stores the return value whole, so return the one piece itself."""
    pieces = fn(shared, part)
    return pieces if partitions > 1 else pieces[0]


def _reduce(fn: Callable[[Any, int, list[Any]], Result], shared: Any, partition: int, *pieces: Any) -> Result:
    """A reduce task: Ray resolves the map outputs only when they are top-level arguments, hence the unpacking."""
    return fn(shared, partition, list(pieces))


def shuffle(map_fn: Callable[[Any, Part], list[Any]], reduce_fn: Callable[[Any, int, list[Any]], Result],
            shared: Any, parts: Sequence[Part], partitions: int, cpus_per_task: float = 1.0,
            map_memory: int | None = None) -> list[Result]:
    """``reduce_fn(shared, j, [map_fn(shared, part)[j] for part in parts])`` for each partition ``j``.

    ``map_fn`` returns exactly ``partitions`` pieces. On Ray each map and each reduce is a task (retried if its
    worker dies); a map output stays in the object store of the node that made it and is freed once its reduce task
    has run. Ray inlines objects under 100 KB into their owner, the driver: callers size map tasks so that a piece
    is bigger than that (curate.core.pool.Pool.shuffle). ``map_memory`` (bytes) is reserved for each map task when
    given. In one process the maps run first, then the reduces."""
    if not ships(max(len(parts), partitions)):
        pieces = [map_fn(shared, part) for part in parts]
        return [reduce_fn(shared, j, [p[j] for p in pieces]) for j in range(partitions)]
    import ray

    mapper = ray.remote(num_cpus=cpus_per_task, max_retries=3, num_returns=partitions)(_map)
    if map_memory:
        mapper = mapper.options(memory=map_memory)
    reducer = ray.remote(num_cpus=cpus_per_task, max_retries=3)(_reduce)
    shared_ref = ray.put(shared)
    try:
        outputs = [mapper.remote(map_fn, shared_ref, part, partitions) for part in parts]
        outputs = [refs if partitions > 1 else [refs] for refs in outputs]
        results = [reducer.remote(reduce_fn, shared_ref, j, *(refs[j] for refs in outputs))
                   for j in range(partitions)]
        del outputs  # the driver's references: each map output is freed when the reduce task that reads it is done
        return ray.get(results)
    except ray.exceptions.RayError as err:
        raise _failed(map_fn, err) from None


def _failed(fn: Callable, err: Exception) -> CurateError:
    """A task that failed its retries (out of memory, a node lost for good) as one line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CurateError(f"{getattr(fn, '__name__', 'a task')} failed on Ray: {first}")


def task_count(cap: int) -> int:
    """How many parts to cut work into: two per CPU of the cluster (so a slow part does not leave CPUs idle), at
    most ``cap``; one when not on Ray."""
    if not on_ray():
        return 1
    import ray

    return max(1, min(cap, 2 * int(ray.cluster_resources().get("CPU", 1))))
