"""Hostile input files: every read of a member, a line or a caption is bounded, and a bad file is one clear line.

Each test plants one attack from the security review (a sparse member, a gzip stream named .tar, a header declaring
2^60 bytes, a new JSON key on every line, a 100,000-deep JSON value, ...) in a small real file and stages it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import tarfile
import tempfile
import threading
import tracemalloc
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.config import InputConfig
from curate.errors import CurateError
from curate.core.schema import reserved_column_names
from curate.inputs.chunks import stage_input
from curate.inputs.formats import validate_input
from curate.inputs.shards import read_member

DEFAULT_CAPTION_CHARS = InputConfig().model_dump().get("max_caption_chars", 4000)


def stage(path: Path, **config) -> pa.Table:
    cfg = InputConfig(path=str(path), **config)
    chunks = stage_input(cfg, validate_input(cfg), path.parent / f"staged-{path.name}")
    return pa.concat_tables([pq.read_table(p) for p in chunks.files], promote_options="permissive")


def error(path: Path, **config) -> str:
    with pytest.raises(CurateError) as info:
        stage(path, **config)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


@functools.cache
def _imports_done() -> None:
    """Stage each kind of input once: the modules staging imports the first time (pandas, ...) are not measured."""
    with tempfile.TemporaryDirectory() as folder:
        write_tar(Path(folder) / "warm.tar", [sample(0)])
        (Path(folder) / "warm.jsonl").write_text(json.dumps({"url": "u", "caption": "c"}) + "\n")
        for name in ("warm.tar", "warm.jsonl"):
            stage(Path(folder) / name)


@contextmanager
def python_peak() -> Iterator[dict[str, int]]:
    """The peak of Python allocations (bytes read, strings decoded) inside the block.

    Only around tar, JSONL and txt input, which Python reads itself: on Python 3.11, tracemalloc.stop() while one
    of pyarrow's I/O threads calls into Python (reading a CSV or parquet through a Python file) crashes the
    process (CPython gh-128679, fixed in 3.12.9 and 3.13.2).
    """
    _imports_done()
    seen: dict[str, int] = {}
    tracemalloc.start()
    try:
        yield seen
    finally:
        seen["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def member_offsets(data: bytes) -> list[int]:
    """Where each member's first header block starts."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [m.offset for m in tar.getmembers()]


def sample(i: int, caption: str = "a caption") -> tuple[str, dict[str, bytes]]:
    return f"{i:06d}", {"jpg": b"\xff\xd8 image %d \xff\xd9" % i, "txt": caption.encode(),
                        "json": json.dumps({"url": f"http://127.0.0.1/{i}.jpg"}).encode()}


# --- finding 2: tar members read whole; compressed streams inflated ---


def test_gzip_stream_named_tar_is_refused_naming_the_file(tmp_path: Path) -> None:
    plain = write_tar(tmp_path / "plain.tar", [sample(0), sample(1)])
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert "gzip" in error(packed)  # the image offsets would point into the inflated stream, not the file


def test_sparse_member_is_skipped_not_inflated(tmp_path: Path) -> None:
    """10 KiB on disk declaring a 100 MiB caption (PAX sparse 0.1): the sample is staged without it."""
    path = tmp_path / "sparse.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        image = b"\xff\xd8 image \xff\xd9"
        info = tarfile.TarInfo("000000.jpg")
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
        info = tarfile.TarInfo("000000.txt")
        info.size = 5
        info.pax_headers = {"GNU.sparse.map": "0,5", "GNU.sparse.size": str(100 << 20), "GNU.sparse.numblocks": "1"}
        tar.addfile(info, io.BytesIO(b"hello"))
    assert path.stat().st_size < 16 << 10
    with python_peak() as memory:
        table = stage(path)
    assert table.num_rows == 1 and table.column("caption").to_pylist() == [None]
    assert memory["peak"] < 16 << 20, f"peak {memory['peak'] / 2**20:.0f} MiB"


def test_long_text_member_is_read_only_up_to_the_cap(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "long.tar", [sample(0, "é" * (8 << 20)), sample(1, "short")])  # 16 MiB caption
    with python_peak() as memory:
        table = stage(path)
    assert table.column("caption").to_pylist() == ["é" * DEFAULT_CAPTION_CHARS, "short"]
    assert table.column("caption_truncated").to_pylist() == [True, False]
    assert memory["peak"] < 8 << 20, f"peak {memory['peak'] / 2**20:.0f} MiB"


