"""The live rows of a run's stored parts, as a global stage reads them: a group of parts at a time, never all at once.

A piece is one stored part file (in tests and benchmarks, an in-memory table). Reading a piece gives its live rows,
status ``ok`` and not removed by an earlier global stage, with the columns asked for plus ``row`` (the input position:
the id a decision is keyed by while it is made) and ``uid``. ``map`` and ``shuffle`` run work over groups of pieces,
as Ray tasks when the run is on Ray (curate.core.fan_out), so a dedup tier reads the pool in its tasks and the driver
receives pairs of rows. ``lookup`` fetches the columns of a few rows by id (the members of duplicate groups, for the
keep policy). ``gather`` is the one call that brings every live row into the driver, for decisions that need a whole
column at once (quantile thresholds, rules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import fan_out
from curate.core.parts import named_row_range
from curate.core.stage import OK

Piece = Union[str, pa.Table]
Result = TypeVar("Result")

# Rows one map task reads (a group of parts), at most: its memory is these rows' columns and what it makes of them.
ROWS_PER_TASK = 200_000
# A shuffle's map task also stays under about this much memory, taken as 8× what it emits a row (the rows read, the
# working copies, the pieces): 64k rows of 512-d float16 embeddings, the pHash tier's 200k rows well under it.
MAP_TASK_BYTES = 512 << 20
# A map task's output per reduce task: Ray keeps objects under 100 KB in their owner's memory (the driver), so a map
# task reads enough rows for its pieces to stay in the object store of its own node.
MIN_PIECE_BYTES = 256 << 10


def ids_in(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``rows`` are in the sorted array ``ids``: only the slice of ``ids`` within ``rows``' range is
    searched, so a task over one group of parts pays for its own share of ``ids``, not for all of them."""
    if not len(rows) or not len(ids):
        return np.zeros(len(rows), dtype=bool)
    window = ids[np.searchsorted(ids, rows.min(), "left"):np.searchsorted(ids, rows.max(), "right")]
    if not len(window):
        return np.zeros(len(rows), dtype=bool)
    at = np.minimum(np.searchsorted(window, rows), len(window) - 1)
    return window[at] == rows


def read_live(piece: Piece, columns: Sequence[str], removed: np.ndarray) -> pa.Table:
    """A piece's live rows with ``row``, ``uid`` and ``columns`` (a column the piece lacks comes back as nulls)."""
    wanted = list(dict.fromkeys(["row", "uid", *columns]))
    if isinstance(piece, pa.Table):
        table = piece
    else:
        stored = pq.ParquetFile(piece).schema_arrow.names
        table = pq.read_table(piece, columns=[c for c in [*wanted, "status"] if c in stored])
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), OK))
    if len(removed):
        table = table.filter(pa.array(~ids_in(table.column("row").to_numpy(), removed)))
    for name in wanted:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(wanted)


@dataclass(frozen=True)
class PoolJob:
    """What a map or reduce task over the pool needs: which rows are gone, the columns to read, the stage's
    functions and the data they share (sent once to every task)."""

    removed: np.ndarray
    columns: list[str]
    map_fn: Callable[[Any, pa.Table], Any]
    reduce_fn: Callable[[Any, int, list[Any]], Any] | None
    shared: Any

    def read(self, group: list[Piece]) -> pa.Table:
        tables = [read_live(piece, self.columns, self.removed) for piece in group]
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _map_task(job: PoolJob, group: list[Piece]) -> Any:
    return job.map_fn(job.shared, job.read(group))


def _reduce_task(job: PoolJob, partition: int, pieces: list[Any]) -> Any:
    assert job.reduce_fn is not None
    return job.reduce_fn(job.shared, partition, pieces)


def _rows_of(wanted: np.ndarray, table: pa.Table) -> pa.Table:
    return table.filter(pa.array(ids_in(table.column("row").to_numpy(), wanted)))


