"""The ledger (one row per input row), the manifest (written last), and the invariant that ties them together."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from curate.core.atomic import AtomicFile, write_text_atomic

from curate.core.schema import LEDGER_SCHEMA
from curate.core.stage import FINAL_STATUSES, KEPT

MANIFEST = "manifest.json"
LEDGER = "ledger.parquet"
DECISION_TABLES = "decisions"  # OUT/decisions/NAME.parquet: what a global stage saw (curate.core.stage.GlobalStage.tables)


class ShardEntry(BaseModel):
    path: str = Field(description="relative to the output folder, e.g. shards/00000.tar (or .parquet)")
    index: str = Field(description="the shard's parquet index, relative to the output folder")
    samples: int
    bytes: int
    sha256: str


class StageStats(BaseModel):
    name: str
    rows_in: int
    rows_out: int
    wall_seconds: float = Field(description="summed over workers: busy time, not elapsed time")
    funnel: list[tuple[str, str]] = Field(default_factory=list, description="(reason domain, label) pairs: rows "
                                          "that got past the domain, e.g. ('download', 'downloaded')")
    columns: list[str] = Field(default_factory=list, description="the columns this stage stored or decided")


class Manifest(BaseModel):
    """manifest.json: the list of shards that exist. A shard not listed here does not exist."""

    format_version: int = 1
    pipeline: str
    created: str
    input_rows: int
    output_format: str = Field("webdataset", description="the shards' format (output.format)")
    shards: list[ShardEntry]
    embeddings: list[str] = []  # embeddings/ files (uid + vectors), when a stage stored embeddings
    totals_by_status: dict[str, int]
    totals_by_reason: dict[str, int]
    would_reject: dict[str, int] = Field(default_factory=dict, description="per filter reason: the rows that "
                                         "reached the decisions and that filter would reject on its own")
    stages: list[StageStats]
    elapsed_seconds: float
    config: dict[str, Any]
    versions: dict[str, str]


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(out: Path) -> Manifest | None:
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    return Manifest.model_validate_json(path.read_text())


class LedgerWriter:
    """Streams ledger rows into ledger.parquet (via a temporary file) and counts statuses and reasons."""

    def __init__(self, out: Path, decision_columns: dict[str, pa.DataType] | None = None) -> None:
        """``decision_columns``: the global stages' declared decision columns; those the ledger lacks follow its
        own columns."""
        self.path = out / LEDGER
        extra = [(n, t) for n, t in (decision_columns or {}).items() if n not in LEDGER_SCHEMA.names]
        self.schema = pa.schema([*LEDGER_SCHEMA, *extra])
        self._file = AtomicFile(self.path)
        self._writer = pq.ParquetWriter(self._file.handle, self.schema)
        self.by_status: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if "original_caption" in table.column_names:  # the ledger keeps the input's caption; the shard, the final
            original = pc.coalesce(table.column("original_caption"), table.column("caption"))
            table = table.set_column(table.column_names.index("caption"), "caption", original)
        for name in self.schema.names:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, self.schema.field(name).type))
        table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows
        self.by_status.update(table.column("status").to_pylist())
        self.by_reason.update(r for r in table.column("reason").to_pylist() if r)

    def close(self) -> None:
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        self._writer.close()
        self._file.discard()


def read_ledger(out: Path) -> pa.Table:
    return pq.read_table(Path(out) / LEDGER)


def check_run(out: Path, input_rows: int | None = None) -> list[str]:
    """Problems with a finished run's promise, empty when it holds:
    ledger rows = input rows, uids unique, statuses valid, kept rows = manifest samples = samples in the shards."""
    from curate.sinks.sink import sink

    out = Path(out)
    problems: list[str] = []
    manifest = read_manifest(out)
    if manifest is None:
        return [f"{out}: no {MANIFEST}: the run did not finish"]
    ledger = read_ledger(out)
    expected_rows = manifest.input_rows if input_rows is None else input_rows
    if ledger.num_rows != expected_rows:
        problems.append(f"ledger has {ledger.num_rows} rows, input has {expected_rows}")
    uids = ledger.column("uid").to_pylist()
    if len(set(uids)) != len(uids):
        problems.append(f"{len(uids) - len(set(uids))} duplicate uids in the ledger")
    statuses = Counter(ledger.column("status").to_pylist())
    if set(statuses) - set(FINAL_STATUSES):
        problems.append(f"unexpected statuses {sorted(set(statuses) - set(FINAL_STATUSES))}")
    for status, count in statuses.items():
        if manifest.totals_by_status.get(status, 0) != count:
            problems.append(f"manifest says {manifest.totals_by_status.get(status, 0)} {status}, ledger has {count}")
    kept = statuses.get(KEPT, 0)
    listed = sum(s.samples for s in manifest.shards)
    if listed != kept:
        problems.append(f"manifest lists {listed} samples, ledger keeps {kept}")
    keys_in_tars: list[str] = []
    shards = sink(manifest.output_format)
    for shard in manifest.shards:
        keys = set(shards.keys(out / shard.path))
        if len(keys) != shard.samples:
            problems.append(f"{shard.path}: {len(keys)} samples in the shard, manifest says {shard.samples}")
        keys_in_tars.extend(f"{shard.path}/{k}" for k in keys)
    kept_rows = ledger.filter(pc.equal(ledger.column("status"), KEPT))
    ledger_keys = [f"{s}/{k}" for s, k in zip(kept_rows.column("shard").to_pylist(), kept_rows.column("key").to_pylist())]
    if sorted(ledger_keys) != sorted(keys_in_tars):
        problems.append("the kept rows' (shard, key) in the ledger differ from the samples in the shards")
    return problems