def test_json_member_over_the_cap_is_dropped_unread(tmp_path: Path) -> None:
    big = json.dumps({"url": "http://127.0.0.1/0.jpg", "pad": "x" * (4 << 20)}).encode()
    path = write_tar(tmp_path / "bigjson.tar", [("000000", {"jpg": b"\xff\xd8\xff\xd9", "json": big}), sample(1)])
    with python_peak() as memory:
        table = stage(path)
    assert "pad" not in table.column_names  # dropped like invalid JSON: the sample keeps its image
    assert table.column("url").to_pylist() == [None, "http://127.0.0.1/1.jpg"]
    assert memory["peak"] < 3 << 20, f"peak {memory['peak'] / 2**20:.0f} MiB"


def _base256_size(data: bytearray, header: int, size: int) -> None:
    data[header + 124:header + 136] = b"\x80" + size.to_bytes(11, "big")
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])


def test_header_declaring_2_to_the_60_bytes_fails_at_once(tmp_path: Path) -> None:
    """tarfile's stream mode skips a member by reading 10 KiB at a time: 2^60 bytes was a hang."""
    data = bytearray(write_tar(tmp_path / "ok.tar", [sample(0), sample(1)]).read_bytes())
    _base256_size(data, member_offsets(bytes(data))[0], 1 << 60)
    path = tmp_path / "huge.tar"
    path.write_bytes(bytes(data))
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            stage(path)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)  # takes well under a second now; the old code would run for years
    assert outcome, "still reading after 30 s"
    assert isinstance(outcome[0], CurateError) and str(path) in str(outcome[0]), outcome


@pytest.mark.parametrize("damage", ["truncated", "bad_header"])
def test_truncated_or_corrupt_tar_is_one_line(tmp_path: Path, damage: str) -> None:
    """The damaged shard comes second: validation samples only the first file."""
    data = bytearray(write_tar(tmp_path / "a.tar", [sample(i) for i in range(3)]).read_bytes())
    if damage == "truncated":
        data = data[: member_offsets(bytes(data))[4] + 600]  # inside the second sample's text
    else:
        data[member_offsets(bytes(data))[3]] ^= 0x40  # a name byte of the second sample: bad checksum
    path = tmp_path / "b.tar"
    path.write_bytes(bytes(data))
    config = InputConfig(path=str(tmp_path / "*.tar"))
    sources = validate_input(config)
    with pytest.raises(CurateError) as info:  # not a traceback, and not a silently shorter shard
        stage_input(config, sources, tmp_path / "staged")
    assert str(path) in str(info.value) and "tar" in str(info.value) and "\n" not in str(info.value)


# --- captions everywhere get a length cap ---


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_url_list_captions_are_capped_and_marked(tmp_path: Path, fmt: str) -> None:
    captions = ["ü" * 10_000, "short"]
    urls = ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"]
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, captions)))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in zip(urls, captions)))
    table = stage(path)
    assert table.column("caption").to_pylist() == ["ü" * DEFAULT_CAPTION_CHARS, "short"]
    assert table.column("caption_truncated").to_pylist() == [True, False]


def test_max_caption_chars_is_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"url": "http://127.0.0.1/a.jpg", "caption": "abcdef"}) + "\n")
    assert stage(path, max_caption_chars=3).column("caption").to_pylist() == ["abc"]


# --- finding 3: distinct JSON keys become columns ---


def test_a_new_jsonl_key_on_every_line_folds_into_one_column(tmp_path: Path) -> None:
    """571 KiB of such lines made 40k columns and 638 MiB: now the first 64 names are columns, the rest JSON text."""
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps({"url": f"http://127.0.0.1/{i}.jpg", "caption": "c", f"key_{i}": i}) + "\n"
                            for i in range(3000)))
    table = stage(path)
    assert table.num_rows == 3000
    assert len(table.column_names) < 100, f"{len(table.column_names)} columns"
    assert table.column("key_0").to_pylist()[0] == 0
    folded = table.column("input_other_keys").to_pylist()
    assert json.loads(folded[2999]) == {"key_2999": 2999} and folded[0] is None


def test_a_new_shard_json_key_on_every_sample_folds_into_one_column(tmp_path: Path) -> None:
    samples = [(f"{i:06d}", {"jpg": b"\xff\xd8\xff\xd9", "json": json.dumps({f"key_{i}": i}).encode()})
               for i in range(800)]
    table = stage(write_tar(tmp_path / "keys.tar", samples))
    assert table.num_rows == 800 and len(table.column_names) < 100, f"{len(table.column_names)} columns"
    assert json.loads(table.column("input_other_keys").to_pylist()[799]) == {"key_799": 799}