@dataclass(frozen=True)
class Pool:
    pieces: tuple[Piece, ...]
    sizes: tuple[int, ...]  # stored rows per piece (live or not)
    stored: frozenset[str]  # the columns any piece stores
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted rows removed earlier
    common: frozenset[str] | None = None  # the columns every piece stores (None: all of ``stored``)

    @classmethod
    def from_parts(cls, paths: Sequence[Path]) -> Pool:
        """Only the parts' footers are read (row counts, column names), one file open at a time."""
        sizes, stored, common = [], set(), None
        for path in paths:
            metadata = pq.read_metadata(path)
            sizes.append(metadata.num_rows)
            names = set(metadata.schema.to_arrow_schema().names)
            stored.update(names)
            common = names if common is None else common & names
        return cls(tuple(str(p) for p in paths), tuple(sizes), frozenset(stored), common=frozenset(common or ()))

    @classmethod
    def from_table(cls, table: pa.Table, pieces: int = 1) -> Pool:
        """An in-memory pool (tests, benchmarks, a stage's ``decide`` on a table): rows without a ``row`` column
        are numbered by position."""
        if "row" not in table.column_names:
            table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        bounds = np.linspace(0, table.num_rows, max(1, pieces) + 1).astype(int)
        chunks = tuple(table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]))
        return cls(chunks, tuple(c.num_rows for c in chunks), frozenset(table.column_names))

    @property
    def rows(self) -> int:
        """Stored rows not removed by an earlier stage: an upper bound of the live rows (failed rows count)."""
        return sum(self.sizes) - len(self.removed)

    def has(self, column: str) -> bool:
        return column in self.stored

    def has_everywhere(self, column: str) -> bool:
        """Every piece stores ``column`` (parts written before a stage gained it, kept on resume, do not)."""
        return column in (self.stored if self.common is None else self.common)

    def partitions(self, work: float, per_task: float) -> int:
        """Reduce tasks for a shuffle: ``per_task`` of ``work`` each at most, and two per CPU at least."""
        return max(fan_out.task_count(len(self.pieces) * 4), ceil(work / per_task))

    def without(self, rows: np.ndarray) -> Pool:
        removed = np.union1d(self.removed, np.asarray(rows, dtype=np.int64))
        return Pool(self.pieces, self.sizes, self.stored, removed, self.common)

    def groups(self, min_rows: int = 1, max_rows: int | None = None) -> list[list[Piece]]:
        """Pieces cut into task inputs of at most ``max_rows`` (default ROWS_PER_TASK) rows (a piece is never
        split), and into at least two per CPU when the pool is big enough for that; but of ``min_rows`` at least."""
        cap = ROWS_PER_TASK if max_rows is None else max_rows
        target = min(cap, max(1, ceil(sum(self.sizes) / fan_out.task_count(len(self.pieces)))))
        target = max(target, min_rows)
        groups: list[list[Piece]] = [[]]
        rows = 0
        for piece, size in zip(self.pieces, self.sizes):
            if groups[-1] and rows + size > target:
                groups.append([])
                rows = 0
            groups[-1].append(piece)
            rows += size
        return groups if groups[0] else []

    def map(self, fn: Callable[[Any, pa.Table], Result], shared: Any, columns: Sequence[str]) -> list[Result]:
        """``fn(shared, live rows of a group)`` for each group of pieces, in order."""
        return fan_out.fan_out(_map_task, PoolJob(self.removed, list(columns), fn, None, shared), self.groups())

    def shuffle(self, map_fn: Callable[[Any, pa.Table], list[Any]], reduce_fn: Callable[[Any, int, list[Any]], Result],
                shared: Any, columns: Sequence[str], partitions: int, bytes_per_row: float) -> list[Result]:
        """``map_fn`` cuts each group's live rows into ``partitions`` pieces; ``reduce_fn(shared, j, pieces)`` gets
        piece ``j`` of every group (curate.core.fan_out.shuffle).

        ``bytes_per_row``, what a map task emits per row it reads, sizes the groups: a piece under MIN_PIECE_BYTES
        would be inlined by Ray into the driver, so a group holds ``partitions × MIN_PIECE_BYTES / bytes_per_row``
        rows at least, even past MAP_TASK_BYTES on very large pools (the partitions grow with the pool); such map
        tasks ask Ray for the memory they need, so a node runs fewer of them at once."""
        per_row = max(1.0, bytes_per_row)
        groups = self.groups(min_rows=ceil(partitions * MIN_PIECE_BYTES / per_row),
                             max_rows=min(ROWS_PER_TASK, int(MAP_TASK_BYTES // (8 * per_row))))
        if not groups:
            return []
        bounds = np.cumsum([0, *(len(group) for group in groups)])  # groups cut the pieces in order
        largest = max(sum(self.sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        memory = int(8 * per_row * largest) if 8 * per_row * largest > MAP_TASK_BYTES else None
        job = PoolJob(self.removed, list(columns), map_fn, reduce_fn, shared)
        return fan_out.shuffle(_map_task, _reduce_task, job, groups, partitions, map_memory=memory)

    def lookup(self, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """The live rows among ``rows`` with ``columns``, sorted by row. Only the parts whose names say they hold
        one of ``rows`` are read."""
        wanted = np.unique(np.asarray(rows, dtype=np.int64))
        found = self.holding(wanted).map(_rows_of, wanted, columns) if len(wanted) else []
        table = pa.concat_tables(found, promote_options="permissive") if found else \
            read_live(pa.table({"row": pa.array([], pa.int64())}), columns, self.removed)
        return table.take(pc.sort_indices(table.column("row")))

    def holding(self, rows: np.ndarray) -> Pool:
        """This pool narrowed to the pieces that may hold one of the sorted ``rows`` (in-memory pieces always)."""
        keep = []
        for piece in self.pieces:
            span = None if isinstance(piece, pa.Table) else named_row_range(Path(piece).name)
            keep.append(span is None or
                        np.searchsorted(rows, span[0], "left") < np.searchsorted(rows, span[1], "right"))
        return Pool(tuple(p for p, k in zip(self.pieces, keep) if k), tuple(s for s, k in zip(self.sizes, keep) if k),
                    self.stored, self.removed, self.common)

    def gather(self, columns: Sequence[str]) -> pa.Table:
        """Every live row with these columns, in this process."""
        tables = [read_live(piece, columns, self.removed) for piece in self.pieces]
        if not tables:
            return read_live(pa.table({"row": pa.array([], pa.int64())}), columns, self.removed)
        return pa.concat_tables(tables, promote_options="permissive")
