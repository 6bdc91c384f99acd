"""The output seam: a sink writes the kept rows of one shard plan in its format, and the registry of formats.

The decide phase plans shards (which stored rows, in order, under which keys) without knowing the format; a
``Sink`` writes one plan to a temporary name and renames it, finds a shard an earlier run already wrote with exactly
that plan (a rerun skips it), and lists the sample keys a written shard holds (``check_run``). Adding a format is one
module with a ``Sink`` subclass and one line in ``SINKS``; ``output.format`` then selects it and the manifest names it.
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.ledger import ShardEntry
from curate.core.schema import is_embedding_column

SHARDS = "shards"
# output.format -> "module:class" of its sink (imported when a run writes or checks that format)
SINKS: dict[str, str] = {
    "webdataset": "curate.sinks.webdataset:WebDatasetSink",
    "parquet": "curate.sinks.parquet:ParquetSink",
}


@dataclass
class ShardPlan:
    """Which stored rows go into shard ``index``, in order, and their keys; ``suffix`` is the format's."""

    index: int
    suffix: str = ".tar"
    parts: list[tuple[str, list[int]]] = field(default_factory=list)  # part file → its `row` values, in order
    uids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{SHARDS}/{self.index:05d}{self.suffix}"

    @property
    def index_name(self) -> str:
        """The shard's parquet index (for a parquet shard, the shard itself)."""
        return f"{SHARDS}/{self.index:05d}.parquet"

    def following(self) -> ShardPlan:
        return ShardPlan(index=self.index + 1, suffix=self.suffix)


class Sink(ABC):
    format: ClassVar[str]
    suffix: ClassVar[str]  # of its shard files

    @abstractmethod
    def existing(self, out: Path, plan: ShardPlan) -> ShardEntry | None:
        """The manifest entry of a shard already written with exactly this plan's samples, else None."""

    @abstractmethod
    def write(self, out: Path, plan: ShardPlan) -> ShardEntry:
        """Write the plan's rows as one shard (temporary name, then renamed); its manifest entry."""

    @abstractmethod
    def keys(self, path: Path) -> list[str]:
        """The sample keys a written shard holds."""


def sink(name: str) -> Sink:
    if name not in SINKS:
        raise ValueError(f"unknown output.format '{name}'; known: {', '.join(SINKS)}")
    module, cls = SINKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def write_shard(format_name: str, out: str, plan: ShardPlan) -> ShardEntry:
    """One shard in a format: what the writer tasks run (a plain function, so Ray ships it by name)."""
    return sink(format_name).write(Path(out), plan)


def plan_rows(plan: ShardPlan) -> pa.Table:
    """The plan's stored rows (every column but the embeddings), in the plan's order."""
    tables = []
    for part, rows in plan.parts:
        columns = [c for c in pq.ParquetFile(part).schema_arrow.names if not is_embedding_column(c)]
        table = pq.read_table(part, columns=columns, filters=[("row", "in", rows)])  # only this shard's rows
        tables.append(table.take(pc.sort_indices(table.column("row"))))  # the plan's order: row order in the part
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.column("uid").to_pylist() != plan.uids:
        raise RuntimeError(f"{plan.path}: stored rows do not match the shard plan")
    return table


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_width(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def sample_key(shard: int, position: int, width: int) -> str:
    """img2dataset-style keys: shard number then position, digits only (no dots or slashes)."""
    return f"{shard:05d}{position:0{width}d}"