def test_a_wide_table_keeps_the_first_64_extra_columns(tmp_path: Path) -> None:
    """The same budget for every format: a 300-column parquet keeps 64 extra columns and folds the rest."""
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "caption": ["a", "b"],
                             **{f"c{i:03d}": [i, None] for i in range(300)}}), path)
    table = stage(path)
    assert [c for c in table.column_names if c.startswith("c0") or c.startswith("c1") or c.startswith("c2")] == [
        f"c{i:03d}" for i in range(64)]
    folded = table.column("input_other_keys").to_pylist()
    assert json.loads(folded[0]) == {f"c{i:03d}": i for i in range(64, 300)} and folded[1] is None


def test_keep_columns_names_the_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"url": "http://127.0.0.1/a.jpg", "caption": "c", "a": 1, "b": "two", "uid": "x"})
                    + "\n")
    table = stage(path, keep_columns=["b"])
    assert table.column("b").to_pylist() == ["two"] and "a" not in table.column_names
    assert json.loads(table.column("input_other_keys")[0].as_py()) == {"a": 1, "uid": "x"}


# --- finding 8: a 100,000-deep JSON value ---


def test_deep_json_in_a_shard_member_drops_that_samples_metadata(tmp_path: Path) -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    path = write_tar(tmp_path / "deep.tar", [("000000", {"jpg": b"\xff\xd8\xff\xd9", "txt": b"kept", "json": deep}),
                                             sample(1)])
    table = stage(path)
    assert table.column("caption").to_pylist() == ["kept", "a caption"]
    assert table.column("url").to_pylist() == [None, "http://127.0.0.1/1.jpg"]


def test_deep_json_line_fails_naming_the_line(tmp_path: Path) -> None:
    """Like any invalid line: the file fails with its line number (validation samples only the first file)."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"url": "http://127.0.0.1/a.jpg"}) + "\n")
    later = tmp_path / "b.jsonl"
    later.write_text(json.dumps({"url": "http://127.0.0.1/b.jpg"}) + "\n"
                     + '{"url": "http://127.0.0.1/c.jpg", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    config = InputConfig(path=str(tmp_path / "*.jsonl"), caption_col=None)
    sources = validate_input(config)
    with pytest.raises(CurateError, match=r"b\.jsonl:2: .*nested"):
        stage_input(config, sources, tmp_path / "staged")


# --- lines are bounded too ---


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_a_line_over_max_record_bytes_fails_unread(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"l.{fmt}"
    long = "http://127.0.0.1/" + "x" * (8 << 20)
    lines = ["http://127.0.0.1/a.jpg", long] if fmt == "txt" else [json.dumps({"url": u}) for u in ("a", long)]
    path.write_text("\n".join(lines) + "\n")
    with python_peak() as memory:
        message = error(path, caption_col=None)
    assert f"{path}:2" in message and "input.max_record_bytes" in message
    assert memory["peak"] < 6 << 20, f"peak {memory['peak'] / 2**20:.0f} MiB"


# --- found by the fuzz pass below ---


def test_duplicate_csv_header_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("url,caption,url\nhttp://127.0.0.1/a.jpg,c,http://127.0.0.1/b.jpg\n")
    assert "'url'" in error(path)


def test_odd_json_values_in_a_later_file_are_kept_as_text(tmp_path: Path) -> None:
    """A 31-digit number and a lone surrogate escape: valid JSON, but not Arrow int64 / UTF-8."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"url": "http://127.0.0.1/a.jpg"}) + "\n")
    (tmp_path / "b.jsonl").write_text('{"url": "http://127.0.0.1/b\\ud800.jpg", "n": 1' + "0" * 30
                                      + ', "\\udfff": "\\ud800"}\n')
    config = InputConfig(path=str(tmp_path / "*.jsonl"), caption_col=None)
    chunks = stage_input(config, validate_input(config), tmp_path / "staged")
    table = pa.concat_tables([pq.read_table(p) for p in chunks.files], promote_options="permissive")
    assert table.num_rows == 2
    assert table.column("n").to_pylist()[1] == "1" + "0" * 30
    assert table.column("url").to_pylist()[1] == "http://127.0.0.1/b\ufffd.jpg"


