"""Reading URL lists and shards, one format at a time (parquet, csv, tsv, jsonl, txt, webdataset tars; local paths,
globs or fsspec URLs), into Arrow batches, every read bounded: a line by ``input.max_record_bytes``, the extra
columns by ``input.max_extra_columns`` or ``input.keep_columns`` (the rest folded into ``input_other_keys``).
curate.inputs.chunks turns these batches into uid-tagged input chunks."""

from __future__ import annotations

import json
import lzma
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curate.config import InputConfig
from curate.errors import CurateError
from curate.inputs.shards import SOURCE_COLUMNS, iter_shard_rows, valid_text

EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt",
              ".tar": "webdataset"}
READ_BATCH_ROWS = 8192
READ_BATCH_BYTES = 32 << 20  # of JSON lines: a batch of long lines stays small
LINE_BLOCK_BYTES = 1 << 16
ROW_FORMATS = ("jsonl", "webdataset")  # read as one dict a row: their keys are folded by the reader itself
OTHER_KEYS = "input_other_keys"
TRUNCATED = "caption_truncated"
# What a damaged compressed list raises from inside a read (gzip: EOFError and zlib.error; xz: LZMAError).
READ_ERRORS = (pa.ArrowException, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, OverflowError)



def resolve_sources(path: str | list[str] | None) -> list[str]:
    """Expand files, folders and globs into a sorted list of readable files, or raise one clear line."""
    if not path:
        raise CurateError("input.path: no input given (set input.path in the pipeline or pass --input)")
    paths = [path] if isinstance(path, str) else list(path)
    found: list[str] = []
    for item in paths:
        try:
            fs, _, _ = fsspec.get_fs_token_paths(item)
        except (ValueError, ImportError) as err:
            raise CurateError(f"input {item}: cannot open ({str(err).splitlines()[0]})") from None
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        matches = fs.glob(item) if any(c in item for c in "*?[") else ([item] if fs.exists(item) else [])
        if not matches:
            raise CurateError(f"input {item}: no such file")
        for match in sorted(matches):
            if fs.isdir(match):
                inner = sorted(p for p in fs.find(match) if Path(p).suffix.lower() in EXTENSIONS)
                if not inner:
                    raise CurateError(f"input {item}: folder holds no .parquet, .csv, .tsv, .jsonl or .txt file")
                matches_here = inner
            else:
                matches_here = [match]
            for m in matches_here:
                full = m if protocol in ("file", "local") else f"{protocol}://{m}"
                if full not in found:  # the same file named twice is read once
                    found.append(full)
    return found


def source_labels(sources: list[str]) -> dict[str, str]:
    """Each source's path relative to the folder all sources share: the part of a uid that names the file.

    Relative (not absolute) so that moving the data keeps uids; more than the base name so that two lists named
    alike in different folders do not collide.
    """
    if len(sources) == 1:
        return {sources[0]: sources[0].rstrip("/").rsplit("/", 1)[-1]}
    prefix = os.path.commonprefix(sources)
    prefix = prefix[: prefix.rfind("/") + 1]
    return {source: source[len(prefix):] for source in sources}


