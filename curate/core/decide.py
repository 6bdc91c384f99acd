"""Decide over stored metadata, then write the ledger, the shards and the manifest.

Streams the stored parts in input order: memory holds one part's metadata (never images) plus the shards in flight.
Global stages read the stored parts through curate.core.pool: dedup tiers in tasks, filters by gathering the columns
they declare for every live row.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import fan_out
from curate.core import parts as part_store
from curate.config import PipelineConfig, RayConfig
from curate.core.atomic import atomic_file
from curate.core.embeddings import EmbeddingWriter
from curate.core.ledger import DECISION_TABLES, MANIFEST, LedgerWriter, Manifest, ShardEntry, StageStats, write_json_atomic
from curate.core.pool import Pool, ids_in
from curate.core.schema import LEDGER_SCHEMA
from curate.core.stage import FAILED, FILTERED, KEPT, OK, GlobalStage, Stage
from curate.sinks.sink import SHARDS, ShardPlan, key_width, sample_key, sink, write_shard

VERSIONED = ("curate", "ray", "pyarrow", "webdataset", "pillow", "numpy", "urllib3")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


DECISION_BASE = ("uid", "row", "status", "reason")


class Decision(tuple):
    """What became of one removed row: ``(status, reason, stage, duplicate_of)``, and in ``columns`` the stage's other
    declared decision columns (a view for people and tests; a run keeps its decisions as ``Decisions`` arrays)."""

    def __new__(cls, status: str, reason: str, stage: str, duplicate_of: str | None = None,
                columns: dict[str, object] | None = None) -> Decision:
        decision = super().__new__(cls, (status, reason, stage, duplicate_of))
        decision.columns = columns or {}
        return decision

    status = property(itemgetter(0))
    reason = property(itemgetter(1))
    stage = property(itemgetter(2))
    duplicate_of = property(itemgetter(3))


class Decisions:
    """What the global stages removed, as columns sorted by pool row: ``row``, ``status``, ``reason``,
    ``decided_by`` (the last three dictionary-encoded) and each declared decision column (``duplicate_of``, ...).

    Arrays, not an object per removed row: about 20 bytes a row plus its columns' values (a duplicate's survivor
    uid), where a dict of tuples by uid cost ~300 (at 1B rows with LAION's duplicate rate, 90 GB of driver memory)."""

    CODED = ("status", "reason", "decided_by")

    def __init__(self, table: pa.Table | None = None) -> None:
        if table is None:
            table = pa.table({"row": pa.array([], pa.int64()),
                              **{c: pa.array([], pa.string()).dictionary_encode() for c in self.CODED}})
        self.table = table
        self.rows = table.column("row").to_numpy()
        self._arrays = {name: table.column(name).combine_chunks() for name in table.column_names}

    @classmethod
    def of(cls, removed: list[pa.Table], columns: dict[str, pa.DataType]) -> Decisions:
        """From each stage's removals (``row``, ``status``, ``reason``, ``decided_by`` and declared columns)."""
        if not removed:
            return cls()
        table = pa.concat_tables([t.select([c for c in ("row", *cls.CODED, *columns) if c in t.column_names])
                                  for t in removed], promote_options="default")
        for name, dtype in columns.items():
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, dtype))
        table = table.combine_chunks()  # one dictionary per coded column, unified across the stages
        return cls(table.take(pc.sort_indices(table.column("row"))))

    @classmethod
    def coded(cls, removed: pa.Table) -> pa.Table:
        """One stage's removals with status, reason and decided_by dictionary-encoded as they arrive: a few
        distinct strings stored once, 4 bytes a row (held until every stage has decided)."""
        for name in cls.CODED:
            values = removed.column(name).combine_chunks()
            if not pa.types.is_dictionary(values.type):
                removed = removed.set_column(removed.column_names.index(name), name, pc.dictionary_encode(values))
        return removed

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decisions):
            return NotImplemented
        every = np.arange(len(self))
        return (self.table.column_names == other.table.column_names and len(self) == len(other)
                and all(self.column(c, every).equals(other.column(c, every)) for c in self.table.column_names))

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``rows``: whether a stage removed it, and where its decision is (0 where none)."""
        where = np.searchsorted(self.rows, rows)
        where = np.minimum(where, max(len(self.rows) - 1, 0))
        hit = (self.rows[where] == rows) if len(self.rows) else np.zeros(len(rows), dtype=bool)
        return hit, np.where(hit, where, 0)

    def column(self, name: str, at: np.ndarray) -> pa.Array:
        """Column ``name`` of the decisions at positions ``at``, as plain (decoded) values."""
        values = self._arrays[name].take(pa.array(at, pa.int64()))
        return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values

    def count_by(self, name: str) -> Counter[str]:
        """Removed rows by the value of ``name`` (reason, decided_by)."""
        counts = pc.value_counts(self.column(name, np.arange(len(self))))
        return Counter({v["values"]: v["counts"] for v in counts.to_pylist()})

    def by_uid(self, parts: list[Path]) -> dict[str, Decision]:
        """uid → Decision, the uids read from the stored ``parts`` (to look at a small run's decisions)."""
        result: dict[str, Decision] = {}
        extra = [c for c in self.table.column_names if c not in ("row", *self.CODED, "duplicate_of")]
        for part in parts:
            table = pq.read_table(part, columns=["uid", "row"])
            hit, at = self.lookup(table.column("row").to_numpy())
            for uid, i in zip(np.asarray(table.column("uid").to_pylist(), dtype=object)[hit], at[hit]):
                row = {c: self.table.column(c)[int(i)].as_py() for c in self.table.column_names}
                result[uid] = Decision(row["status"], row["reason"], row["decided_by"], row.get("duplicate_of"),
                                       {c: row[c] for c in extra})
        return result


def decision_columns(global_stages: list[GlobalStage]) -> dict[str, pa.DataType]:
    """The ledger columns a pipeline's global stages declare (``duplicate_of`` always: the ledger has it)."""
    columns: dict[str, pa.DataType] = {"duplicate_of": pa.string()}
    for stage in global_stages:
        for name, dtype in stage.outputs().items():
            known = columns.get(name, LEDGER_SCHEMA.field(name).type if name in LEDGER_SCHEMA.names else dtype)
            if name in DECISION_BASE or known != dtype:
                raise RuntimeError(f"global stage {stage.name}: output column {name!r} ({dtype}) clashes with the "
                                   f"ledger's {name!r} ({known})")
            columns[name] = dtype
    return columns


def run_global_stages(parts: list[Path], global_stages: list[GlobalStage],
                      stages: list[Stage] | None = None) -> tuple[Decisions, dict[str, int]]:
    """The rows every global stage removes, as ``Decisions`` by row; and, per filter reason, the live rows that
    filter would reject on its own (whatever ran before it).

    Each stage reads the pool of stored parts itself (curate.core.pool): the driver holds the decisions, the rows
    removed so far and what a stage gathers, not the pool's metadata."""
    would_reject: Counter[str] = Counter()
    if not global_stages:
        return Decisions(), {}
    columns = decision_columns(global_stages)  # a clash is found before any stage runs
    removed_tables: list[pa.Table] = []
    pool = live = Pool.from_parts(parts)
    for stage in global_stages:
        stage.bind(stages or [])
        if stage.counts_would_reject and live is not pool:
            # on its own: every live row, none removed by an earlier stage
            would_reject.update(stage.decide_pool(pool).rejected_by_reason())
        decided = stage.decide_pool(live)
        if stage.counts_would_reject and live is pool:
            would_reject.update(decided.rejected_by_reason())
        removed = decided.table
        extra = [c for c in removed.column_names if c not in DECISION_BASE]
        if set(extra) - set(stage.outputs()):
            raise RuntimeError(f"global stage {stage.name}: columns {sorted(set(extra) - set(stage.outputs()))} "
                               "are not declared outputs; a decision's columns must reach the ledger, so declare "
                               "them in outputs()")
        _check_removals(stage.name, removed, live.removed)
        if removed.num_rows:
            removed_tables.append(Decisions.coded(removed.drop_columns(["uid"]).append_column(
                "decided_by", pa.array(np.full(removed.num_rows, stage.name, dtype=object), pa.string()))))
            live = live.without(removed.column("row").to_numpy())
        del decided, removed
        # what a stage gathered and freed goes back to the system before the next one gathers its own: Arrow's
        # allocator keeps freed memory for reuse, and the driver's peak would be the sum of the stages' peaks
        pa.default_memory_pool().release_unused()
    decisions = Decisions.of(removed_tables, columns)
    del removed_tables
    pa.default_memory_pool().release_unused()
    return decisions, dict(sorted(would_reject.items()))


def _check_removals(stage: str, removed: pa.Table, earlier: np.ndarray) -> None:
    """Every removal is filtered or failed with a reason, and of a row still live (once)."""
    status, reason = removed.column("status"), removed.column("reason")
    wrong = pc.or_kleene(pc.invert(pc.is_in(status, value_set=pa.array([FILTERED, FAILED]))),
                         pc.or_kleene(pc.is_null(reason), pc.equal(reason, "")))
    bad = pc.fill_null(wrong, True).to_numpy(zero_copy_only=False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RuntimeError(f"global stage {stage} gave uid {removed.column('uid')[i].as_py()} status "
                           f"{status[i].as_py()!r} reason {reason[i].as_py()!r}; expected filtered or failed with a "
                           "reason")
    rows = removed.column("row").to_numpy()
    again = ids_in(rows, earlier)  # earlier: sorted (the pool's removed rows)
    unique, first = np.unique(rows, return_index=True)
    if len(unique) < len(rows):
        again[np.setdiff1d(np.arange(len(rows)), first)] = True
    if again.any():
        uid = removed.column("uid")[int(np.flatnonzero(again)[0])].as_py()
        raise RuntimeError(f"global stage {stage} removed uid {uid!r}, which is not a live row")


class ShardWriters:
    """Writes shards with the output format's sink, in this process or as Ray tasks, a bounded number in flight;
    skips finished shards."""

    def __init__(self, out: Path, local: bool, ray_config: RayConfig, format_name: str) -> None:
        self.out, self.local, self.ray_config = out, local, ray_config
        self.format, self.sink = format_name, sink(format_name)
        self.entries: dict[int, ShardEntry] = {}
        self.in_flight: dict[object, int] = {}
        self._remote = None

    def _start_ray(self) -> None:
        """Ray is joined only when a shard needs writing: a rerun of a finished job starts nothing."""
        import ray

        from curate.cluster.ray_env import ensure_ray

        ensure_ray(self.ray_config)
        self._remote = ray.remote(num_cpus=0.5, max_retries=3)(write_shard)
        self._max_in_flight = max(2, int(ray.cluster_resources().get("CPU", 1) * 2))

    def submit(self, plan: ShardPlan) -> None:
        done = self.sink.existing(self.out, plan)
        if done is not None:
            self.entries[plan.index] = done
        elif self.local:
            self.entries[plan.index] = self.sink.write(self.out, plan)
        else:
            import ray

            if self._remote is None:
                self._start_ray()
            while len(self.in_flight) >= self._max_in_flight:
                self._collect(ray.wait(list(self.in_flight), num_returns=1)[0])
            self.in_flight[self._remote.remote(self.format, str(self.out), plan)] = plan.index

    def _collect(self, refs: list) -> None:
        import ray

        for ref in refs:
            self.entries[self.in_flight.pop(ref)] = ray.get(ref)

    def finish(self) -> list[ShardEntry]:
        if self.in_flight:
            self._collect(list(self.in_flight))
        return [self.entries[i] for i in sorted(self.entries)]


def apply_decisions(table: pa.Table, decisions: Decisions, columns: dict[str, pa.DataType]) -> pa.Table:
    """Status, reason and decided_by of removed rows updated; each decision column set (null where none)."""
    hit, at = decisions.lookup(table.column("row").to_numpy())
    mask = pa.array(hit)
    if hit.any():
        for column in Decisions.CODED:
            new = pc.if_else(mask, decisions.column(column, at), table.column(column).combine_chunks().cast(pa.string()))
            table = table.set_column(table.column_names.index(column), column, new)
    for name, dtype in columns.items():
        values = pc.if_else(mask, decisions.column(name, at).cast(dtype), pa.nulls(len(hit), dtype)) if hit.any() \
            else pa.nulls(len(hit), dtype)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


def decide_and_write(
    out: Path,
    config: PipelineConfig,
    stages: list[Stage],
    global_stages: list[GlobalStage],
    input_rows: int,
    *,
    local: bool,
    created: str,
    started: float,
) -> Manifest:
    parts = part_store.part_files(out)
    fan = not local and input_rows >= fan_out.MIN_ROWS and any(stage.fans_out for stage in global_stages)
    if fan:
        from curate.cluster.ray_env import ensure_ray

        ensure_ray(config.ray)  # their pHash tables and k-means clusters run as tasks across the cluster
    decide_start = time.perf_counter()
    with fan_out.in_process(not fan):
        decisions, would_reject = run_global_stages(parts, global_stages, stages)
    decide_seconds = time.perf_counter() - decide_start
    write_decision_tables(out, global_stages)

    # Below MIN_ROWS the driver writes the shards itself, as it decides: a Ray task's worker costs seconds to start
    # (benchmarks/download.py, 3,000 rows: 2.5 s of shard writing as tasks on 2 cores, 0.3 s in the driver).
    written = write_outputs(out, parts, decisions, decision_columns(global_stages), config,
                            local or input_rows < fan_out.MIN_ROWS)
    ledger, stopped_by, seconds = written.ledger, written.stopped_by, written.seconds
    entries, write_seconds = written.entries, written.seconds_taken

    stats = stage_stats([*stages, *global_stages], input_rows, stopped_by,
                        {**{s.name: decide_seconds for s in global_stages}, **seconds})
    alive = stats[-1].rows_out if stats else input_rows
    kept = ledger.by_status.get(KEPT, 0)
    stats.append(StageStats(name="write", rows_in=alive, rows_out=kept, wall_seconds=round(write_seconds, 3)))
    resolved = config.resolved()
    manifest = Manifest(
        pipeline=config.name,
        created=created,
        output_format=config.output.format,
        input_rows=input_rows,
        shards=entries,
        embeddings=written.embeddings,
        totals_by_status={s: ledger.by_status.get(s, 0) for s in ("kept", "filtered", "failed")},
        totals_by_reason=dict(sorted(ledger.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        would_reject=would_reject,
        stages=stats,
        elapsed_seconds=round(time.monotonic() - started, 3),
        config=resolved,
        versions=package_versions(),
    )
    if ledger.rows != input_rows:
        raise RuntimeError(f"ledger has {ledger.rows} rows for {input_rows} input rows; refusing to publish")
    if kept != sum(e.samples for e in entries):
        raise RuntimeError(f"ledger keeps {kept} rows, shards hold {sum(e.samples for e in entries)}; "
                           "refusing to publish")
    write_json_atomic(out / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def write_decision_tables(out: Path, global_stages: list[GlobalStage]) -> None:
    """Each stage's ``tables()`` as OUT/decisions/NAME.parquet; a table an earlier decision wrote and this one did
    not is removed, so what is there describes this run."""
    folder = out / DECISION_TABLES
    written = set()
    for stage in global_stages:
        for name, table in stage.tables().items():
            folder.mkdir(exist_ok=True)
            with atomic_file(folder / f"{name}.parquet") as handle:
                pq.write_table(table, handle)
            written.add(f"{name}.parquet")
    for stale in folder.glob("*.parquet") if folder.exists() else []:
        if stale.name not in written:
            stale.unlink()


@dataclass
class Written:
    """What writing the outputs produced and counted: the shards, the ledger's totals, the embedding files, the rows
    each stage stopped and the per-sample stages' busy seconds."""

    entries: list[ShardEntry]
    ledger: LedgerWriter
    embeddings: list[str]
    stopped_by: Counter[str]
    seconds: Counter[str]
    seconds_taken: float


def write_outputs(out: Path, parts: list[Path], decisions: Decisions, columns: dict[str, pa.DataType],
                  config: PipelineConfig, local: bool) -> Written:
    """One pass over the stored parts in input order: the decisions applied, the embeddings, the ledger, and the
    kept rows planned into shards that the output format's sink writes."""
    per_shard = config.output.samples_per_shard
    width = key_width(per_shard)
    writers = ShardWriters(out, local, config.ray, config.output.format)
    ledger = LedgerWriter(out, columns)
    embeddings = EmbeddingWriter(out)
    seconds: Counter[str] = Counter()
    stopped_by: Counter[str] = Counter()
    plan = ShardPlan(index=0, suffix=writers.sink.suffix)
    start = time.perf_counter()
    try:
        for part in parts:
            names = [c for c in pq.ParquetFile(part).schema_arrow.names if c != "image"]
            table = pq.read_table(part, columns=names)
            table = table.take(pc.sort_indices(table.column("row")))
            table = apply_decisions(table, decisions, columns)
            embeddings.write(table)
            for name in names:
                if name.endswith("_seconds"):
                    seconds[name[: -len("_seconds")]] += pc.sum(table.column(name)).as_py() or 0.0
            stopped_by.update(d for d in table.column("decided_by").to_pylist() if d)
            table, plan = _place_in_shards(table, str(part), plan, writers, per_shard, width)
            ledger.write(table)
            del table
            pa.default_memory_pool().release_unused()  # one part's columns at a time, not the allocator's high water
        if plan.keys:
            writers.submit(plan)
            plan = plan.following()
        entries = writers.finish()
    except BaseException:
        ledger.abort()
        raise
    _remove_stale_shards(out, keep=len(entries), suffix=writers.sink.suffix)
    embeddings.close()
    ledger.close()
    return Written(entries, ledger, embeddings.files, stopped_by, seconds, time.perf_counter() - start)


def _place_in_shards(table: pa.Table, part: str, plan: ShardPlan, writers: ShardWriters, per_shard: int,
                     width: int) -> tuple[pa.Table, ShardPlan]:
    """The part's surviving rows become ``kept`` and take the next keys of the shard being planned (a full plan is
    handed to the writers); returns the ledger rows, with ``shard`` and ``key``, and the plan now being filled."""
    status = table.column("status").to_pylist()
    shard_col: list[str | None] = [None] * table.num_rows
    key_col: list[str | None] = [None] * table.num_rows
    rows = table.column("row").to_pylist()
    uids = table.column("uid").to_pylist()
    for i in np.flatnonzero(np.asarray(status, dtype=object) == OK):
        if not plan.parts or plan.parts[-1][0] != part:
            plan.parts.append((part, []))
        key = sample_key(plan.index, len(plan.keys), width)
        plan.parts[-1][1].append(rows[i])
        plan.uids.append(uids[i])
        plan.keys.append(key)
        shard_col[i], key_col[i] = plan.path, key
        status[i] = KEPT
        if len(plan.keys) == per_shard:
            writers.submit(plan)
            plan = plan.following()
    table = table.set_column(table.column_names.index("status"), "status", pa.array(status, pa.string()))
    return table.append_column("shard", pa.array(shard_col, pa.string())).append_column(
        "key", pa.array(key_col, pa.string())), plan


def stage_stats(stages: list[Stage | GlobalStage], input_rows: int, stopped_by: Counter[str],
                wall_seconds: dict[str, float]) -> list[StageStats]:
    """Rows in and out of each stage in pipeline order, with what the report needs to label them (the funnel's
    reason domains, the columns each stage stored) so that it reads the manifest, not the stage classes."""
    stats, alive = [], input_rows
    for stage in stages:
        stopped = stopped_by.get(stage.name, 0)
        stats.append(StageStats(name=stage.name, rows_in=alive, rows_out=alive - stopped,
                                wall_seconds=round(wall_seconds.get(stage.name, 0.0), 3),
                                funnel=list(stage.funnel), columns=list(stage.outputs())))
        alive -= stopped
    return stats


def _remove_stale_shards(out: Path, keep: int, suffix: str) -> None:
    """Shards numbered past this run's last one are leftovers of an earlier decision, and files of another format
    leftovers of an earlier output.format: remove them (a shard's parquet index stays)."""
    folder = out / SHARDS
    if not folder.exists():
        return
    for path in folder.iterdir():
        stem, _, ext = path.name.partition(".")
        if path.name.startswith(".") or (stem.isdigit() and (int(stem) >= keep or f".{ext}" not in (suffix,
                                                                                                     ".parquet"))):
            path.unlink()
