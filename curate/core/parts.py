"""The store of per-sample results: ``parts/*.parquet``, written once per batch by the pipeline's last step.

A part file's name carries the first and last input row it holds and a digest of its uids, so a rerun can tell what
is done without reading images, and a retried task that writes the same batch writes the same file.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file

PARTS = "parts"
_NAME = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]{16})\.parquet$")


def part_files(out: Path) -> list[Path]:
    """Finished part files in input order (by first row)."""
    folder = Path(out) / PARTS
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def row_range(path: Path) -> tuple[int, int]:
    span = named_row_range(path.name)
    assert span, path
    return span


def named_row_range(name: str) -> tuple[int, int] | None:
    """The first and last row a part's file name says it holds (None for a file not named as parts are)."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def write_part(batch: pa.Table, folder: str) -> pa.Table:
    """Store one batch of finished rows; returns a one-row table with the count (all the driver needs to know)."""
    if batch.num_rows == 0:
        return batch_summary(batch)  # the same columns as any other part's summary
    rows = batch.column("row")
    uids = batch.column("uid").to_pylist()
    digest = hashlib.blake2b("\n".join(uids).encode(), digest_size=8).hexdigest()
    name = f"{pc.min(rows).as_py():012d}-{pc.max(rows).as_py():012d}-{digest}.parquet"
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        pq.write_table(batch, handle)
    return batch_summary(batch)


def batch_summary(batch: pa.Table) -> pa.Table:
    """One row: the batch's row count and each stage's busy seconds summed (for the progress line)."""
    summary = {"rows": [batch.num_rows]}
    for name in batch.column_names:
        if name.endswith("_seconds") and not name.startswith("fetch"):
            summary[name] = [float(pc.sum(batch.column(name)).as_py() or 0.0)]
    return pa.table(summary)


class PartIndex:
    """Part files by the row range in their names, to find the few that hold a given range without reading others."""

    def __init__(self, out: Path) -> None:
        self.files = part_files(out)
        self.ranges = [row_range(p) for p in self.files]
        self._firsts = [first for first, _ in self.ranges]
        # a batch may span rows far apart only rarely; the widest span bounds how far back to look
        self._widest = max((last - first for first, last in self.ranges), default=0)

    def overlapping(self, first: int, last: int) -> list[Path]:
        lo = bisect.bisect_left(self._firsts, first - self._widest)
        hi = bisect.bisect_right(self._firsts, last)
        return [self.files[i] for i in range(lo, hi) if self.ranges[i][1] >= first]

    def stored_rows(self, first: int, last: int) -> tuple[np.ndarray, int]:
        """(distinct stored rows in [first, last], how many stored rows there are in all, duplicates included)."""
        found = []
        for path in self.overlapping(first, last):
            rows = pq.read_table(path, columns=["row"]).column("row").to_numpy()
            found.append(rows[(rows >= first) & (rows <= last)])
        if not found:
            return np.empty(0, dtype=np.int64), 0
        every = np.concatenate(found)
        return np.unique(every), len(every)


def _rewrite_keeping(path: Path, table: pa.Table, keep: list[bool]) -> None:
    """Replace a part by the rows of ``table`` marked in ``keep``: the trimmed copy is written before the original
    is removed, so a kill in between leaves rows twice (fixed on the next run), never a lost row."""
    remaining = table.filter(pa.array(keep))
    if remaining.num_rows:
        write_part(remaining, str(path.parent))
    path.unlink()


def drop_duplicate_rows(out: Path, first: int, last: int) -> int:
    """Make every row in [first, last] stored once: the first part file (by name) keeps it. Returns rows dropped.

    Only needed when a retried task wrote the same rows under another batching; normally a no-op.
    """
    seen: set[int] = set()
    dropped = 0
    for path in PartIndex(out).overlapping(first, last):
        table = pq.read_table(path)
        rows = table.column("row").to_pylist()
        keep = [not (first <= r <= last) or r not in seen for r in rows]
        seen.update(r for r in rows if first <= r <= last)
        if all(keep):
            continue
        dropped += keep.count(False)
        _rewrite_keeping(path, table, keep)
    return dropped


def forget_rows(out: Path, forget: Callable[[str | None, str | None, str | None], bool]) -> int:
    """Remove stored rows for which ``forget(status, reason, decided_by)`` is true, so the next run processes them
    again. Returns rows forgotten."""
    forgotten = 0
    for path in part_files(out):
        meta = pq.read_table(path, columns=["status", "reason", "decided_by"]).to_pylist()
        drop = [forget(r["status"], r["reason"], r["decided_by"]) for r in meta]
        if not any(drop):
            continue
        _rewrite_keeping(path, pq.read_table(path), [not d for d in drop])
        forgotten += sum(drop)
    return forgotten