def detect_format(source: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = source[:-3] if source.endswith(".gz") else source
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in EXTENSIONS:
        raise CurateError(f"input {source}: cannot tell the format from '{suffix or 'no extension'}'; set input.format")
    return EXTENSIONS[suffix]


class ExtraColumns:
    """Which extra input keys become columns: ``input.keep_columns`` when set, else the first
    ``input.max_extra_columns`` names seen over the whole input, in order. The rest of a row's keys are folded into
    one JSON text column (OTHER_KEYS), so a list whose every line has new keys costs its size, not rows x keys."""

    def __init__(self, config: InputConfig) -> None:
        self.keep = None if config.keep_columns is None else frozenset(config.keep_columns)
        self.limit = config.max_extra_columns
        self.kept: dict[str, None] = {}  # in the order first seen

    def admits(self, name: str) -> bool:
        if name == OTHER_KEYS:
            return False  # an input column so named is folded with the others, never confused with ours
        if self.keep is not None:
            return name in self.keep
        if name not in self.kept and len(self.kept) < self.limit:
            self.kept[name] = None
        return name in self.kept

    def fold(self, row: dict[str, Any], fixed: tuple[str, ...]) -> dict[str, Any]:
        """The row with its unadmitted keys moved into OTHER_KEYS, as one JSON object (nested values stay nested;
        json.dumps raises RecursionError on one nested past the interpreter's limit)."""
        other = {k: row.pop(k) for k in [k for k in row if k not in fixed and not self.admits(k)]}
        if other:
            row[OTHER_KEYS] = json.dumps(other, default=str)
        return row

    def fold_columns(self, table: pa.Table, fixed: tuple[str, ...]) -> pa.Table:
        """The same for a table format: unadmitted columns become OTHER_KEYS (nulls left out)."""
        folded = [name for name in table.column_names if name not in fixed and not self.admits(name)]
        if not folded:
            return table
        texts = []
        for row in table.select(folded).to_pylist():
            present = {k: v for k, v in row.items() if v is not None}
            texts.append(json.dumps(present, default=str) if present else None)
        return table.drop_columns(folded).append_column(OTHER_KEYS, pa.array(texts, pa.string()))


def _text_value(value: Any) -> str | None:
    if value is None:
        return None
    return valid_text(value) if isinstance(value, str) else json.dumps(value, default=str)


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Columns from the union of keys (not just the first row's, as from_pylist would); a column whose values
    mix types (a caption that is 5 in one row) or do not fit Arrow (a 31-digit number) becomes text rather than
    failing the file."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, UnicodeEncodeError):
            columns[key] = pa.array([_text_value(v) for v in values], pa.string())
    return pa.table(columns)


def _lines(source: str, handle: Any, limit: int) -> Iterator[tuple[int, bytes]]:
    """Numbered lines, read a block at a time: a line over ``limit`` bytes fails before it is held whole
    (``for line in handle`` would read a 1 GB line into memory)."""
    number, rest = 0, b""
    while block := handle.read(LINE_BLOCK_BYTES):
        *complete, rest = (rest + block).split(b"\n")
        for line in complete:
            number += 1
            if len(line) > limit:
                raise _line_too_long(source, number, limit)
            yield number, line
        if len(rest) > limit:
            raise _line_too_long(source, number + 1, limit)
    if rest:
        yield number + 1, rest


def _line_too_long(source: str, number: int, limit: int) -> CurateError:
    return CurateError(f"input {source}:{number}: line longer than input.max_record_bytes ({limit} bytes)")


def _json_row(source: str, number: int, line: bytes, extra: ExtraColumns, fixed: tuple[str, ...]) -> dict[str, Any]:
    """One JSONL line as a flat row (its other keys folded, nested values as JSON text), or the file fails
    naming the line, as any invalid line does."""
    try:
        row = json.loads(line)
        if isinstance(row, dict):
            row = extra.fold({valid_text(k): v for k, v in row.items()}, fixed)
            return {k: _text_value(v) if isinstance(v, (str, dict, list)) else v for k, v in row.items()}
    except json.JSONDecodeError as err:
        raise CurateError(f"input {source}:{number}: not a JSON object per line ({err.msg})") from None
    except RecursionError:
        raise CurateError(f"input {source}:{number}: not a JSON object per line (nested too deeply)") from None
    except ValueError as err:  # not UTF-8, or a number of more than 4300 digits
        raise CurateError(f"input {source}:{number}: not a JSON object per line ({str(err)[:80]})") from None
    raise CurateError(f"input {source}:{number}: expected a JSON object, got {type(row).__name__}")


def iter_raw(source: str, fmt: str, config: InputConfig, extra: ExtraColumns) -> Iterator[pa.Table]:
    if fmt == "webdataset":  # offsets must be of the tar itself: no transparent decompression
        fixed = ("url", "caption", *SOURCE_COLUMNS)
        with fsspec.open(source, "rb") as handle:
            try:
                for rows in iter_shard_rows(source, handle, config.max_caption_chars, config.max_record_bytes):
                    yield _rows_to_table([extra.fold(row, fixed) for row in rows])
            except CurateError as err:
                raise CurateError(f"input {err}") from None
        return
    with fsspec.open(source, "rb", compression="infer") as handle:
        if fmt == "parquet":
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        elif fmt in ("csv", "tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            header = pacsv.open_csv(handle, parse_options=parse).schema.names
            handle.seek(0)
            convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header})
            reader = pacsv.open_csv(
                handle, parse_options=parse, convert_options=convert,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
            )
            for batch in reader:
                yield pa.Table.from_batches([batch])
        elif fmt == "jsonl":
            fixed = tuple(c for c in (config.url_col, config.caption_col) if c)
            rows: list[dict[str, Any]] = []
            batch_bytes = 0
            for number, line in _lines(source, handle, config.max_record_bytes):
                if not line.strip():
                    continue
                rows.append(_json_row(source, number, line, extra, fixed))
                batch_bytes += len(line)
                if len(rows) == READ_BATCH_ROWS or batch_bytes >= READ_BATCH_BYTES:
                    yield _rows_to_table(rows)
                    rows, batch_bytes = [], 0
            if rows:
                yield _rows_to_table(rows)
        elif fmt == "txt":
            urls: list[str] = []
            for _, line in _lines(source, handle, config.max_record_bytes):
                url = line.decode("utf-8", "replace").strip()
                if url:
                    urls.append(url)
                if len(urls) == READ_BATCH_ROWS:
                    yield pa.table({"url": urls})
                    urls = []
            if urls:
                yield pa.table({"url": urls})
        else:
            raise CurateError(f"input {source}: unknown format '{fmt}'")


def check_columns(source: str, table: pa.Table, config: InputConfig, fmt: str) -> None:
    if fmt in ("txt", "webdataset"):
        return  # one URL a line, or samples with their own layout: no columns to name
    names = table.column_names
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise CurateError(f"input {source}: column '{twice}' appears twice; name each column once")
    wanted = [("input.url_col", config.url_col)]
    if config.caption_col and fmt != "txt":
        wanted.append(("input.caption_col", config.caption_col))
    for key, column in wanted:
        if column not in names:
            listed = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
            raise CurateError(f"input {source}: column '{column}' ({key}) not found; columns are: {listed}")


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error, cut: pyarrow quotes the offending row, which can be megabytes."""
    line = (str(err).splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def validate_input(config: InputConfig) -> list[str]:
    """Check that every source exists and that the first one has the configured columns; nothing is written."""
    sources = resolve_sources(config.path)
    for source in sources:
        detect_format(source, config.format)
    first, fmt = sources[0], detect_format(sources[0], config.format)
    try:
        sample = next(iter_raw(first, fmt, config, ExtraColumns(config)), None)
    except CurateError:
        raise  # already one clear line
    except Exception as err:  # pyarrow raises several types on unreadable files
        raise CurateError(f"input {first}: cannot read as {fmt}: {first_line(err)}") from None
    if sample is not None:
        check_columns(first, sample, config, fmt)
    return sources
