"""URL lists and shards (read by curate.inputs.formats) staged as resumable input chunks.

Each row gets a stable ``uid`` and its position ``row`` in the whole input. The driver streams the files once and
writes ``input/NNNNN.parquet`` chunks (as img2dataset does), so memory stays flat whatever the list's size and a rerun
of the same input reuses them.

Lists and shards come from strangers, so every read is bounded: a line by ``input.max_record_bytes``, a caption by
``input.max_caption_chars`` (cut, and ``caption_truncated`` set), the extra columns by ``input.max_extra_columns`` or
``input.keep_columns`` (the rest of a row's keys folded into one JSON text column, ``input_other_keys``), so a list
whose every line brings a new key costs its size, not rows x keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file, write_text_atomic
from curate.config import InputConfig
from curate.errors import CurateError
from curate.core.schema import reserved_column_names
from curate.core.stage import OK
from curate.inputs.formats import (
    OTHER_KEYS, READ_ERRORS, ROW_FORMATS, TRUNCATED, ExtraColumns, check_columns, detect_format, first_line, iter_raw,
    source_labels,
)
from curate.inputs.shards import SOURCE_COLUMNS

@dataclass(frozen=True)
class InputChunks:
    """The staged input: chunk files in order and the total row count."""

    files: list[Path]
    rows: int
    reused: bool = False  # True when an earlier run staged the same sources


def make_uid(source_name: str, row_in_file: int, url: str | None) -> str:
    return hashlib.blake2b(f"{source_name}\x00{row_in_file}\x00{url}".encode(), digest_size=16).hexdigest()


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    """A column as strings: text stays, numbers print, anything else (lists, structs, binary) becomes JSON text."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.combine_chunks().cast(pa.string())
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    try:
        return column.combine_chunks().cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())


