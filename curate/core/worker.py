"""Wraps a Stage so any executor (a Ray task, a Ray actor, or a plain loop) runs it the same way.

The wrapper hands the stage only the rows still alive, puts the rows it stopped back in order, records which stage
stopped them, and times the batch. A stage that raises despite its contract fails the batch's rows with
``<stage>:crashed`` rather than the job.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.stage import FAILED, FILTERED, OK, Stage

VALID_STATUSES = (OK, FILTERED, FAILED)

log = logging.getLogger(__name__)


class StageWorker:
    """Callable over a pyarrow batch; call ``setup()`` lazily so construction stays cheap and picklable."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._ready = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._ready:
            self.stage.setup()
            self._ready = True
        start = time.perf_counter()
        name = self.stage.name
        alive_mask = pc.equal(batch.column("status"), OK).to_numpy(zero_copy_only=False)
        alive = batch.filter(pa.array(alive_mask))
        try:
            processed = self._conform(self._process(alive) if alive.num_rows else alive, alive)
        except Exception:  # the contract says never raise; if a stage does, its rows fail, not the job
            log.exception("stage %s failed a batch of %d rows", name, alive.num_rows)
            processed = self._conform(alive, alive)
            processed = _set(processed, "status", pa.array([FAILED] * alive.num_rows, pa.string()))
            processed = _set(processed, "reason", pa.array([f"{name}:crashed"] * alive.num_rows, pa.string()))
        stopped = pc.not_equal(processed.column("status"), OK)
        decided = pc.if_else(stopped, pa.scalar(name), processed.column("decided_by"))
        processed = _set(processed, "decided_by", decided)
        result = self._merge(batch, alive_mask, processed)
        elapsed = time.perf_counter() - start
        per_row = elapsed / max(1, batch.num_rows)
        return result.append_column(f"{name}_seconds", pa.array(np.full(batch.num_rows, per_row)))

    def _conform(self, processed: pa.Table, alive: pa.Table) -> pa.Table:
        """Check what a stage returned against its declaration: same rows, declared columns and types, valid
        statuses. Rows with a status we do not know, or stopped without a reason, fail as ``<stage>:bad_status``."""
        outputs = self.stage.outputs()
        if processed.num_rows != alive.num_rows:
            raise RuntimeError(f"returned {processed.num_rows} rows for {alive.num_rows}")
        undeclared = set(processed.column_names) - set(alive.column_names) - set(outputs)
        if undeclared:
            raise RuntimeError(f"returned undeclared columns {sorted(undeclared)}")
        for column, dtype in outputs.items():
            array = processed.column(column).cast(dtype) if column in processed.column_names else pa.nulls(
                processed.num_rows, dtype)
            processed = _set(processed, column, array)
        order = list(alive.column_names) + [c for c in outputs if c not in alive.column_names]
        processed = processed.select(order)
        statuses = processed.column("status").to_pylist()
        reasons = processed.column("reason").to_pylist()
        bad = [s not in VALID_STATUSES or (s != OK and not r) for s, r in zip(statuses, reasons)]
        if any(bad):
            name = self.stage.name
            statuses = [FAILED if b else s for s, b in zip(statuses, bad)]
            reasons = [f"{name}:bad_status" if b else r for r, b in zip(reasons, bad)]
            processed = _set(processed, "status", pa.array(statuses, pa.string()))
            processed = _set(processed, "reason", pa.array(reasons, pa.string()))
        return processed

    def _process(self, alive: pa.Table) -> pa.Table:
        if self.stage.batch_format == "pyarrow":
            return self.stage.process(alive)
        columns = {name: alive.column(name).to_numpy(zero_copy_only=False) for name in alive.column_names}
        result = self.stage.process(columns)
        table = alive
        declared = {**self.stage.outputs(), "status": pa.string(), "reason": pa.string()}
        for name, values in result.items():
            if name not in declared:
                raise RuntimeError(f"returned undeclared column '{name}'")
            table = _set(table, name, pa.array(values, type=declared[name]))
        return table

    def _merge(self, batch: pa.Table, alive_mask: np.ndarray, processed: pa.Table) -> pa.Table:
        """Rows in their original order: processed ones where alive; the others keep their values, with nulls in
        the columns this stage adds."""
        if alive_mask.all():
            return processed
        passive = batch.filter(pa.array(~alive_mask))
        for column, dtype in self.stage.outputs().items():
            if column not in passive.column_names:
                passive = passive.append_column(column, pa.nulls(passive.num_rows, dtype))
        passive = passive.select(processed.column_names).cast(processed.schema)
        combined = pa.concat_tables([processed, passive])
        order = np.concatenate([np.flatnonzero(alive_mask), np.flatnonzero(~alive_mask)])
        return combined.take(pa.array(np.argsort(order, kind="stable")))


