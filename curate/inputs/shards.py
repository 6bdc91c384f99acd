"""Existing WebDataset shards as input (img2dataset and DataComp layouts): curate what was already downloaded.

A shard is scanned once, header by header: each sample's .txt and .json are read (up to a cap), its image is only
located (offset and size inside the tar), so input chunks stay small and the image bytes are read later by the
worker that decodes them, straight from the tar. Those offsets must be offsets into the file on disk, so only
uncompressed tars are read; a shard from a stranger is bounded like any other input: sparse members are skipped,
a member's headers may not exceed MAX_HEADER_BYTES, and a damaged tar is one CurateError line naming the file.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa

from curate.errors import CurateError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
BATCH_ROWS = 4096
BATCH_BYTES = 32 << 20  # text and JSON read per batch: a shard of huge members still yields small batches
# What tarfile may read for one member's headers (pax records, GNU long names, sparse maps), whatever they declare.
MAX_HEADER_BYTES = 1 << 20
DEFAULT_CAPTION_CHARS = 4000
DEFAULT_JSON_BYTES = 1 << 20
# Columns that point a row at its image inside a shard; the download stage reads these instead of fetching a URL.
SOURCE_COLUMNS = {"source_file": pa.string(), "source_offset": pa.int64(), "source_size": pa.int64(),
                  "source_key": pa.string()}
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                     b"\x04\x22\x4d\x18": "lz4"}
_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """Text Arrow can store: lone surrogates (from a JSON "\\ud800" escape or a tar name's undecodable bytes)
    become U+FFFD."""
    return _SURROGATES.sub("\ufffd", text) if not text.isascii() else text


class _OverAllowance(Exception):
    pass


class _Metered:
    """The shard as tarfile sees it, with a byte allowance that the reader refills for each member: headers that
    declare gigabytes (a pax record, a GNU long name, a sparse map) fail instead of being read whole."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.allowance = MAX_HEADER_BYTES

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.allowance:
            raise _OverAllowance
        data = self.handle.read(size)
        self.allowance -= len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


def _malformed(source: str, err: BaseException) -> CurateError:
    if isinstance(err, _OverAllowance):
        why = f"a member's headers exceed {MAX_HEADER_BYTES >> 20} MiB"
    else:
        why = (str(err).splitlines() or [type(err).__name__])[0]
    return CurateError(f"{source}: not a readable tar ({why})")


def _split(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _metadata(raw: bytes | None) -> dict[str, Any]:
    """A sample's .json as flat metadata; missing, over the cap, invalid or too deeply nested: none."""
    if raw is None:
        return {}
    try:
        loaded = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError: JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {valid_text(k): valid_text(v) if isinstance(v, str) else v for k, v in loaded.items()
            if not isinstance(v, (dict, list))}


def _sample_row(source: str, key: str, members: dict[str, Any]) -> dict[str, Any]:
    row = _metadata(members.get("json"))
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else row.get("caption")
    image = next(((ext, members[ext]) for ext in IMAGE_EXTENSIONS if ext in members), None)
    row.update({
        "url": row.get("url"),
        "caption": caption,
        "source_file": source,
        "source_key": key,
        "source_offset": image[1][0] if image else None,
        "source_size": image[1][1] if image else None,
    })
    return row


def _open(source: str, handle: IO[bytes], metered: _Metered) -> tarfile.TarFile:
    """The tar, uncompressed only (its image offsets must be offsets into the file on disk); a compressed one is
    named as such (told by its magic bytes once the first header fails, so a member named 'BZh...' is no bzip2)."""
    try:
        return tarfile.open(fileobj=metered, mode="r:")  # type: ignore[call-overload]  # seeks over image bytes
    except Exception as err:
        handle.seek(0)
        head = handle.read(6)
        kind = next((kind for magic, kind in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
        if kind:
            raise CurateError(f"{source}: a {kind}-compressed tar; image offsets must point into the file on disk: "
                              f"decompress it first") from None
        raise _malformed(source, err) from None


def _members(source: str, tar: tarfile.TarFile, metered: _Metered) -> Iterator[tarfile.TarInfo]:
    while True:
        metered.allowance = MAX_HEADER_BYTES
        try:
            info = tar.next()
        except Exception as err:  # tarfile raises ReadError, ValueError, OverflowError, ... on a damaged header
            raise _malformed(source, err) from None
        if info is None:
            return
        tar.members.clear()  # tarfile keeps every TarInfo (pax records too); a scan needs only this one
        yield info


def _read_capped(source: str, tar: tarfile.TarFile, info: tarfile.TarInfo, metered: _Metered, cap: int) -> bytes:
    metered.allowance = cap + (64 << 10)  # the member's buffered reader may read a block past the cap
    try:
        return tar.extractfile(info).read(cap)  # type: ignore[union-attr]
    except Exception as err:  # tarfile.ReadError on a member cut short
        raise _malformed(source, err) from None


def _check_end(source: str, tar: tarfile.TarFile, handle: IO[bytes]) -> None:
    """tarfile stops quietly at a header it cannot parse past the first: that is a damaged shard, not its end."""
    handle.seek(tar.offset)
    block = handle.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise CurateError(f"{source}: not a readable tar (an unreadable member header at byte {tar.offset})")


def iter_shard_rows(source: str, handle: IO[bytes], max_caption_chars: int = DEFAULT_CAPTION_CHARS,
                    max_json_bytes: int = DEFAULT_JSON_BYTES) -> Iterator[list[dict[str, Any]]]:
    """Rows of one uncompressed tar, a batch at a time; a sample without an image still becomes a row (it fails
    later). A caption is read up to enough bytes for max_caption_chars characters and one more (the reader cuts
    it and marks it); a .json over max_json_bytes is dropped like invalid JSON. ``handle`` must be seekable."""
    text_cap = 4 * max_caption_chars + 4  # UTF-8 takes at most 4 bytes a character
    metered = _Metered(handle)
    tar = _open(source, handle, metered)
    rows: list[dict[str, Any]] = []
    batch_bytes = 0
    current_key: str | None = None
    members: dict[str, Any] = {}
    with tar:
        for info in _members(source, tar, metered):
            if not info.isfile():
                continue
            if info.size < 0:  # a base-256 size field can say -1
                raise CurateError(f"{source}: not a readable tar (a member declares {info.size} bytes)")
            key, ext = _split(valid_text(info.name))
            if key.rpartition("/")[2].startswith("_") or not ext:
                continue  # webdataset metadata members and files without an extension are not samples
            if key != current_key and current_key is not None:
                rows.append(_sample_row(source, current_key, members))
                members = {}
                if len(rows) == BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                    yield rows
                    rows, batch_bytes = [], 0
            current_key = key
            if info.issparse():
                continue  # its declared size is not on disk: 10 KiB could claim a 300 MB caption
            if ext == "txt":
                members[ext] = _read_capped(source, tar, info, metered, text_cap)
                batch_bytes += len(members[ext])
            elif ext == "json":
                data = _read_capped(source, tar, info, metered, max_json_bytes + 1)
                members[ext] = data if len(data) <= max_json_bytes else None
                batch_bytes += len(data)
            elif ext in IMAGE_EXTENSIONS:
                members[ext] = (info.offset_data, info.size)
        _check_end(source, tar, handle)
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