# --- fuzz pass: every case stages each input row once, or is one CurateError line naming the file ---

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_COLUMNS = 7 + 4 + 2 + 64  # base, source_*, caption_truncated and input_other_keys, 64 extra at most
MEMORY_CAP = 48 << 20  # Python allocations while staging one fuzz case (the cases are a few KiB)


FIRST_FILES = {"jsonl": b'{"url": "http://127.0.0.1/first", "caption": "first"}\n',
               "csv": b"url,caption\nhttp://127.0.0.1/first,first\n",
               "tsv": b"url\tcaption\nhttp://127.0.0.1/first\tfirst\n", "txt": b"http://127.0.0.1/first\n"}


def stage_or_error(path: Path, measure: bool = False) -> pa.Table | None:
    """A good one-row file, then ``path``, staged: the rows of ``path`` (checked for order, uniqueness and bounds),
    or None after a one-line CurateError naming it. The good file comes first because validation samples only the
    first file: the damaged one goes through staging's own error handling. ``measure``: also bound the Python
    memory it took (tar input only, see python_peak)."""
    suffix = "".join(path.suffixes)
    first = path.with_name(f"0-first{suffix}")
    plain = write_tar(first.with_name("plain.tar"), [sample(0)]).read_bytes() if suffix == ".tar" else None
    data = plain or FIRST_FILES[suffix.split(".")[1]]
    first.write_bytes(gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data)
    config = InputConfig(path=[str(first), str(path)])
    with python_peak() if measure else nullcontext({"peak": 0}) as memory:
        try:
            chunks = stage_input(config, validate_input(config), path.parent / "staged")
        except CurateError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return None
    assert memory["peak"] < MEMORY_CAP, f"peak {memory['peak'] / 2**20:.0f} MiB"
    table = pa.concat_tables([pq.read_table(p) for p in chunks.files], promote_options="permissive")
    assert table.column("row").to_pylist() == list(range(table.num_rows)) == list(range(chunks.rows))
    assert len(set(table.column("uid").to_pylist())) == table.num_rows  # no row twice
    assert all(len(c) <= DEFAULT_CAPTION_CHARS for c in table.column("caption").to_pylist() if c is not None)
    assert len(table.column_names) <= MAX_COLUMNS, len(table.column_names)
    assert table.column("url").to_pylist()[0] in ("http://127.0.0.1/first", "http://127.0.0.1/0.jpg")
    return table.slice(1)


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=24)
CAPTIONS = st.one_of(LINE_TEXT, st.integers(DEFAULT_CAPTION_CHARS - 2, DEFAULT_CAPTION_CHARS + 50).map("é".__mul__))
URLS = LINE_TEXT.map(lambda text: f"http://127.0.0.1/{text}".strip())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), LINE_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(LINE_TEXT, inner,
                                                                                                   max_size=3),
                           max_leaves=6)
EXTRA_KEYS = st.one_of(st.text("abcxyz_", max_size=6), st.sampled_from(["uid", "key", "width", "status", "source_file",
                                                                       "caption_truncated", "input_other_keys"]))
ROWS = st.lists(st.tuples(URLS, CAPTIONS, st.dictionaries(EXTRA_KEYS.filter(lambda k: k not in ("url", "caption")),
                                                          JSON_VALUES, max_size=4)), max_size=12)


def list_bytes(fmt: str, rows: list[tuple[str, str, dict]]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps({"url": u, "caption": c, **extra}) + "\n" for u, c, extra in rows).encode()
    if fmt == "txt":
        return "".join(u + "\n" for u, _, _ in rows).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["url", "caption", "note"])
    writer.writerows([u, c, str(extra)[:20]] for u, c, extra in rows)
    return buffer.getvalue().encode()


@settings(FUZZ, max_examples=120)
@given(fmt=st.sampled_from(["jsonl", "csv", "tsv", "txt"]), rows=ROWS, gz=st.booleans())
def test_fuzz_url_lists_stage_every_row_once(fmt: str, rows: list, gz: bool) -> None:
    data = list_bytes(fmt, rows)
    with scratch() as folder:
        path = folder / (f"list.{fmt}.gz" if gz else f"list.{fmt}")
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        table = stage_or_error(path)
        assert table is not None, "a well-formed list was refused"
        assert table.num_rows == len(rows)
        if rows:
            assert table.column("url").to_pylist() == [u for u, _, _ in rows]
        if fmt != "txt" and rows:
            assert table.column("caption").to_pylist() == [c[:DEFAULT_CAPTION_CHARS] for _, c, _ in rows]
        if fmt == "jsonl" and rows:
            reserved = reserved_column_names() | {"caption_truncated", "input_other_keys"}
            folded = (table.column("input_other_keys").to_pylist() if "input_other_keys" in table.column_names
                      else [None] * len(rows))
            for i, (_, _, extra) in enumerate(rows):
                for key, value in extra.items():
                    column = f"input_{key}" if key in reserved else key
                    in_column = column in table.column_names and table.column(column)[i].as_py() is not None
                    assert in_column or value is None or key in json.loads(folded[i] or "{}"), (key, value)