def _set(table: pa.Table, column: str, array) -> pa.Table:
    if column in table.column_names:
        return table.set_column(table.column_names.index(column), column, array)
    return table.append_column(column, array)


def run_chain(workers: list[StageWorker], table: pa.Table) -> pa.Table:
    """``table`` through each stage in turn, in slices of that stage's own batch size, all in this process."""
    for worker in workers:
        step = worker.stage.resources().batch_size
        if table.num_rows <= step:
            table = worker(table)
        else:
            table = pa.concat_tables([worker(table.slice(offset, step)) for offset in range(0, table.num_rows, step)])
    return table


def fusable(a: Stage, b: Stage) -> bool:
    """Two consecutive stages run in one worker when they ask for the same resources: same CPUs, GPUs, custom
    resources and pool size. Rows then pass from one to the next in memory, without a copy into Ray's object store
    or a process of their own (on a small machine Ray's processes cost as much CPU as the downloads)."""
    ra, rb = a.resources(), b.resources()
    return (ra.cpus, ra.gpus, ra.custom, ra.concurrency) == (rb.cpus, rb.gpus, rb.custom, rb.concurrency)


def segments(stages: list[Stage]) -> list[list[Stage]]:
    """The per-sample stages cut where consecutive stages cannot share a worker (see ``fusable``)."""
    result: list[list[Stage]] = []
    for stage in stages:
        if result and fusable(result[-1][-1], stage):
            result[-1].append(stage)
        else:
            result.append([stage])
    return result


class SegmentWorker:
    """The stages of one segment over a batch: reading its rows first when it is handed work units (the first
    segment), storing them as a part and returning only the part's summary when it is the last."""

    def __init__(self, stages: list[Stage], *, reads_units: bool, parts_folder: str | None) -> None:
        self.workers = [StageWorker(stage) for stage in stages]
        self.reads_units = reads_units
        self.parts_folder = parts_folder
        self._chunk: tuple[str, pa.Table] | None = None  # the input chunk read last: its next units come from it

    def __call__(self, batch: pa.Table) -> pa.Table:
        from curate.core.parts import write_part

        table = run_chain(self.workers, self.read_units(batch) if self.reads_units else batch)
        return write_part(table, self.parts_folder) if self.parts_folder else table

    def read_units(self, batch: pa.Table) -> pa.Table:
        """The input rows that work units name: each unit is (path, offset, rows) of a staged input chunk. A chunk
        holds several units, so the last one read is kept (URLs and captions only) instead of read again."""
        import pyarrow.parquet as pq

        tables = []
        for path, offset, rows in zip(batch.column("path").to_pylist(), batch.column("offset").to_pylist(),
                                      batch.column("rows").to_pylist()):
            if self._chunk is None or self._chunk[0] != path:
                self._chunk = (path, pq.read_table(path))
            tables.append(self._chunk[1].slice(offset, rows))
        return pa.concat_tables(tables)


def segment_class(stages: list[Stage], *, reads_units: bool, parts_folder: str | None) -> type:
    """A SegmentWorker subclass bound to its stages, constructible without arguments (Ray Data builds actors from a class;
    binding the stages in it keeps them out of the object store), named after them (DownloadStageWorker, DownloadStage+HashStageWorker) so that its actors are easy to find."""

    class BoundSegment(SegmentWorker):
        def __init__(self) -> None:
            super().__init__(stages, reads_units=reads_units, parts_folder=parts_folder)

    BoundSegment.__name__ = BoundSegment.__qualname__ = "+".join(type(s).__name__ for s in stages) + "Worker"
    return BoundSegment
