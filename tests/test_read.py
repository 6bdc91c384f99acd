"""Reading URL lists (parquet, csv, tsv, jsonl, txt) into uid-tagged, resumable input chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import InputConfig
from curate.errors import CurateError
from curate.core.schema import BASE_COLUMNS
from curate.inputs.chunks import InputChunks, stage_input
from curate.inputs.formats import validate_input

URLS = [f"http://127.0.0.1/img/{i:06d}.jpg" for i in range(7)]
CAPTIONS = [f"caption {i}, with a comma" for i in range(7)]
SCORES = [str(i * 10) for i in range(7)]


def write_list(path: Path, fmt: str, urls: list[str] = URLS, captions: list[str] = CAPTIONS,
               url_col: str = "url", caption_col: str = "caption") -> Path:
    """Writes the same rows (plus an extra 'score' column) in the given format."""
    rows = [{url_col: u, caption_col: c, "score": s} for u, c, s in zip(urls, captions, SCORES)]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        quote = (lambda v: f'"{v}"') if fmt == "csv" else (lambda v: v)
        lines = [sep.join([url_col, caption_col, "score"])]
        lines += [sep.join([r[url_col], quote(r[caption_col]), r["score"]]) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "txt":
        path.write_text("".join(u + "\n" for u in urls))
    return path


def stage(folder: Path, **config) -> tuple[InputChunks, pa.Table]:
    cfg = InputConfig(**config)
    chunks = stage_input(cfg, validate_input(cfg), folder)
    table = pa.concat_tables([pq.read_table(p) for p in chunks.files], promote_options="permissive")
    return chunks, table


def error(**config) -> str:
    cfg = InputConfig(**config)
    with pytest.raises(CurateError) as info:
        stage_input(cfg, validate_input(cfg), Path(config.get("path", ".")).parent / "out-error")
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_every_format(tmp_path: Path, fmt: str) -> None:
    source = write_list(tmp_path / f"list.{fmt}", fmt)
    chunks, table = stage(tmp_path / "out", path=str(source))
    assert chunks.rows == table.num_rows == len(URLS) and not chunks.reused
    assert list(table.column_names[:7]) == list(BASE_COLUMNS)
    assert table.column("url").to_pylist() == URLS
    assert table.column("row").to_pylist() == list(range(len(URLS)))
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("reason").null_count == table.column("decided_by").null_count == len(URLS)
    if fmt == "txt":
        assert table.column("caption").null_count == len(URLS)
    else:
        assert table.column("caption").to_pylist() == CAPTIONS
        assert [str(v) for v in table.column("score").to_pylist()] == SCORES  # extra columns kept
    assert table.schema.field("uid").type == pa.string()
    assert len(set(table.column("uid").to_pylist())) == len(URLS)


def test_several_files_in_sorted_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_list(src / "b.jsonl", "jsonl", URLS[3:], CAPTIONS[3:])
    write_list(src / "a.csv", "csv", URLS[:3], CAPTIONS[:3])
    (src / "notes.md").write_text("ignored: not a list format\n")
    for i, path in enumerate([str(src), str(src / "*")]):
        if i == 1:
            (src / "notes.md").unlink()
        _, table = stage(tmp_path / f"out{i}", path=path)
        assert table.column("url").to_pylist() == URLS
        assert table.column("row").to_pylist() == list(range(len(URLS)))
        assert len(set(table.column("uid").to_pylist())) == len(URLS)


def test_list_of_paths(tmp_path: Path) -> None:
    a = write_list(tmp_path / "a.parquet", "parquet", URLS[:4], CAPTIONS[:4])
    b = write_list(tmp_path / "b.txt", "txt", URLS[4:])
    _, table = stage(tmp_path / "out", path=[str(b), str(a)])  # sorted per item, not across items
    assert table.column("url").to_pylist() == URLS[4:] + URLS[:4]
    assert table.column("row").to_pylist() == list(range(len(URLS)))


def test_uids_are_stable_and_unique_for_repeated_urls(tmp_path: Path) -> None:
    source = write_list(tmp_path / "l.parquet", "parquet", [URLS[0]] * 7)
    _, first = stage(tmp_path / "one", path=str(source))
    _, second = stage(tmp_path / "two", path=str(source))
    uids = first.column("uid").to_pylist()
    assert len(set(uids)) == 7 and uids == second.column("uid").to_pylist()
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids)


def test_chunking_by_rows_per_chunk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_list(src / "a.parquet", "parquet", URLS[:5], CAPTIONS[:5])
    write_list(src / "b.parquet", "parquet", URLS[5:], CAPTIONS[5:])
    chunks, table = stage(tmp_path / "out", path=str(src), rows_per_chunk=3)
    assert [p.name for p in chunks.files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in chunks.files] == [3, 3, 1]  # chunks span file boundaries
    assert table.column("row").to_pylist() == list(range(7))


def test_rerun_reuses_chunks(tmp_path: Path) -> None:
    source = write_list(tmp_path / "l.csv", "csv")
    first, table = stage(tmp_path / "out", path=str(source), rows_per_chunk=4)
    mtimes = [p.stat().st_mtime_ns for p in first.files]
    again, table2 = stage(tmp_path / "out", path=str(source), rows_per_chunk=4)
    assert again.reused and again.rows == first.rows and again.files == first.files
    assert [p.stat().st_mtime_ns for p in again.files] == mtimes
    assert table2.equals(table)
    # other settings: staged again, old chunks replaced
    other, _ = stage(tmp_path / "out", path=str(source), rows_per_chunk=2)
    assert not other.reused and len(other.files) == 4
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [p.name for p in other.files]


def test_changed_source_is_staged_again(tmp_path: Path) -> None:
    source = write_list(tmp_path / "l.txt", "txt", URLS[:2])
    stage(tmp_path / "out", path=str(source))
    write_list(source, "txt", URLS)
    os.utime(source, (1, 1))  # a different mtime even on coarse clocks
    chunks, table = stage(tmp_path / "out", path=str(source))
    assert not chunks.reused and table.column("url").to_pylist() == URLS


def test_custom_columns(tmp_path: Path) -> None:
    source = write_list(tmp_path / "l.parquet", "parquet", url_col="URL", caption_col="TEXT")
    _, table = stage(tmp_path / "out", path=str(source), url_col="URL", caption_col="TEXT")
    assert table.column("url").to_pylist() == URLS and table.column("caption").to_pylist() == CAPTIONS
    assert "URL" not in table.column_names and "TEXT" not in table.column_names
    _, no_caption = stage(tmp_path / "out2", path=str(source), url_col="URL", caption_col=None)
    assert no_caption.column("caption").null_count == len(URLS)
    assert no_caption.column("TEXT").to_pylist() == CAPTIONS  # not the caption: kept as an extra column


def test_nested_extra_columns_become_json_text(tmp_path: Path) -> None:
    source = tmp_path / "l.jsonl"
    source.write_text("".join(json.dumps({"url": u, "caption": "c", "meta": {"i": i}}) + "\n"
                              for i, u in enumerate(URLS[:2])))
    _, table = stage(tmp_path / "out", path=str(source))
    assert [json.loads(v) for v in table.column("meta").to_pylist()] == [{"i": 0}, {"i": 1}]


def test_jsonl_keeps_keys_missing_from_first_line(tmp_path: Path) -> None:
    """A key that the first line lacks is still a column (JSON lines need not share keys)."""
    source = tmp_path / "l.jsonl"
    source.write_text(json.dumps({"url": URLS[0], "caption": "a"}) + "\n"
                      + json.dumps({"url": URLS[1], "caption": "b", "license": "cc-by"}) + "\n")
    _, table = stage(tmp_path / "out", path=str(source))
    assert table.column("license").to_pylist() == [None, "cc-by"]


# --- errors: one CurateError line each ---


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in error(path=str(tmp_path / "nope.parquet"))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    assert "no such file" in error(path=str(tmp_path / "*.parquet"))


def test_no_input_given() -> None:
    assert "input.path" in error(path=None)


def test_folder_without_lists(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    assert "folder holds no" in error(path=str(tmp_path))


def test_wrong_column_lists_real_columns(tmp_path: Path) -> None:
    source = write_list(tmp_path / "l.csv", "csv")
    message = error(path=str(source), url_col="URL")
    assert "'URL'" in message and "input.url_col" in message and "url, caption, score" in message
    message = error(path=str(source), caption_col="TEXT")
    assert "'TEXT'" in message and "input.caption_col" in message and "url, caption, score" in message


def test_unknown_extension(tmp_path: Path) -> None:
    source = tmp_path / "urls.xlsx"
    source.write_text("x")
    message = error(path=str(source))
    assert "'.xlsx'" in message and "input.format" in message


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    source = write_list(tmp_path / "urls.list", "txt")
    _, table = stage(tmp_path / "out", path=str(source), format="txt")
    assert table.column("url").to_pylist() == URLS


@pytest.mark.parametrize("bad_line", ['{"url": "http://x/1", ', "[1, 2]", '"just a string"'])
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    source = tmp_path / "l.jsonl"
    source.write_text(json.dumps({"url": URLS[0], "caption": "a"}) + "\n\n" + bad_line + "\n")
    assert f"{source}:3" in error(path=str(source))


def test_malformed_jsonl_in_a_later_file(tmp_path: Path) -> None:
    write_list(tmp_path / "a.jsonl", "jsonl")
    (tmp_path / "b.jsonl").write_text('{"url": "http://x/1", "caption": "a"}\nnot json\n')
    cfg = InputConfig(path=str(tmp_path / "*.jsonl"))
    sources = validate_input(cfg)  # only the first file is sampled
    with pytest.raises(CurateError, match=r"b\.jsonl:2"):
        stage_input(cfg, sources, tmp_path / "out")


def test_unreadable_parquet(tmp_path: Path) -> None:
    source = tmp_path / "l.parquet"
    source.write_bytes(b"this is not parquet")
    assert "cannot read as parquet" in error(path=str(source))


def test_same_file_name_in_two_folders_gives_distinct_uids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"url": ["http://127.0.0.1/x.jpg"] * 3, "caption": ["x"] * 3}),
                       tmp_path / folder / "urls.parquet")
    config = InputConfig(path=str(tmp_path / "*" / "urls.parquet"))
    chunks = stage_input(config, validate_input(config), tmp_path / "staged")
    uids = pa.concat_tables([pq.read_table(p) for p in chunks.files]).column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 6
    twice = InputConfig(path=[str(tmp_path / "a" / "urls.parquet")] * 2)
    assert len(validate_input(twice)) == 1  # the same file named twice is read once


def test_odd_and_reserved_extra_columns_are_kept_under_safe_names(tmp_path):
    import datetime

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({
        "url": ["http://127.0.0.1/a.jpg"], "caption": ["a"], "uid": ["datacomp-uid"], "key": ["k1"],
        "width": [640], "taken": [datetime.datetime(2020, 1, 2, 3, 4, 5)], "blob": [b"\x00\x01"],
    }), path)
    config = InputConfig(path=str(path))
    table = pq.read_table(stage_input(config, validate_input(config), tmp_path / "staged").files[0])
    row = table.to_pylist()[0]
    assert row["input_uid"] == "datacomp-uid" and row["input_key"] == "k1" and row["input_width"] == 640
    assert row["uid"] != "datacomp-uid" and "2020-01-02" in row["taken"] and isinstance(row["blob"], str)


def test_fsspec_urls_are_read(tmp_path):
    """Any fsspec filesystem works for the list (memory:// here; s3:// and gs:// with their packages)."""
    import fsspec

    with fsspec.open("memory://lists/part-0.parquet", "wb") as handle:
        pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"],
                                 "caption": ["a", "b"]}), handle)
    config = InputConfig(path="memory://lists/*.parquet")
    sources = validate_input(config)
    assert sources == ["memory:///lists/part-0.parquet"]
    table = pq.read_table(stage_input(config, sources, tmp_path / "staged").files[0])
    assert table.column("caption").to_pylist() == ["a", "b"]