INSERTS = st.sampled_from([b'"', b",", b"\t", b"\n", b"\r", b"{", b"}", b"[" * 3000, b"\\ud800", b"1" * 40,
                           b"\xff\xfe", b"\x00", b'"url"', b"url,url,", b'{"url": "x"}\n', b'\x1f\x8b'])
MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), INSERTS | st.binary(max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
), min_size=1, max_size=4)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, *arg in mutations:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= 1 << arg[0]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = arg[0]
        elif kind == "delete":
            del out[at:at + arg[0]]
    return bytes(out)


@settings(FUZZ, max_examples=250)
@given(fmt=st.sampled_from(["jsonl", "csv", "tsv", "txt"]), rows=ROWS, mutations=MUTATIONS, gz=st.booleans())
def test_fuzz_mutated_url_lists_stage_or_fail_in_one_line(fmt: str, rows: list, mutations: list, gz: bool) -> None:
    plain = list_bytes(fmt, rows)
    data = mutate(gzip.compress(plain, mtime=0), mutations) if gz else mutate(plain, mutations)
    with scratch() as folder:
        path = folder / (f"list.{fmt}.gz" if gz else f"list.{fmt}")
        path.write_bytes(data)
        table = stage_or_error(path)
        if table is None or gz:
            return
        lines = data.split(b"\n")
        if fmt == "txt":  # one row per non-blank line, exactly
            assert table.num_rows == sum(1 for line in lines if line.decode("utf-8", "replace").strip())
        elif fmt == "jsonl":
            assert table.num_rows == sum(1 for line in lines if line.strip())
        else:
            assert table.num_rows <= len(lines)


IMAGE_BYTES = st.binary(max_size=48)
MEMBER_KINDS = st.sampled_from(["jpg", "png", "txt", "json", "cls", "bad_json", "deep_json", "sparse_txt"])


@st.composite
def shard_samples(draw) -> list[tuple[str, dict[str, object]]]:
    samples = []
    for i in range(draw(st.integers(0, 6))):
        key = f"{i:03d}" + draw(st.sampled_from(["", "a", "x" * 150, "dir/x", "dir/" + "y" * 120]))
        kinds = draw(st.lists(MEMBER_KINDS, min_size=1, max_size=4, unique=True))
        members: dict[str, object] = {}
        for kind in kinds:
            if kind in ("jpg", "png"):
                members[kind] = draw(IMAGE_BYTES)
            elif kind == "txt":
                members["txt"] = draw(CAPTIONS)
            elif kind == "sparse_txt" and "txt" not in kinds:
                members["txt"] = ("sparse", draw(st.integers(1, 32 << 20)))
            elif kind == "json":
                members["json"] = {"url": draw(URLS), **draw(st.dictionaries(EXTRA_KEYS, SCALARS, max_size=3))}
            elif kind in ("bad_json", "deep_json") and "json" not in kinds:
                members["json"] = b"{not json" if kind == "bad_json" else b"[" * 50_000
            elif kind == "cls":
                members["cls"] = b"7"
        samples.append((key, members))
    return samples