def _keep_extra(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Extra columns go into each sample's .json: keep JSON-ready types, turn the rest into text."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_string(kind):
        return column
    return _as_text(column)


def _cap_captions(captions: pa.Array, max_chars: int) -> tuple[pa.Array, pa.Array]:
    """Captions cut to ``max_chars`` characters, and which were cut."""
    truncated = pc.fill_null(pc.greater(pc.utf8_length(captions), max_chars), False)
    if not pc.any(truncated).as_py():
        return captions, truncated
    return pc.utf8_slice_codeunits(captions, 0, max_chars), truncated  # code points, despite the name


def _normalise(table: pa.Table, name: str, config: InputConfig, fmt: str, first_row: int, row_in_file: int,
               extra: ExtraColumns) -> pa.Table:
    url_col = "url" if fmt in ("txt", "webdataset") else config.url_col
    caption_col = "caption" if fmt == "webdataset" else config.caption_col
    if fmt not in ROW_FORMATS:
        table = extra.fold_columns(table, tuple(c for c in (url_col, caption_col) if c))
    n = table.num_rows
    urls = _as_text(table.column(url_col)) if url_col in table.column_names else pa.nulls(n, pa.string())
    if caption_col and caption_col in table.column_names and fmt != "txt":
        captions = _as_text(table.column(caption_col))
    else:
        captions = pa.nulls(n, pa.string())
    captions, truncated = _cap_captions(captions, config.max_caption_chars)
    keys = table.column("source_key").to_pylist() if fmt == "webdataset" else urls.to_pylist()
    uids = [make_uid(name, row_in_file + i, key) for i, key in enumerate(keys)]
    columns = {
        "uid": pa.array(uids, pa.string()),
        "row": pa.array(range(first_row, first_row + n), pa.int64()),
        "url": urls,
        "caption": captions,
        "status": pa.array([OK] * n, pa.string()),
        "reason": pa.nulls(n, pa.string()),
        "decided_by": pa.nulls(n, pa.string()),
        TRUNCATED: truncated,
    }
    reserved = reserved_column_names()  # the reader's own columns (curate.core.schema.READER_COLUMNS) included
    for name_ in SOURCE_COLUMNS:
        if fmt == "webdataset":
            columns[name_] = table.column(name_).cast(SOURCE_COLUMNS[name_])
    for column in table.column_names:
        if column in (url_col, caption_col) or (fmt == "webdataset" and column in SOURCE_COLUMNS):
            continue
        # an input column named like one of ours (uid, key, width, ...) is kept under another name, never dropped;
        # OTHER_KEYS here is the fold's own column (an input column so named was folded into it)
        target = column if column not in reserved or column == OTHER_KEYS else f"input_{column}"
        columns[target] = _keep_extra(table.column(column))
    return pa.table(columns)


def _source_signature(sources: list[str]) -> list[dict[str, Any]]:
    signature = []
    for source in sources:
        fs, _, (path,) = fsspec.get_fs_token_paths(source)
        info = fs.info(path)
        signature.append({"path": source, "size": info.get("size"), "mtime": str(info.get("mtime", ""))})
    return signature


def _write_atomic(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def _settings(config: InputConfig) -> dict[str, Any]:
    return {"url_col": config.url_col, "caption_col": config.caption_col, "rows_per_chunk": config.rows_per_chunk,
            "max_caption_chars": config.max_caption_chars, "max_record_bytes": config.max_record_bytes,
            "max_extra_columns": config.max_extra_columns, "keep_columns": config.keep_columns}


def staged_chunks(config: InputConfig, sources: list[str], folder: Path) -> InputChunks | None:
    """The chunks an earlier run staged from these same sources and settings, or None."""
    done_marker = folder / "_SUCCESS.json"
    if not done_marker.exists():
        return None
    done = json.loads(done_marker.read_text())
    if done["sources"] != _source_signature(sources) or done["settings"] != _settings(config):
        return None
    return InputChunks([folder / name for name in done["chunks"]], done["rows"], reused=True)


def stage_input(config: InputConfig, sources: list[str], folder: Path) -> InputChunks:
    """Write the input as uid-tagged chunks under ``folder``; reuse them when the same sources were staged before."""
    reused = staged_chunks(config, sources, folder)
    if reused is not None:
        return reused
    done_marker = folder / "_SUCCESS.json"
    signature = _source_signature(sources)
    settings = _settings(config)
    folder.mkdir(parents=True, exist_ok=True)
    done_marker.unlink(missing_ok=True)  # first: a kill while restaging must not leave a marker over new chunks
    for stale in folder.glob("*.parquet"):
        stale.unlink()
    chunks: list[Path] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    total = 0

    def flush(tables: list[pa.Table]) -> None:
        path = folder / f"{len(chunks):05d}.parquet"
        _write_atomic(pa.concat_tables(tables, promote_options="permissive"), path)
        chunks.append(path)

    labels = source_labels(sources)
    extra = ExtraColumns(config)  # one for all files: the column budget is the whole input's
    for source in sources:
        fmt = detect_format(source, config.format)
        row_in_file = 0
        try:
            for raw in iter_raw(source, fmt, config, extra):
                if row_in_file == 0:
                    check_columns(source, raw, config, fmt)  # later batches may lack a column: nulls, not an error
                table = _normalise(raw, labels[source], config, fmt, total, row_in_file, extra)
                row_in_file += table.num_rows
                total += table.num_rows
                while table.num_rows:
                    take = min(table.num_rows, config.rows_per_chunk - pending_rows)
                    pending.append(table.slice(0, take))
                    pending_rows += take
                    table = table.slice(take)
                    if pending_rows == config.rows_per_chunk:
                        flush(pending)
                        pending, pending_rows = [], 0
        except CurateError:
            raise
        except READ_ERRORS as err:
            raise CurateError(f"input {source}: cannot read as {fmt}: {first_line(err)}") from None
    if pending:
        flush(pending)
    done = {"sources": signature, "settings": settings, "chunks": [p.name for p in chunks], "rows": total}
    write_text_atomic(done_marker, json.dumps(done, indent=1))
    return InputChunks(chunks, total)
