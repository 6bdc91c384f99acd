"""The writer: WebDataset shards of kept samples, each with a parquet index beside it.

A shard is written to a temporary name and renamed; its index is written after it, with the tar's size and sha256 in
the parquet metadata, so an index that exists vouches for a complete tar and a rerun can skip the shard.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file
from curate.core.ledger import ShardEntry
from curate.core.schema import NOT_IN_SAMPLE_JSON, is_embedding_column, is_timing_column
from curate.sinks.tars import add_member

SHARDS = "shards"


@dataclass
class ShardPlan:
    """Which stored rows go into shard ``index``, in order, and their keys."""

    index: int
    parts: list[tuple[str, list[int]]] = field(default_factory=list)  # part file → its `row` values, in order
    uids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def tar_name(self) -> str:
        return f"{SHARDS}/{self.index:05d}.tar"

    @property
    def index_name(self) -> str:
        return f"{SHARDS}/{self.index:05d}.parquet"


def key_width(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def sample_key(shard: int, position: int, width: int) -> str:
    """img2dataset-style keys: shard number then position, digits only (no dots or slashes)."""
    return f"{shard:05d}{position:0{width}d}"


def existing_shard(out: Path, plan: ShardPlan) -> ShardEntry | None:
    """The manifest entry of a shard already written with exactly this plan's samples, else None."""
    index_path = out / plan.index_name
    tar_path = out / plan.tar_name
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
    if _sha256_of(tar_path) != meta.get("tar_sha256"):  # same size, other bytes: damaged or replaced since
        return None
    return ShardEntry(
        path=plan.tar_name, index=plan.index_name, samples=len(uids), bytes=int(meta["tar_bytes"]),
        sha256=meta["tar_sha256"],
    )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _load_rows(plan: ShardPlan) -> pa.Table:
    tables = []
    for part, rows in plan.parts:
        columns = [c for c in pq.ParquetFile(part).schema_arrow.names if not is_embedding_column(c)]
        table = pq.read_table(part, columns=columns, filters=[("row", "in", rows)])  # only the rows (and images) this shard needs
        # keep the plan's order, which is the row order within the part
        order = pc.sort_indices(table.column("row"))
        tables.append(table.take(order))
    return pa.concat_tables(tables, promote_options="permissive")


def write_shard(out: str, plan: ShardPlan) -> ShardEntry:
    """Write one shard and its index; returns its manifest entry.

    Members of a sample are written together, sorted by extension (curate.sinks.tars: fixed mtime, webdataset's
    layout).
    """
    out_path = Path(out)
    (out_path / SHARDS).mkdir(parents=True, exist_ok=True)
    table = _load_rows(plan)
    if table.column("uid").to_pylist() != plan.uids:
        raise RuntimeError(f"{plan.tar_name}: stored rows do not match the shard plan")
    json_columns = [c for c in table.column_names if c not in NOT_IN_SAMPLE_JSON and not is_timing_column(c)]
    tar_path = out_path / plan.tar_name
    digest = hashlib.sha256()
    with atomic_file(tar_path) as handle, _Hashing(handle, digest) as hashed, \
            tarfile.open(fileobj=hashed, mode="w|") as tar:
        meta_rows = table.select(json_columns).to_pylist()
        images = table.column("image").to_pylist()
        exts = table.column("image_ext").to_pylist()
        captions = table.column("caption").to_pylist()
        synthetic = (table.column("synthetic_caption").to_pylist() if "synthetic_caption" in table.column_names
                     else [None] * table.num_rows)
        for key, meta, image, ext, caption, syn in zip(plan.keys, meta_rows, images, exts, captions, synthetic):
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
    size = hashed.size
    index = table.drop_columns(["image"]).append_column("key", pa.array(plan.keys, pa.string()))
    index = index.replace_schema_metadata(
        {"tar_sha256": digest.hexdigest(), "tar_bytes": str(size), "samples": str(len(plan.keys))}
    )
    index_path = out_path / plan.index_name
    with atomic_file(index_path) as handle:
        pq.write_table(index, handle)
    return ShardEntry(path=plan.tar_name, index=plan.index_name, samples=len(plan.keys), bytes=size,
                      sha256=digest.hexdigest())
