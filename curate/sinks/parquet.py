"""output.format parquet: each shard one parquet file holding the image bytes beside every stored column.

What Hugging Face ``datasets`` (``load_dataset("parquet", data_files="out/shards/*.parquet")``, then
``cast_column("image", Image())``), Daft, Polars and DuckDB read directly; ``curate train`` reads it as it reads tars.
Columns: ``key``, ``image`` (the downloaded bytes, as stored), ``image_ext``, ``caption`` and every other stored
column but the embeddings (those are under embeddings/, keyed by uid) and the per-stage timings (so that a rerun
writes byte-identical shards). Row groups of ``ROW_GROUP`` rows let readers
stream a shard. Written to a temporary name and renamed, so a shard file that exists is complete; its metadata names
the format, so a webdataset index of an earlier run under the same name is never taken for a shard.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file
from curate.core.ledger import ShardEntry
from curate.core.schema import is_timing_column
from curate.sinks.sink import SHARDS, ShardPlan, Sink, plan_rows, sha256_of

ROW_GROUP = 256
FIRST = ("key", "image", "image_ext", "caption")
FORMAT_KEY, FORMAT = b"curate_shard_format", b"parquet"


class ParquetSink(Sink):
    format = "parquet"
    suffix = ".parquet"

    def existing(self, out: Path, plan: ShardPlan) -> ShardEntry | None:
        path = out / plan.path
        if not path.exists():
            return None
        try:
            parquet = pq.ParquetFile(path)
            if (parquet.schema_arrow.metadata or {}).get(FORMAT_KEY) != FORMAT:
                return None
            uids = parquet.read(columns=["uid"]).column("uid").to_pylist()
        except (OSError, pa.ArrowInvalid):
            return None
        if uids != plan.uids:
            return None
        return ShardEntry(path=plan.path, index=plan.path, samples=len(uids), bytes=path.stat().st_size,
                          sha256=sha256_of(path))

    def write(self, out: Path, plan: ShardPlan) -> ShardEntry:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        table = plan_rows(plan).append_column("key", pa.array(plan.keys, pa.string()))
        table = table.drop_columns([c for c in table.column_names if is_timing_column(c)])  # rerun: same bytes
        order = [c for c in FIRST if c in table.column_names]
        table = table.select(order + [c for c in table.column_names if c not in order])
        table = table.replace_schema_metadata({FORMAT_KEY: FORMAT, b"samples": str(len(plan.keys)).encode()})
        path = out / plan.path
        with atomic_file(path) as handle:
            pq.write_table(table, handle, row_group_size=ROW_GROUP)
        return ShardEntry(path=plan.path, index=plan.path, samples=len(plan.keys), bytes=path.stat().st_size,
                          sha256=sha256_of(path))

    def keys(self, path: Path) -> list[str]:
        return sorted(pq.read_table(path, columns=["key"]).column("key").to_pylist())
