"""The stage wrapper every executor uses: alive rows only, order kept, failures as data, both batch formats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.cloudpickle as cloudpickle

from curate.core.stage import RowOutcomes, Stage
from curate.config import StageConfig
from curate.core.worker import StageWorker, segment_class


def _batch(n: int, dead: set[int] = frozenset()) -> pa.Table:
    return pa.table({
        "uid": [f"u{i}" for i in range(n)],
        "row": list(range(n)),
        "url": [f"http://127.0.0.1/{i}" for i in range(n)],
        "caption": [f"caption number {i}" if i % 3 else None for i in range(n)],
        "status": ["failed" if i in dead else "ok" for i in range(n)],
        "reason": ["download:http_404" if i in dead else None for i in range(n)],
        "decided_by": ["download" if i in dead else None for i in range(n)],
    })


class CaptionLength(Stage):
    """Counts caption words; filters rows without a caption."""

    name = "caption_length"
    Config = StageConfig

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.seen_rows: list[int] = []
        self.setups = 0

    def outputs(self):
        return {"caption_words": pa.int32()}

    def setup(self) -> None:
        self.setups += 1

    def process(self, batch: pa.Table) -> pa.Table:
        self.seen_rows.extend(batch.column("row").to_pylist())
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        for i, caption in enumerate(batch.column("caption").to_pylist()):
            if caption is None:
                outcomes.filter(i, "caption:missing")
            else:
                outcomes.set(i, "caption_words", len(caption.split()))
        return outcomes.apply(batch)


class NumpyLength(CaptionLength):
    name = "numpy_length"
    batch_format = "numpy"

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = np.array([c is None for c in batch["caption"]])
        words = np.array([0 if c is None else len(c.split()) for c in batch["caption"]], dtype=np.int32)
        return {
            "caption_words": words,
            "status": np.where(missing, "filtered", "ok"),
            "reason": np.where(missing, "caption:missing", None),
        }


class Exploding(CaptionLength):
    name = "exploding"

    def process(self, batch: pa.Table) -> pa.Table:
        raise ZeroDivisionError("a bug in a stage")


def _check(result: pa.Table, name: str) -> None:
    rows = result.to_pylist()
    assert [r["row"] for r in rows] == list(range(9))
    for r in rows:
        if r["row"] in (1, 4):  # stopped before this stage: untouched, no output
            assert (r["status"], r["reason"], r["decided_by"], r["caption_words"]) == \
                ("failed", "download:http_404", "download", None)
        elif r["caption"] is None:
            assert (r["status"], r["reason"], r["decided_by"]) == ("filtered", "caption:missing", name)
        else:
            assert (r["status"], r["reason"], r["decided_by"]) == ("ok", None, None)
            assert r["caption_words"] == 3
    assert result.column(f"{name}_seconds").null_count == 0


def test_only_alive_rows_reach_the_stage_and_order_is_kept():
    stage = CaptionLength(StageConfig(stage="caption_length"))
    worker = StageWorker(stage)
    result = worker(_batch(9, dead={1, 4}))
    assert stage.seen_rows == [0, 2, 3, 5, 6, 7, 8]
    _check(result, "caption_length")
    worker(_batch(9))
    assert stage.setups == 1  # setup once per worker, not per batch


def test_numpy_batch_format():
    _check(StageWorker(NumpyLength(StageConfig(stage="numpy_length")))(_batch(9, dead={1, 4})), "numpy_length")


def test_a_stage_that_raises_fails_its_rows_not_the_job():
    result = StageWorker(Exploding(StageConfig(stage="exploding")))(_batch(5, dead={2})).to_pylist()
    assert [r["reason"] for r in result] == ["exploding:crashed"] * 2 + ["download:http_404"] + ["exploding:crashed"] * 2
    assert all(r["status"] == "failed" for r in result)


def test_bound_worker_class_pickles_and_builds_without_arguments():
    cls = cloudpickle.loads(cloudpickle.dumps(segment_class([CaptionLength(StageConfig(stage="caption_length"))],
                                                            reads_units=False, parts_folder=None)))
    assert cls.__name__ == "CaptionLengthWorker"
    _check(cls()(_batch(9, dead={1, 4})), "caption_length")


class Misbehaving(CaptionLength):
    """Returns a status nobody knows for one row and stops another without a reason."""

    name = "misbehaving"

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = ["dropped"] + ["filtered"] + ["ok"] * (n - 2)
        batch = batch.set_column(batch.column_names.index("status"), "status", pa.array(status))
        return batch.append_column("caption_words", pa.array([1] * n, pa.int64()))  # wrong type: cast to int32


class Undeclared(CaptionLength):
    name = "undeclared"

    def process(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("surprise", pa.array([1] * batch.num_rows))


def test_bad_statuses_fail_as_bad_status_and_types_follow_the_declaration():
    result = StageWorker(Misbehaving(StageConfig(stage="misbehaving")))(_batch(5, dead={4}))
    rows = result.to_pylist()
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("failed", "misbehaving:bad_status"), ("failed", "misbehaving:bad_status"), ("ok", None), ("ok", None),
        ("failed", "download:http_404")]
    assert result.schema.field("caption_words").type == pa.int32()


def test_undeclared_columns_fail_the_rows_not_the_job():
    rows = StageWorker(Undeclared(StageConfig(stage="undeclared")))(_batch(4, dead={0})).to_pylist()
    assert [r["reason"] for r in rows] == ["download:http_404"] + ["undeclared:crashed"] * 3
    assert "surprise" not in rows[0]


class BatchSizes(CaptionLength):
    """Records the size of each batch it is handed."""

    name = "batch_sizes"

    def process(self, batch: pa.Table) -> pa.Table:
        self.sizes = getattr(self, "sizes", []) + [batch.num_rows]
        return super().process(batch)


def _stage(cls=CaptionLength, **resources) -> Stage:
    from curate.config import Resources

    return cls(StageConfig(stage=cls.name, resources=Resources(**resources)))


def test_consecutive_stages_asking_for_the_same_resources_share_a_segment():
    from curate.core.worker import segments

    a, b = _stage(cpus=0.5), _stage(cpus=0.5, batch_size=7)  # batch size is the stage's own business
    c = _stage(cpus=1.0)
    gpu, gpu_too = _stage(gpus=0.5), _stage(gpus=0.5)
    pinned, node = _stage(cpus=0.5, concurrency=2), _stage(cpus=0.5, custom={"download_node": 1})
    assert segments([a, b, c, gpu, gpu_too, b]) == [[a, b], [c], [gpu, gpu_too], [b]]
    assert segments([a, pinned, node, a]) == [[a], [pinned], [node], [a]]
    assert segments([]) == []


def test_a_segment_reads_its_units_runs_each_stage_at_its_batch_size_and_stores_one_part(tmp_path):
    import pyarrow.parquet as pq

    from curate.core.parts import part_files
    from curate.core.runner import work_units
    from curate.core.worker import SegmentWorker

    chunk = tmp_path / "input" / "00000.parquet"
    chunk.parent.mkdir()
    pq.write_table(_batch(9, dead={1, 4}), chunk)
    units = work_units([chunk], 5)
    assert units == [{"path": str(chunk), "offset": 0, "rows": 5}, {"path": str(chunk), "offset": 5, "rows": 4}]
    first, second = _stage(BatchSizes, batch_size=2), _stage(NumpyLength, batch_size=3)
    worker = SegmentWorker([first, second], reads_units=True, parts_folder=str(tmp_path / "parts"))
    summaries = [worker(pa.Table.from_pylist([unit])).to_pylist() for unit in units]
    assert [s[0]["rows"] for s in summaries] == [5, 4]
    assert first.sizes == [1, 2, 2, 2]  # alive rows of each slice of 2: rows 0-1 (1 dead), 2-3, 5-6, 7-8 (4 dead)
    stored = pa.concat_tables([pq.read_table(p) for p in part_files(tmp_path)])
    assert stored.column("row").to_pylist() == list(range(9))
    assert {"batch_sizes_seconds", "numpy_length_seconds", "caption_words"} <= set(stored.column_names)
    # for a Ray actor: built without arguments, named after its stages
    bound = cloudpickle.loads(cloudpickle.dumps(segment_class([first, second], reads_units=False, parts_folder=None)))
    assert bound.__name__ == "BatchSizes+NumpyLengthWorker"
    assert bound()(_batch(4)).column("row").to_pylist() == [0, 1, 2, 3]
