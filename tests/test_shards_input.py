"""Existing WebDataset shards as input: curate what img2dataset (or a previous run) already downloaded, no network."""

from __future__ import annotations

import io
import json

import webdataset as wds
from PIL import Image

from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline


def _jpeg(colour, size=(120, 90), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def test_img2dataset_and_datacomp_layouts(tmp_path, make_pipeline):
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "000000000", "jpg": _jpeg("red"), "txt": "a red square",
                    "json": {"url": "http://example.org/red.jpg", "uid": "dc-0", "key": "000000000", "status": "success"}})
        sink.write({"__key__": "000000001", "png": _jpeg("blue", fmt="PNG"), "txt": "a blue square",
                    "json": {"url": "http://example.org/blue.png", "uid": "dc-1"}})
        sink.write({"__key__": "000000002", "txt": "no image here", "json": {"url": "http://example.org/x"}})
        sink.write({"__key__": "000000003", "jpg": b"not a jpeg", "txt": "broken"})
    out = tmp_path / "out"
    run_pipeline(make_pipeline("download.image_size=64"), input_path=str(shard), output=out, local=True,
                 progress=False)
    assert check_run(out) == []
    rows = {r["caption"]: r for r in read_ledger(out).to_pylist()}
    assert (rows["a red square"]["status"], rows["a blue square"]["status"]) == ("kept", "kept")
    assert rows["no image here"]["reason"] == "read:no_image"
    assert rows["broken"]["reason"] == "decode:not_an_image"
    samples = list(wds.WebDataset(str(out / "shards" / "00000.tar"), shardshuffle=False))
    metas = {json.loads(s["json"])["input_uid"]: json.loads(s["json"]) for s in samples}
    assert set(metas) == {"dc-0", "dc-1"}  # DataComp's uid kept under a name that cannot clash with ours
    assert metas["dc-0"]["url"] == "http://example.org/red.jpg" and metas["dc-0"]["input_status"] == "success"
    assert metas["dc-1"]["source_format"] == "png" and metas["dc-1"]["width"] == 64


def test_a_previous_run_is_recurated_without_fetching(tmp_path, url_list, make_pipeline, fault_server):
    first = tmp_path / "first"
    run_pipeline(make_pipeline(), input_path=str(url_list), output=first, local=True, progress=False)
    kept = {r["url"] for r in read_ledger(first).to_pylist() if r["status"] == "kept"}
    fault_server.reset_counts()
    second = tmp_path / "second"
    run_pipeline(make_pipeline("download.image_size=48", "download.resize_mode=center_crop"),
                 input_path=str(first / "shards" / "*.tar"), output=second, local=True, progress=False)
    assert sum(fault_server.requests.values()) == 0
    assert check_run(second) == []
    ledger = read_ledger(second).to_pylist()
    assert {r["url"] for r in ledger if r["status"] == "kept"} == kept
    sample = next(iter(wds.WebDataset(str(second / "shards" / "00000.tar"), shardshuffle=False)))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (48, 48)


def test_a_url_list_cannot_point_the_downloader_at_local_files(tmp_path, make_pipeline):
    """source_* columns in a URL list are the list's own data, renamed; they never make the stage read a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg("green"))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/none.jpg"], "caption": ["x"], "source_file": [str(secret)],
                             "source_offset": [0], "source_size": [secret.stat().st_size]}), urls)
    out = tmp_path / "out"
    run_pipeline(make_pipeline("download.retries=0"), input_path=str(urls), output=out, local=True, progress=False)
    assert read_ledger(out).to_pylist()[0]["status"] == "failed"
