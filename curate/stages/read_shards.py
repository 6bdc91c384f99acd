"""Existing WebDataset shards as input (img2dataset and DataComp layouts): curate what was already downloaded.

A shard is scanned once as a stream: each sample's .txt and .json are read (they are small), its image is only
located (offset and size inside the tar), so input chunks stay small and the image bytes are read later by the
worker that decodes them, straight from the tar.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
BATCH_ROWS = 4096
# Columns that point a row at its image inside a shard; the download stage reads these instead of fetching a URL.
SOURCE_COLUMNS = {"source_file": pa.string(), "source_offset": pa.int64(), "source_size": pa.int64(),
                  "source_key": pa.string()}


def _split(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample_row(source: str, key: str, members: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else meta.get("caption")
    image = next(((ext, members[ext]) for ext in IMAGE_EXTENSIONS if ext in members), None)
    row = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    row.update({
        "url": meta.get("url"),
        "caption": caption,
        "source_file": source,
        "source_key": key,
        "source_offset": image[1][0] if image else None,
        "source_size": image[1][1] if image else None,
    })
    return row


def iter_shard_rows(source: str, handle: IO[bytes]) -> Iterator[list[dict[str, Any]]]:
    """Rows of one tar, a batch at a time; a sample without an image still becomes a row (it fails later)."""
    rows: list[dict[str, Any]] = []
    current_key: str | None = None
    members: dict[str, Any] = {}
    with tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _split(info.name)
            if key.rpartition("/")[2].startswith("_") or not ext:
                continue  # webdataset metadata members and files without an extension are not samples
            if key != current_key and current_key is not None:
                rows.append(_sample_row(source, current_key, members))
                members = {}
                if len(rows) == BATCH_ROWS:
                    yield rows
                    rows = []
            current_key = key
            if ext in ("txt", "json"):
                members[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
            elif ext in IMAGE_EXTENSIONS:
                members[ext] = (info.offset_data, info.size)
    if current_key is not None:
        rows.append(_sample_row(source, current_key, members))
    if rows:
        yield rows


def read_member(path: str, offset: int, size: int) -> bytes:
    """The bytes of one member of a tar (local or any fsspec filesystem), read by range."""
    import fsspec

    with fsspec.open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
