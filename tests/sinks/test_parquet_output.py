"""output.format parquet: the same kept samples as the WebDataset shards, each shard one parquet with the image bytes,
listed in the manifest, skipped on rerun, and read by `curate train` and `curate eval` as the tars are."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curate.core.ledger import check_run, read_manifest
from curate.core.pipeline import load_pipeline
from curate.core.runner import run_pipeline
from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.train.config import load_train_config
from curate.train.data import shard_list
from curate.train.eval import load_pairs
from curate.train.loop import batch_stream, build_model, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parquet_run(url_list, make_pipeline, tmp_path_factory, fault_server) -> Path:
    """The demo pool curated as conftest's curated_shards is, written as parquet shards."""
    out = tmp_path_factory.mktemp("parquet") / "run"
    run_pipeline(make_pipeline("output.format=parquet"), input_path=str(url_list), output=out, local=True,
                 progress=False)
    return out


def tar_samples(shards: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def test_parquet_shards_hold_exactly_the_samples_the_tars_hold(parquet_run, curated_shards) -> None:
    manifest = read_manifest(parquet_run)
    assert manifest is not None and manifest.output_format == "parquet"
    assert check_run(parquet_run) == []
    assert [s.path for s in manifest.shards] == [f"shards/{i:05d}.parquet" for i in range(len(manifest.shards))]
    assert not list((parquet_run / "shards").glob("*.tar"))
    table = pa.concat_tables([pq.read_table(parquet_run / s.path) for s in manifest.shards])
    assert table.column_names[:4] == ["key", "image", "image_ext", "caption"]
    assert table.schema.field("image").type == pa.binary()
    assert not [c for c in table.column_names if c.endswith("_embedding")]
    tars = tar_samples(curated_shards)
    assert sorted(table.column("key").to_pylist()) == sorted(tars)
    for row in table.select(["key", "image", "image_ext", "caption", "uid"]).to_pylist():
        sample = tars[row["key"]]
        assert sample[row["image_ext"]] == row["image"]
        assert sample["txt"].decode() == row["caption"]
        assert json.loads(sample["json"])["uid"] == row["uid"]


def test_a_rerun_keeps_the_shards_and_a_format_switch_leaves_no_other_format(parquet_run, url_list, make_pipeline,
                                                                            tmp_path, fault_server) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in (parquet_run / "shards").iterdir()}
    manifest = run_pipeline(make_pipeline("output.format=parquet"), input_path=str(url_list), output=parquet_run,
                            local=True, progress=False).manifest
    assert {p.name: p.stat().st_mtime_ns for p in (parquet_run / "shards").iterdir()} == stamps  # all skipped
    assert check_run(parquet_run) == []

    out = tmp_path / "switch"
    run_pipeline(make_pipeline(), input_path=str(url_list), output=out, local=True, progress=False)
    run_pipeline(make_pipeline("output.format=parquet"), input_path=str(url_list), output=out, local=True,
                 progress=False)
    assert not list((out / "shards").glob("*.tar")) and check_run(out) == []
    assert [s.sha256 for s in read_manifest(out).shards] == [s.sha256 for s in manifest.shards]  # same bytes
    run_pipeline(make_pipeline(), input_path=str(url_list), output=out, local=True, progress=False)
    assert read_manifest(out).output_format == "webdataset" and check_run(out) == []


def test_training_reads_parquet_shards_as_it_reads_the_tars(parquet_run, curated_shards, tmp_path) -> None:
    parquet = shard_list(str(parquet_run))  # a run folder: the shards its manifest lists
    assert parquet == [str(parquet_run / s.path) for s in read_manifest(parquet_run).shards]
    tars = shard_list(str(curated_shards))
    cfg = load_train_config(None, ["model=curate-tiny", "batch_size=8", "shuffle_buffer=50", "workers=0",
                                   f"data={parquet_run}", f"output={tmp_path / 'train'}"])
    _, preprocess, tokenizer, _ = build_model(ClipSpec("curate-tiny"), ["clip"], "cpu")
    streams = [batch_stream(urls, preprocess, tokenizer, cfg, {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0,
                                                                "skipped": 0}) for urls in (parquet, tars)]
    for _ in range(12):  # the same captions in the same order, batch by batch, across an epoch boundary
        from_parquet, from_tars = (next(s) for s in streams)
        assert torch.equal(from_parquet.texts, from_tars.texts)
        assert from_parquet.images.shape == from_tars.images.shape
    result = train(load_train_config(None, ["model=curate-tiny", "batch_size=16", "steps=3", "warmup_steps=1",
                                            f"data={parquet_run}", f"output={tmp_path / 'train'}"]), progress=False)
    assert result.checkpoint.exists()
    pairs = load_pairs(parquet)
    assert len(pairs) == read_manifest(parquet_run).totals_by_status["kept"]


def test_an_unknown_format_is_one_line_before_any_work(tmp_path) -> None:
    with pytest.raises(CurateError, match=r"output.format: unknown format 'parquets' \(did you mean 'parquet'\?\)"):
        load_pipeline(REPO / "pipelines" / "demo.yaml", ["output.format=parquets"])
