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
                processed = self.stage.process(alive)
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
