"""The stage contracts.

A per-sample ``Stage`` transforms a batch of rows and records, per row, whether the row goes on. A ``GlobalStage``
decides over the stored metadata of the whole pool (dedup, quantile filters) and never touches images.
Stages never talk to Ray: they declare their columns and resources and the runner places them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from curate.pool import Pool

# Row status while a pipeline runs: "ok" rows are still alive. The ledger turns the survivors into "kept".
OK, KEPT, FILTERED, FAILED = "ok", "kept", "filtered", "failed"
FINAL_STATUSES = (KEPT, FILTERED, FAILED)


class Resources(BaseModel):
    """What one worker of a stage needs; the runner turns this into Ray resources and pool sizes."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed)")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved per worker (fractions allowed)")
    batch_size: int = Field(128, ge=1, description="rows per batch handed to process()")
    concurrency: int | None = Field(
        None, ge=1, description="workers (actor pool size); default: as many as the cluster's CPUs allow"
    )
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. download_node")


class StageConfig(BaseModel):
    """Base of every stage's config: the ``stage`` name plus its resources. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    resources: Resources = Field(default_factory=Resources)


class RowOutcomes:
    """Collects one stage's per-row results for a batch, then builds the output columns.

    Stages call ``fail(i, reason)`` or ``filter(i, reason)`` for rows that stop here and ``set(i, column, value)``
    for the values they produce; rows never raise.
    """

    def __init__(self, n_rows: int, columns: dict[str, pa.DataType]) -> None:
        self.n_rows = n_rows
        self.columns = columns
        self.values: dict[str, list[Any]] = {name: [None] * n_rows for name in columns}
        self.status: list[str] = [OK] * n_rows
        self.reason: list[str | None] = [None] * n_rows

    def set(self, i: int, column: str, value: Any) -> None:
        self.values[column][i] = value

    def fail(self, i: int, reason: str) -> None:
        self.status[i], self.reason[i] = FAILED, reason

    def filter(self, i: int, reason: str) -> None:
        self.status[i], self.reason[i] = FILTERED, reason

    def apply(self, batch: pa.Table) -> pa.Table:
        """The batch with this stage's columns set and the status/reason of stopped rows updated."""
        for name, dtype in self.columns.items():
            array = pa.array(self.values[name], type=dtype)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, array)
            else:
                batch = batch.append_column(name, array)
        status = np.asarray(self.status, dtype=object)
        reason = np.asarray(self.reason, dtype=object)
        batch = batch.set_column(batch.column_names.index("status"), "status", pa.array(status, pa.string()))
        return batch.set_column(batch.column_names.index("reason"), "reason", pa.array(reason, pa.string()))


