"""End to end in-process (no Ray): a pool with planted faults → ledger, shards, manifest that keep the promise."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.core.ledger import check_run, read_ledger, read_manifest
from curate.core.runner import run_pipeline
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig
from curate.stages import STAGES

EXPECTED = {
    "clean": ("kept", None),
    "misaligned": ("kept", None),
    "exact_duplicate": ("kept", None),
    "near_duplicate": ("kept", None),
    "alpha": ("kept", None),
    "flaky": ("kept", None),
    "redirect": ("kept", None),
    "http_404": ("failed", "download:http_404"),
    "http_403": ("failed", "download:http_403"),
    "http_500": ("failed", "download:http_500"),
    "slow": ("failed", "download:timeout"),
    "truncated": ("failed", "decode:truncated"),
    "bomb": ("failed", "decode:too_many_pixels"),
    "not_an_image": ("failed", "decode:not_an_image"),
    "too_small": ("failed", "resize:too_small"),
    "extreme_aspect": ("failed", "resize:aspect_ratio"),
}


@pytest.fixture(scope="module")
def local_run(url_list, make_pipeline, tmp_path_factory, fault_server):
    out = tmp_path_factory.mktemp("local") / "run"
    result = run_pipeline(make_pipeline(), input_path=str(url_list), output=out, local=True, progress=False)
    return result


def test_every_row_ends_as_expected(local_run, url_list):
    ledger = read_ledger(local_run.out).to_pylist()
    kinds = {row["url"]: row["kind"] for row in pq.read_table(url_list).to_pylist()}
    assert len(ledger) == len(kinds)
    for row in ledger:
        assert (row["status"], row["reason"]) == EXPECTED[kinds[row["url"]]], row


def test_invariant_holds(local_run):
    assert check_run(local_run.out) == []


def test_shards_read_with_plain_webdataset(local_run):
    manifest = read_manifest(local_run.out)
    ledger = {r["uid"]: r for r in read_ledger(local_run.out).to_pylist()}
    seen = []
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(local_run.out / shard.path), shardshuffle=False):
            meta = json.loads(sample["json"])
            row = ledger[meta["uid"]]
            assert sample["__key__"] == row["key"] == meta["key"]
            assert sample["txt"].decode() == (row["caption"] or "")
            assert sample["jpg"][:2] == b"\xff\xd8"
            assert meta["width"] == meta["height"] == 128  # border mode pads to a square
            assert meta["url"] == row["url"] and len(meta["sha256"]) == 64
            seen.append(meta["uid"])
    assert sorted(seen) == sorted(uid for uid, r in ledger.items() if r["status"] == "kept")
    assert len(manifest.shards) == -(-len(seen) // 40)  # samples_per_shard=40


def test_manifest_counts_and_index(local_run):
    manifest = read_manifest(local_run.out)
    ledger = read_ledger(local_run.out)
    reasons = Counter(r for r in ledger.column("reason").to_pylist() if r)
    assert manifest.totals_by_reason == dict(reasons)
    assert manifest.stages[0].name == "download" and manifest.stages[0].rows_in == ledger.num_rows
    assert manifest.stages[-1].rows_out == manifest.totals_by_status["kept"]
    for shard in manifest.shards:
        index = pq.read_table(local_run.out / shard.index)
        assert index.num_rows == shard.samples and "image" not in index.column_names
        assert index.schema.metadata[b"tar_sha256"].decode() == shard.sha256


def test_rerun_fetches_nothing_and_redoes_no_shard(local_run, url_list, make_pipeline, fault_server):
    tars = {p: p.stat().st_mtime_ns for p in (local_run.out / "shards").glob("*.tar")}
    before = read_ledger(local_run.out)
    fault_server.reset_counts()
    run_pipeline(make_pipeline(), input_path=str(url_list), output=local_run.out, local=True, progress=False)
    assert sum(fault_server.requests.values()) == 0
    assert {p: p.stat().st_mtime_ns for p in (local_run.out / "shards").glob("*.tar")} == tars
    assert read_ledger(local_run.out).equals(before)


class KeepFirstCaption(GlobalStage):
    """Test-only global stage: of rows sharing a caption, keep the smallest uid."""

    name = "keep_first_caption"

    class Config(StageConfig):
        stage: str = "keep_first_caption"

    def inputs(self) -> list[str]:
        return ["caption"]

    def decide(self, metadata: pa.Table) -> Removals:
        first: dict[str, str] = {}
        removed = []
        for row in sorted(metadata.to_pylist(), key=lambda r: r["uid"]):
            if row["caption"] in first:
                removed.append(row["uid"])
            else:
                first[row["caption"]] = row["uid"]
        return Removals.of(removed, "test:same_caption")


def test_global_stage_decides_over_stored_metadata(url_list, make_pipeline, tmp_path, monkeypatch, fault_server):
    monkeypatch.setitem(STAGES, "keep_first_caption", KeepFirstCaption)
    config = make_pipeline()
    config.stages.append(KeepFirstCaption.Config())
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    assert check_run(out) == []
    ledger = read_ledger(out).to_pylist()
    kept_captions = [r["caption"] for r in ledger if r["status"] == "kept"]
    assert len(kept_captions) == len(set(kept_captions))
    removed = [r for r in ledger if r["reason"] == "test:same_caption"]
    assert removed and all(r["status"] == "filtered" for r in removed)
    manifest = read_manifest(out)
    assert [s.name for s in manifest.stages] == ["download", "keep_first_caption", "write"]
    assert manifest.stages[1].rows_in - manifest.stages[1].rows_out == len(removed)