def shard_bytes(samples: list, fmt: int, extras: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if extras:  # members that are not samples: a folder, webdataset metadata, a file without an extension
            folder = tarfile.TarInfo("dir")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for name in ("__info__.json", "README"):
                info = tarfile.TarInfo(name)
                info.size = 3
                tar.addfile(info, io.BytesIO(b"{}\n"))
        for key, members in samples:
            for ext, value in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                if isinstance(value, tuple):  # ("sparse", declared size): 5 bytes on disk
                    data = b"hello"
                    info.pax_headers = {"GNU.sparse.map": "0,5", "GNU.sparse.size": str(value[1]),
                                        "GNU.sparse.numblocks": "1"}
                elif isinstance(value, dict):
                    data = json.dumps(value).encode()
                elif isinstance(value, str):
                    data = value.encode()
                else:
                    data = value  # type: ignore[assignment]
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = bytearray(buffer.getvalue())
    if fmt == tarfile.GNU_FORMAT:  # tarfile writes no GNU sparse header: turn the 5-byte members into one
        sparse = {f"{key}.txt": value[1] for key, members in samples for ext, value in members.items()
                  if isinstance(value, tuple)}
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
            headers = [(m.offset_data - 512, sparse[m.name]) for m in tar.getmembers() if m.name in sparse]
        for header, declared in headers:
            _field(data, header, 156, 1, b"S", checksum=False)
            _field(data, header, 386, 24, b"%011o\0%011o\0" % (0, 5), checksum=False)
            _field(data, header, 483, 12, b"%011o\0" % declared, checksum=True)
    return bytes(data)


def expected_samples(samples: list) -> list[dict[str, object]]:
    expected = []
    for key, members in samples:
        text = members.get("txt")
        meta = members.get("json")
        url = meta["url"] if isinstance(meta, dict) else None
        caption = text[:DEFAULT_CAPTION_CHARS] if isinstance(text, str) else None
        image = members.get("jpg", members.get("png"))
        expected.append({"source_key": key, "caption": caption, "url": url, "image": image})
    return expected


@settings(FUZZ, max_examples=100)
@given(samples=shard_samples(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]), extras=st.booleans())
def test_fuzz_shards_stage_every_sample_once(samples: list, fmt: int, extras: bool) -> None:
    with scratch() as folder:
        path = folder / "shard.tar"
        path.write_bytes(shard_bytes(samples, fmt, extras))
        table = stage_or_error(path, measure=True)
        assert table is not None, "a well-formed shard was refused"
        got = table.to_pylist()
        want = expected_samples(samples)
        assert [r["source_key"] for r in got] == [w["source_key"] for w in want]
        for row, wanted in zip(got, want):
            assert (row["caption"], row["url"]) == (wanted["caption"], wanted["url"])
            image = (None if row["source_offset"] is None
                     else read_member(str(path), row["source_offset"], row["source_size"]))
            assert image == wanted["image"]


def _field(data: bytearray, header: int, at: int, width: int, value: bytes, checksum: bool) -> None:
    data[header + at:header + at + width] = value.ljust(width, b"\0")[:width]
    if checksum:
        data[header + 148:header + 156] = b" " * 8
        data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])


HEADER_DAMAGE = st.one_of(
    st.tuples(st.just("size"), st.sampled_from([b"77777777777", b"\x80" + (1 << 60).to_bytes(11, "big"),
                                                b"\xff" * 12, b"-1", b"1" * 12, b"00000001000"])),
    st.tuples(st.just("type"), st.sampled_from([b"S", b"L", b"K", b"x", b"g", b"1", b"2", b"7", b"\0", b"Z"])),
    st.tuples(st.just("name"), st.sampled_from([b"\xff\xfe.txt", b"a" * 100, b"", b"../../etc/passwd.txt"])),
)


@settings(FUZZ, max_examples=250)
@given(samples=shard_samples(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       damage=st.lists(st.tuples(st.integers(0, 40), HEADER_DAMAGE, st.booleans()), max_size=2),
       mutations=st.lists(st.one_of(
           st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
           st.tuples(st.just("truncate"), st.floats(0, 1)),
           st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=600)),
       ), max_size=2))
def test_fuzz_damaged_shards_stage_or_fail_in_one_line(samples: list, fmt: int, damage: list, mutations: list) -> None:
    data = bytearray(shard_bytes(samples, fmt, extras=False))
    headers = member_offsets(bytes(data)) if samples else []
    for which, (field, value), checksum in damage:
        if headers:
            header = headers[which % len(headers)]
            at, width = {"size": (124, 12), "type": (156, 1), "name": (0, 100)}[field]
            _field(data, header, at, width, value, checksum)
    data = bytearray(mutate(bytes(data), mutations)) if mutations else data
    with scratch() as folder:
        path = folder / "shard.tar"
        path.write_bytes(bytes(data))
        table = stage_or_error(path, measure=True)
        if table is None or not table.num_rows:
            return
        for offset, size in zip(table.column("source_offset").to_pylist(), table.column("source_size").to_pylist()):
            assert offset is None or (0 <= offset and 0 <= size and offset + size <= len(data)), (offset, size)