class Stage(ABC):
    """A per-sample stage.

    Subclasses set ``name`` and ``Config`` (a ``StageConfig`` subclass), keep ``__init__`` cheap and picklable,
    load heavy state (clients, models, thread pools) in ``setup()``, and implement ``process``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    # "pyarrow": process() gets and returns a pa.Table. "numpy": it gets a dict of column → np.ndarray and returns a
    # dict with the output columns and, optionally, "status" and "reason" arrays.
    batch_format: ClassVar[str] = "pyarrow"
    # The reason domains this stage stops rows with, in the order it applies them, each with the word for rows that
    # got past it: the funnel prints "downloaded → decoded → resized" from these.
    funnel: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    def inputs(self) -> list[str]:
        """Columns this stage reads; the pipeline check fails if no earlier step produces one of them."""
        return []

    def outputs(self) -> dict[str, pa.DataType]:
        """Columns this stage adds, with their Arrow types."""
        return {}

    def resources(self) -> Resources:
        return self.config.resources

    def retryable(self, reason: str) -> bool:
        """Whether a row this stage failed with ``reason`` may succeed if tried again (`curate run --retry-failed`)."""
        return False

    def preflight(self) -> None:
        """Runs once in the driver before any work: check what config validation cannot (files, model specs,
        weights) and raise CurateError with one line a person can act on."""

    def has_setup(self) -> bool:
        """Stages that override setup() keep state per worker, so the runner gives them an actor pool."""
        return type(self).setup is not Stage.setup

    def setup(self) -> None:
        """Runs once per worker before the first batch: load models, open clients, start thread pools."""

    @abstractmethod
    def process(self, batch: Any) -> Any:
        """Process the rows of ``batch`` that are still alive (the runner passes only ``status == "ok"`` rows).

        Return the same rows in the same order, with this stage's ``outputs()`` columns added and, for rows that stop
        here, ``status`` set to ``failed`` or ``filtered`` and ``reason`` to a machine-readable ``"<domain>:<what>"``
        string. Never raise for a bad row. The batch is a pa.Table, or a dict of numpy arrays when
        ``batch_format == "numpy"``.
        """


class GlobalStage(ABC):
    """A decision over the stored metadata of the whole pool (dedup, quantile thresholds).

    Global stages see metadata columns only (never image bytes), so they are cheap to rerun with a new config.
    A stage implements one of two methods. ``decide(metadata)`` gets the live rows' declared columns gathered into
    one table in the driver: right for decisions over a whole column (thresholds, rules), whose columns are small.
    ``decide_pool(pool)`` gets the pool itself (curate.pool) and reads it in tasks: right for dedup, where the driver
    should receive pairs of rows, not every row's fingerprints.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    # Filters (rules, thresholds) are also run over the whole live pool, so the manifest can count everything each
    # rule would reject on its own; dedup decisions depend on the group and are not.
    counts_would_reject: ClassVar[bool] = False
    # Stages whose work runs as Ray tasks (curate.fan_out): a run on Ray joins Ray before deciding.
    fans_out: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and \
                cls.decide is GlobalStage.decide and cls.decide_pool is GlobalStage.decide_pool:
            raise TypeError(f"{cls.__name__} must implement decide() or decide_pool()")

    def __init__(self, config: StageConfig) -> None:
        self.config = config
        self.would_reject: dict[str, int] = {}  # reason → rows; set by decide() where a stage has several rules

    def inputs(self) -> list[str]:
        return []

    def optional_inputs(self) -> list[str]:
        """Columns used when the pipeline stores them (e.g. clip_score for a keep policy), absent otherwise."""
        return []

    def bind(self, stages: list[Stage]) -> None:
        """Called before ``decide`` with the pipeline's per-sample stages, for a decision that must treat outside
        data (eval images) exactly as the pool was treated."""

    def outputs(self) -> dict[str, pa.DataType]:
        """Extra ledger columns this stage fills (e.g. the uid a duplicate points to)."""
        return {}

    def decide(self, metadata: pa.Table) -> pa.Table:
        """Given the live rows (``status == "ok"``) with the columns of ``inputs()`` (and of ``optional_inputs()``
        the pipeline stores), return a table with columns ``uid``, ``status`` (``filtered`` for rows this stage
        removes), ``reason``, plus ``outputs()``, holding only the rows it removes.

        A stage that implements ``decide_pool`` gets this for free, over the table as a one-piece pool."""
        from curate.pool import Pool

        return self.decide_pool(Pool.from_table(metadata))

    def decide_pool(self, pool: Pool) -> pa.Table:
        """The same, over the pool's stored parts, with a ``row`` column: the rows this stage removes. By default
        the declared columns of every live row are gathered and passed to ``decide``."""
        names = sorted({"uid", *self.inputs(), *(c for c in self.optional_inputs() if pool.has(c))})
        metadata = pool.gather(names)
        removed = self.decide(metadata.select(names))
        row_of = dict(zip(metadata.column("uid").to_pylist(), metadata.column("row").to_pylist()))
        rows = [row_of.get(uid) for uid in removed.column("uid").to_pylist()]
        if None in rows:
            uid = removed.column("uid")[rows.index(None)].as_py()
            raise RuntimeError(f"global stage {self.name} removed uid {uid!r}, which is not a live row")
        return removed.append_column("row", pa.array(rows, pa.int64()))
