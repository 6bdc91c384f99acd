"""output.format webdataset (the default): tar shards of kept samples, each with a parquet index beside it.

A shard is written to a temporary name and renamed; its index is written after it, with the tar's size and sha256 in
the parquet metadata, so an index that exists vouches for a complete tar and a rerun can skip the shard. Members of
a sample are written together, sorted by extension, with a fixed mtime (curate.sinks.tars): rerun tars are
byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file
from curate.core.ledger import ShardEntry
from curate.core.schema import NOT_IN_SAMPLE_JSON, is_timing_column
from curate.sinks.sink import SHARDS, ShardPlan, Sink, plan_rows, sha256_of
from curate.sinks.tars import add_member


class _Hashing:
    """A write-only file that hashes and counts what passes through it (the tar is hashed as it is written)."""

    def __init__(self, handle, digest) -> None:
        self.handle, self.digest, self.size = handle, digest, 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def __enter__(self) -> "_Hashing":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, bytes):  # small binary fingerprints (color_signature) as hex
        return value.hex()
    return value


class WebDatasetSink(Sink):
    format = "webdataset"
    suffix = ".tar"

    def existing(self, out: Path, plan: ShardPlan) -> ShardEntry | None:
        index_path, tar_path = out / plan.index_name, out / plan.path
        if not index_path.exists() or not tar_path.exists():
            return None
        try:
            parquet = pq.ParquetFile(index_path)
            meta = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
            uids = parquet.read(columns=["uid"]).column("uid").to_pylist()
        except (OSError, pa.ArrowInvalid):
            return None
        if uids != plan.uids or int(meta.get("tar_bytes", -1)) != tar_path.stat().st_size:
            return None
        if sha256_of(tar_path) != meta.get("tar_sha256"):  # same size, other bytes: damaged or replaced since
            return None
        return ShardEntry(path=plan.path, index=plan.index_name, samples=len(uids), bytes=int(meta["tar_bytes"]),
                          sha256=meta["tar_sha256"])

    def write(self, out: Path, plan: ShardPlan) -> ShardEntry:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        table = plan_rows(plan)
        json_columns = [c for c in table.column_names if c not in NOT_IN_SAMPLE_JSON and not is_timing_column(c)]
        digest = hashlib.sha256()
        with atomic_file(out / plan.path) as handle, _Hashing(handle, digest) as hashed, \
                tarfile.open(fileobj=hashed, mode="w|") as tar:
            synthetic = (table.column("synthetic_caption").to_pylist() if "synthetic_caption" in table.column_names
                         else [None] * table.num_rows)
            for key, meta, image, ext, caption, syn in zip(
                    plan.keys, table.select(json_columns).to_pylist(), table.column("image").to_pylist(),
                    table.column("image_ext").to_pylist(), table.column("caption").to_pylist(), synthetic):
                meta = {name: _json_value(value) for name, value in meta.items()}
                meta["key"] = key
                members = {
                    ext: image,
                    "txt": (caption or "").encode("utf-8"),
                    "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                }
                if syn and syn != caption:  # both captions kept: the synthetic one beside the raw (caption mode add)
                    members["syn.txt"] = syn.encode("utf-8")
                for member in sorted(members):
                    add_member(tar, f"{key}.{member}", members[member])
        index = table.drop_columns(["image"]).append_column("key", pa.array(plan.keys, pa.string()))
        index = index.replace_schema_metadata(
            {"tar_sha256": digest.hexdigest(), "tar_bytes": str(hashed.size), "samples": str(len(plan.keys))})
        with atomic_file(out / plan.index_name) as handle:
            pq.write_table(index, handle)
        return ShardEntry(path=plan.path, index=plan.index_name, samples=len(plan.keys), bytes=hashed.size,
                          sha256=digest.hexdigest())

    def keys(self, path: Path) -> list[str]:
        with tarfile.open(path) as tar:
            return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
