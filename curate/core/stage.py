"""The stage contracts.

A per-sample ``Stage`` transforms a batch of rows and records, per row, whether the row goes on. A ``GlobalStage``
decides over the stored metadata of the whole pool (dedup, quantile filters) and never touches images.
Stages never talk to Ray: they declare their columns and resources and the runner places them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow as pa
from curate.config import Resources, StageConfig

if TYPE_CHECKING:
    from curate.core.pool import Pool

# Row status while a pipeline runs: "ok" rows are still alive. The ledger turns the survivors into "kept".
OK, KEPT, FILTERED, FAILED = "ok", "kept", "filtered", "failed"
FINAL_STATUSES = (KEPT, FILTERED, FAILED)

ConfigT = TypeVar("ConfigT", bound=StageConfig)


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


class Stage(ABC, Generic[ConfigT]):
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

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @property
    def deferred(self) -> bool:
        """True when this stage cannot stream: it needs the whole pool stored first (bootstrapped scores); the
        runner runs it after the per-sample stream, over the stored parts."""
        return False

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


@dataclass(frozen=True)
class Removals:
    """What a global stage decides: the rows it removes (``uid``, ``status`` filtered or failed, ``reason``, the
    pool's ``row`` once known, and the stage's declared ``outputs()`` columns, e.g. ``duplicate_of``), and, for a
    filter, how many rows each of its rules would reject on its own (None: the removed rows counted by reason)."""

    table: pa.Table
    would_reject: dict[str, int] | None = None

    @classmethod
    def of(cls, uids: Sequence[str], reasons: str | Sequence[str], *, rows: Sequence[int] | None = None,
           status: str = FILTERED, would_reject: dict[str, int] | None = None,
           **columns: Sequence[str | None]) -> Removals:
        n = len(uids)
        data = {"uid": pa.array(list(uids), pa.string()), "status": pa.array([status] * n, pa.string()),
                "reason": pa.array([reasons] * n if isinstance(reasons, str) else list(reasons), pa.string())}
        if rows is not None:
            data["row"] = pa.array(np.asarray(rows, dtype=np.int64))
        data |= {name: pa.array(list(values), pa.string()) for name, values in columns.items()}
        return cls(pa.table(data), would_reject)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def with_rows(self, row_of: dict[str, int], stage: str) -> Removals:
        """The same removals with each uid's pool ``row``; a uid that is not a live row is a bug in the stage."""
        rows = [row_of.get(uid) for uid in self.table.column("uid").to_pylist()]
        if None in rows:
            raise RuntimeError(f"global stage {stage} removed uid {self.table.column('uid')[rows.index(None)]}, "
                               "which is not a live row")
        table = self.table.drop_columns(["row"]) if "row" in self.table.column_names else self.table
        return Removals(table.append_column("row", pa.array(rows, pa.int64())), self.would_reject)

    def rejected_by_reason(self) -> dict[str, int]:
        if self.would_reject is not None:
            return self.would_reject
        return dict(Counter(self.table.column("reason").to_pylist()))


class GlobalStage(ABC, Generic[ConfigT]):
    """A decision over the stored metadata of the whole pool (dedup, quantile thresholds).

    Global stages see metadata columns only (never image bytes), so they are cheap to rerun with a new config.
    A stage implements one of two methods. ``decide(metadata)`` gets the live rows' declared columns gathered into
    one table in the driver: right for decisions over a whole column (thresholds, rules), whose columns are small.
    ``decide_pool(pool)`` gets the pool itself (curate.core.pool) and reads it in tasks: right for dedup, where the driver
    should receive pairs of rows, not every row's fingerprints.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    # Filters (rules, thresholds) are also run over the whole live pool, so the manifest can count everything each
    # rule would reject on its own; dedup decisions depend on the group and are not.
    counts_would_reject: ClassVar[bool] = False
    # Stages whose work runs as Ray tasks (curate.core.fan_out): a run on Ray joins Ray before deciding.
    fans_out: ClassVar[bool] = False
    funnel: ClassVar[tuple[tuple[str, str], ...]] = ()  # a decision removes rows; it names no step of the funnel

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and \
                cls.decide is GlobalStage.decide and cls.decide_pool is GlobalStage.decide_pool:
            raise TypeError(f"{cls.__name__} must implement decide() or decide_pool()")

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def inputs(self) -> list[str]:
        return []

    def optional_inputs(self) -> list[str]:
        """Columns used when the pipeline stores them (e.g. clip_score for a keep policy), absent otherwise."""
        return []

    def bind(self, stages: list[Stage]) -> None:
        """Called before ``decide`` with the pipeline's per-sample stages, for a decision that must treat outside
        data (eval images) exactly as the pool was treated."""

    def outside_rows(self) -> pa.Table | None:
        """Input rows from outside the pool that this decision compares the pool with (decontaminate: the eval
        images), or None. The runner sends them through the pipeline's per-sample stages in the per-sample phase's
        workers, as it sends the pool's, and hands what they stored to ``receive_outside`` before deciding."""
        return None

    def receive_outside(self, table: pa.Table) -> None:
        """The ``outside_rows`` after the per-sample stages: those they kept (status ok), every stored column."""

    def outputs(self) -> dict[str, pa.DataType]:
        """Extra ledger columns this stage fills (e.g. the uid a duplicate points to)."""
        return {}

    def tables(self) -> dict[str, pa.Table]:
        """After deciding: small tables of what the decision saw, by name, that the run stores as
        OUT/decisions/NAME.parquet for the report and `curate why` (balance: each entry's rows before and after)."""
        return {}

    def decide(self, metadata: pa.Table) -> Removals:
        """Given the live rows (``status == "ok"``) with the columns of ``inputs()`` (and of ``optional_inputs()``
        the pipeline stores), return the rows this stage removes, each with its reason and ``outputs()`` columns.

        A stage that implements ``decide_pool`` gets this for free, over the table as a one-piece pool."""
        from curate.core.pool import Pool

        return self.decide_pool(Pool.from_table(metadata))

    def decide_pool(self, pool: Pool) -> Removals:
        """The same, over the pool's stored parts, with a ``row`` column: the rows this stage removes. By default
        the declared columns of every live row are gathered and passed to ``decide``."""
        names = sorted({"uid", *self.inputs(), *(c for c in self.optional_inputs() if pool.has(c))})
        metadata = pool.gather(names)
        removed = self.decide(metadata.select(names))
        return removed.with_rows(dict(zip(metadata.column("uid").to_pylist(), metadata.column("row").to_pylist())),
                                 self.name)
