"""The store of per-sample results: ``parts/*.parquet``, written once per batch by the pipeline's last step.

A part file's name carries the first and last input row it holds and a digest of its uids, so a rerun can tell what
is done without reading images, and a retried task that writes the same batch writes the same file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PARTS = "parts"
_NAME = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]{16})\.parquet$")


def part_files(out: Path) -> list[Path]:
    """Finished part files in input order (by first row)."""
    folder = Path(out) / PARTS
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def row_range(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    assert match, path
    return int(match.group(1)), int(match.group(2))


def write_part(batch: pa.Table, folder: str) -> pa.Table:
    """Store one batch of finished rows; returns the batch without image bytes (what the driver needs)."""
    if batch.num_rows == 0:
        return batch.drop_columns([c for c in ("image",) if c in batch.column_names])
    rows = batch.column("row")
    uids = batch.column("uid").to_pylist()
    digest = hashlib.blake2b("\n".join(uids).encode(), digest_size=8).hexdigest()
    name = f"{pc.min(rows).as_py():012d}-{pc.max(rows).as_py():012d}-{digest}.parquet"
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    pq.write_table(batch, tmp)
    os.replace(tmp, path)
    return batch.drop_columns([c for c in ("image",) if c in batch.column_names])


def done_rows_by_chunk(out: Path, rows_per_chunk: int) -> dict[int, int]:
    """How many stored rows each input chunk has (reads only the `row` column)."""
    counts: dict[int, int] = defaultdict(int)
    for path in part_files(out):
        rows = pq.read_table(path, columns=["row"]).column("row")
        chunks = pc.divide(rows, pa.scalar(rows_per_chunk, pa.int64()))
        for item in pc.value_counts(chunks).to_pylist():
            counts[int(item["values"])] += int(item["counts"])
    return dict(counts)


def _parts_overlapping(out: Path, first: int, last: int) -> list[Path]:
    return [p for p in part_files(out) if row_range(p)[0] <= last and row_range(p)[1] >= first]


def done_uids(out: Path, first: int, last: int) -> set[str]:
    """uids of stored rows with first <= row <= last (one chunk's worth)."""
    found: set[str] = set()
    for path in _parts_overlapping(out, first, last):
        table = pq.read_table(path, columns=["uid", "row"])
        mask = pc.and_(pc.greater_equal(table.column("row"), first), pc.less_equal(table.column("row"), last))
        found.update(table.filter(mask).column("uid").to_pylist())
    return found


def drop_duplicate_rows(out: Path, first: int, last: int) -> int:
    """Make every row in [first, last] stored once: the first part file (by name) keeps it. Returns rows dropped.

    Only needed when a retried task wrote the same rows under another batching; normally a no-op.
    """
    seen: set[int] = set()
    dropped = 0
    for path in _parts_overlapping(out, first, last):
        table = pq.read_table(path)
        rows = table.column("row").to_pylist()
        keep = [r not in seen or not (first <= r <= last) for r in rows]
        seen.update(r for r in rows if first <= r <= last)
        if all(keep):
            continue
        dropped += keep.count(False)
        remaining = table.filter(pa.array(keep))
        path.unlink()
        if remaining.num_rows:
            write_part(remaining, str(path.parent))
    return dropped
