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

from curate.stage import FAILED, OK, Stage

log = logging.getLogger(__name__)


def _null_columns(stage: Stage, n: int) -> dict[str, pa.Array]:
    return {name: pa.nulls(n, dtype) for name, dtype in stage.outputs().items()}


def worker_class(stage: Stage) -> type:
    """A StageWorker subclass bound to ``stage``, constructible without arguments.

    Ray Data builds actors from a class; binding the stage in the class (pickled by value) instead of passing it as a
    constructor argument keeps it out of the object store, and names the actors after the stage.
    """

    class BoundWorker(StageWorker):
        def __init__(self) -> None:
            super().__init__(stage)

    BoundWorker.__name__ = BoundWorker.__qualname__ = f"{type(stage).__name__}Worker"
    return BoundWorker


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
        if alive.num_rows:
            try:
                processed = self._process(alive)
                if processed.num_rows != alive.num_rows:
                    raise RuntimeError(f"returned {processed.num_rows} rows for {alive.num_rows}")
            except Exception:  # the contract says never raise; if a stage does, its rows fail, not the job
                log.exception("stage %s raised on a batch of %d rows", name, alive.num_rows)
                processed = alive
                for column, array in _null_columns(self.stage, alive.num_rows).items():
                    processed = processed.append_column(column, array)
                n = alive.num_rows
                processed = processed.set_column(processed.column_names.index("status"), "status", pa.array([FAILED] * n))
                processed = processed.set_column(
                    processed.column_names.index("reason"), "reason", pa.array([f"{name}:crashed"] * n)
                )
        else:
            processed = alive
            for column, array in _null_columns(self.stage, 0).items():
                processed = processed.append_column(column, array)
        stopped = pc.not_equal(processed.column("status"), OK)
        decided = pc.if_else(stopped, pa.scalar(name), processed.column("decided_by"))
        processed = processed.set_column(processed.column_names.index("decided_by"), "decided_by", decided)
        result = self._merge(batch, alive_mask, processed)
        elapsed = time.perf_counter() - start
        per_row = elapsed / max(1, batch.num_rows)
        return result.append_column(f"{name}_seconds", pa.array(np.full(batch.num_rows, per_row)))

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
            array = pa.array(values, type=declared[name])
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, array)
            else:
                table = table.append_column(name, array)
        for name, dtype in self.stage.outputs().items():
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, dtype))
        return table

    def _merge(self, batch: pa.Table, alive_mask: np.ndarray, processed: pa.Table) -> pa.Table:
        """Rows in their original order: processed ones where alive, the others with null outputs."""
        if alive_mask.all():
            return processed
        passive = batch.filter(pa.array(~alive_mask))
        for column, array in _null_columns(self.stage, passive.num_rows).items():
            if column in passive.column_names:
                passive = passive.set_column(passive.column_names.index(column), column, array)
            else:
                passive = passive.append_column(column, array)
        passive = passive.select(processed.column_names).cast(processed.schema)
        combined = pa.concat_tables([processed, passive])
        order = np.concatenate([np.flatnonzero(alive_mask), np.flatnonzero(~alive_mask)])
        return combined.take(pa.array(np.argsort(order, kind="stable")))
