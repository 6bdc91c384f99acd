"""Runs a pipeline: stage the input, stream the per-sample stages once (on Ray, or in-process), then decide and write.

Phases, each resumable:
1. input   -> input/NNNNN.parquet chunks with uids (reused on a rerun of the same input)
2. samples -> parts/*.parquet: every pending row through the per-sample stages (rows already stored are skipped)
3. decide  -> global stages over stored metadata, then ledger.parquet and shards/ (finished shards are skipped)
4. publish -> manifest.json, written last
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from curate.core import parts as part_store
from curate.core.atomic import write_text_atomic
from curate.config import PipelineConfig
from curate.core.pipeline import check_output_format, check_stage_order
from curate.core.decide import decide_and_write
from curate.errors import CurateError
from curate.core.fan_out import in_process
from curate.core.ledger import MANIFEST, Manifest
from curate.core.stage import FAILED, OK, GlobalStage, Stage
from curate.stages import STAGES
from curate.inputs.chunks import InputChunks, stage_input, staged_chunks
from curate.inputs.formats import validate_input
from curate.core.worker import SegmentWorker, segment_class, segments

CONFIG_FILE = "config.yaml"
OUTSIDE = "outside"  # outside/<global stage>/: rows from outside the pool (eval images) through the per-sample stages
# Most rows per stored part file (and at most one input chunk): big enough to keep file counts sane, small enough
# to lose little work to a kill.
PART_ROWS = 1024
# Work units on Ray: at least this many per worker while the pending rows allow, and never fewer rows than this.
UNITS_PER_WORKER = 4
MIN_UNIT_ROWS = 64


@dataclass
class RunResult:
    out: Path
    manifest: Manifest


def build_stages(config: PipelineConfig) -> tuple[list[Stage], list[GlobalStage]]:
    check_stage_order(config, "stages")
    check_output_format(config, "output")
    for i, stage_config in enumerate(config.stages):  # configs built in code, not loaded from a file, resolve here
        try:
            stage_config.resolve_with(config.stages[:i])
        except ValueError as err:
            raise CurateError(f"stages[{i}] ({stage_config.stage}): {err}") from None
    built = [STAGES[stage_config.stage](stage_config) for stage_config in config.stages]
    return ([s for s in built if not isinstance(s, GlobalStage)],  # type: ignore[misc]
            [s for s in built if isinstance(s, GlobalStage)])


def per_sample_signature(config: PipelineConfig) -> dict:
    resolved = config.resolved()
    stages = [s for s in resolved["stages"] if not issubclass(STAGES[s["stage"]], GlobalStage)]
    for stage in stages:
        stage.pop("resources", None)  # where a stage runs does not change what it stores
    inputs = {k: v for k, v in resolved["input"].items() if k != "path"}
    return {"input": inputs, "stages": stages}


def first_difference(old: object, new: object, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{path}[{i}]")
    return f"{path}: {old!r} -> {new!r}"


def prepare_output(out: Path, config: PipelineConfig, sources: list[str]) -> None:
    """Refuse to mix per-sample results of different pipelines or inputs, then save the config.

    Every check comes before the first write, so a refused run leaves the output as it found it.
    """
    saved = out / CONFIG_FILE
    if out.is_dir() and any(out.iterdir()) and not saved.exists():
        raise CurateError(f"output {out}: folder is not empty and holds no curate run; choose a new or empty folder")
    for source in sources:
        if "://" not in source and Path(source).resolve().is_relative_to(out):
            raise CurateError(f"input {source}: lies inside the output folder {out}; keep inputs outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CurateError(f"output {out}: not writable ({err.strerror or err})") from None
    if part_store.part_files(out):
        previous = (yaml.safe_load(saved.read_text()) or {}) if saved.exists() else {}
        old_sig = previous.get("per_sample_signature")
        new_sig = per_sample_signature(config)
        if old_sig is not None and old_sig != new_sig:
            raise CurateError(
                f"output {out}: holds results of a different pipeline ({first_difference(old_sig, new_sig)}); "
                "use a new --output"
            )
        if staged_chunks(config.input, sources, out / "input") is None:
            raise CurateError(
                f"output {out}: holds results for a different input (the input files changed since); "
                "use a new --output"
            )
    resolved = config.resolved()
    resolved["per_sample_signature"] = per_sample_signature(config)
    write_text_atomic(saved, yaml.safe_dump(resolved, sort_keys=False))


def pending_inputs(out: Path, chunks: InputChunks, rows_per_chunk: int) -> list[Path]:
    """Input files holding only the rows not yet stored: whole chunks, or a trimmed copy of a partly done one."""
    index = part_store.PartIndex(out)
    pending_dir = out / "pending"
    shutil.rmtree(pending_dir, ignore_errors=True)
    result: list[Path] = []
    for number, chunk in enumerate(chunks.files):
        first = number * rows_per_chunk
        chunk_rows = pq.ParquetFile(chunk).metadata.num_rows
        stored, _ = index.stored_rows(first, first + chunk_rows - 1)
        if len(stored) >= chunk_rows:
            continue
        if len(stored) == 0:
            result.append(chunk)
            continue
        table = pq.read_table(chunk)
        mask = pc.invert(pc.is_in(table.column("row"), value_set=pa.array(stored, pa.int64())))
        pending_dir.mkdir(exist_ok=True)
        path = pending_dir / chunk.name
        pq.write_table(table.filter(mask), path)
        result.append(path)
    return result


class Progress:
    """One line every few seconds on stderr: rows done of rows pending, rate, ETA, and each stage's busy time per row
    (summed over its workers: the stage with the most is the one to give more workers or GPUs)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.busy: dict[str, float] = {}

    def update(self, rows: int, summary: pa.Table | None = None) -> None:
        self.done += rows
        if summary is not None:
            for name in summary.column_names:
                if name.endswith("_seconds"):
                    stage = name[: -len("_seconds")]
                    self.busy[stage] = self.busy.get(stage, 0.0) + float(pc.sum(summary.column(name)).as_py() or 0)
        now = time.monotonic()
        if self.enabled and (now - self.last > 2 or self.done >= self.total):
            print(self.line(now), file=sys.stderr)
            self.last = now

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        text = f"[{self.label}] {self.done}/{self.total} rows, {rate:.0f} rows/s, eta {eta:.0f}s"
        if self.busy and self.done:
            text += "; busy per row: " + ", ".join(f"{stage} {1000 * seconds / self.done:.1f} ms"
                                                  for stage, seconds in self.busy.items())
        return text


def work_units(inputs: list[Path], unit_rows: int) -> list[dict]:
    """The pending input cut into units of at most ``unit_rows`` rows, none across two files: (path, offset, rows).
    A unit is what one worker reads, runs through its stages and stores as one part."""
    units = []
    for path in inputs:
        rows = pq.ParquetFile(path).metadata.num_rows
        units.extend({"path": str(path), "offset": offset, "rows": min(unit_rows, rows - offset)}
                     for offset in range(0, rows, unit_rows))
    return units


def run_samples_local(stages: list[Stage], inputs: list[Path], out: Path, progress: Progress, part_rows: int) -> None:
    """The per-sample phase in this process: every stage in one worker, the same wrapper and part writer as on Ray."""
    worker = SegmentWorker(stages, reads_units=True, parts_folder=str(out / part_store.PARTS))
    for unit in work_units(inputs, part_rows):
        summary = worker(pa.Table.from_pylist([unit]))
        progress.update(unit["rows"], summary)


def unit_rows_for(total_rows: int, workers: int, part_rows: int) -> int:
    """Rows per work unit on Ray: a part's worth, or fewer when the pending rows are few, so that every worker
    gets several units (a short run is not left to one worker's last unit) and none gets a sliver."""
    return max(1, min(part_rows, max(MIN_UNIT_ROWS, -(-total_rows // (UNITS_PER_WORKER * workers)))))


def _iter_ray_samples(stages: list[Stage], inputs: list[Path], out: Path, part_rows: int) -> Iterator[pa.Table]:
    """Stream the pending rows through the stages on Ray: consecutive stages that ask for the same resources run
    as one segment in one worker (see ``segments``); the first segment reads its work units itself and the last
    stores its rows as parts, so that only the summaries of stored parts come back to this driver."""
    import ray

    from curate.cluster.ray_env import pool_size, worker_cpus

    plan = segments(stages) or [[]]  # no per-sample stage: the input rows are stored as they are
    first = plan[0][0].resources() if plan[0] else None
    workers = (first.concurrency or pool_size(first)) if first else 1
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs)
    units = work_units(inputs, unit_rows_for(total, workers, part_rows))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    parts = str(out / part_store.PARTS)
    for number, segment in enumerate(plan):
        reads, last = number == 0, number == len(plan) - 1
        # the first segment is handed one unit per call; a later one a part's worth of rows (or, before another
        # segment, its largest stage's batch)
        batch_size = 1 if reads else part_rows if last else max(s.resources().batch_size for s in segment)
        bound = dict(reads_units=reads, parts_folder=parts if last else None)
        res = segment[0].resources() if segment else None
        if res is None:
            ds = ds.map_batches(SegmentWorker([], **bound), batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                                zero_copy_batch=False)
            continue
        remote_args = {"num_cpus": worker_cpus(res), "num_gpus": res.gpus or None}
        if res.custom:
            remote_args["resources"] = res.custom
        remote_args = {k: v for k, v in remote_args.items() if v is not None}
        if any(s.has_setup() for s in segment) or res.gpus:
            name = "+".join(s.name for s in segment)
            fits = pool_size(res, name)  # also refuses GPUs or custom resources the cluster lacks, before any work
            # a pinned concurrency starts as many actors at once as fit now (growing from one costs seconds of a
            # short run) and may grow to the pin as nodes join; otherwise the pool grows as other stages leave room.
            # Two units in flight per actor: one running, the next already there, and no long queue on one actor
            # while another goes idle at the end of a run.
            pool = ray.data.ActorPoolStrategy(min_size=min(res.concurrency, fits) if res.concurrency else 1,
                                              max_size=res.concurrency or fits, max_tasks_in_flight_per_actor=2)
            ds = ds.map_batches(segment_class(segment, **bound), batch_size=batch_size, batch_format="pyarrow",
                                compute=pool, zero_copy_batch=False, **remote_args)
        else:
            ds = ds.map_batches(SegmentWorker(segment, **bound), batch_size=batch_size, batch_format="pyarrow",
                                zero_copy_batch=False, **remote_args)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def run_outside_rows(out: Path, config: PipelineConfig, stages: list[Stage], global_stages: list[GlobalStage], *,
                     local: bool, progress: bool, reuse: Path | None = None) -> None:
    """Each global stage's ``outside_rows`` (eval images) through the streaming per-sample stages, on Ray or in this
    process as the pool went, stored under outside/<stage>/parts; then handed to the stage. Stored results (in
    ``out``, or in the run ``reuse`` names) are reused while the rows and the per-sample stages are the same: a
    rerun computes nothing."""
    streaming = [s for s in stages if not s.deferred]  # a bootstrapped scorer's folds fit no outside image
    for stage in global_stages:
        rows = stage.outside_rows()
        if rows is None:
            continue
        folder = out / OUTSIDE / stage.name
        files = sorted(set(rows.column("source_file").to_pylist()) - {None}) if "source_file" in rows.column_names \
            else []
        fingerprint = json.dumps({"rows": hashlib.sha256(_ipc_bytes(rows)).hexdigest(),
                                  "modified": [os.stat(f).st_mtime_ns for f in files],  # an eval file rewritten
                                  "per_sample": per_sample_signature(config)}, sort_keys=True)
        marker = folder / "stored.json"
        earlier = reuse / OUTSIDE / stage.name if reuse else None
        if earlier and (earlier / "stored.json").exists() and (earlier / "stored.json").read_text() == fingerprint:
            folder = earlier
        elif not (marker.exists() and marker.read_text() == fingerprint):
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "input").mkdir(parents=True)
            path = folder / "input" / "00000.parquet"
            pq.write_table(rows, path)
            if progress:
                print(f"[{stage.name}] {rows.num_rows} outside rows through "
                      f"{', '.join(s.name for s in streaming)}", file=sys.stderr)
            if local:
                run_samples_local(streaming, [path], folder, Progress(stage.name, rows.num_rows, False), PART_ROWS)
            else:
                from curate.cluster.ray_env import ensure_ray

                ensure_ray(config.ray)
                for _ in _iter_ray_samples(streaming, [path], folder, PART_ROWS):
                    pass
            write_text_atomic(marker, fingerprint)
        stored = pa.concat_tables([pq.read_table(p) for p in part_store.part_files(folder)],
                                  promote_options="default")
        stage.receive_outside(stored.filter(pc.equal(stored.column("status"), OK)))


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def run_pipeline(
    config: PipelineConfig,
    *,
    input_path: str | None = None,
    output: str | Path | None = None,
    address: str | None = None,
    local: bool = False,
    progress: bool = True,
    retry_failed: bool = False,
) -> RunResult:
    """Run ``config`` end to end (or resume it) and return the published manifest.

    ``retry_failed`` processes again the stored rows whose failure was retryable (timeouts, 5xx, ...); every other
    row keeps its stored result."""
    started = time.monotonic()
    if input_path:
        config.input.path = input_path
    if output:
        config.output.path = str(output)
    if not config.output.path:
        raise CurateError("output.path: no output folder given (set output.path in the pipeline or pass --output)")
    if address:
        config.ray.address = address
    if config.ray.address and not local:
        from curate.cluster.ray_env import check_cluster_address

        check_cluster_address(config.ray.address)  # ray:// or no token: one line, before anything is written
    # absolute: workers on other nodes (or in other working directories) write to the same place
    out = Path(config.output.path).expanduser().resolve()
    stages, global_stages = build_stages(config)
    for stage in stages:
        stage.preflight()  # model specs, weights, files: one clear line before any work starts
    sources = validate_input(config.input)
    prepare_output(out, config, sources)
    chunks = stage_input(config.input, sources, out / "input")
    # The manifest says "this output is complete"; it is not while we work on it.
    (out / MANIFEST).unlink(missing_ok=True)
    if retry_failed:
        by_name = {stage.name: stage for stage in stages}
        forgotten = part_store.forget_rows(out, lambda status, reason, stage: status == FAILED and stage in by_name
                                           and bool(reason) and by_name[stage].retryable(reason))
        if progress:
            print(f"[retry-failed] {forgotten} rows with a retryable failure will be tried again", file=sys.stderr)

    streaming = [s for s in stages if not s.deferred]
    if streaming and any(s.deferred for s in stages[: stages.index(streaming[-1])]):
        raise CurateError("stages: bootstrapped stages (score or caption with model: bootstrap) work on the stored "
                          "pool after the per-sample stream; put them after every other per-sample stage")
    inputs = pending_inputs(out, chunks, config.input.rows_per_chunk)
    pending_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs)
    bar = Progress("samples", pending_rows, progress)
    part_rows = min(PART_ROWS, config.input.rows_per_chunk)
    if pending_rows:
        if local:
            run_samples_local(streaming, inputs, out, bar, part_rows)
        else:
            from curate.cluster.ray_env import ensure_ray

            # on a terminal, Ray Data's own bars: one per stage, with its rows/s, live
            ensure_ray(config.ray, progress_bars=progress and sys.stderr.isatty())
            for summary in _iter_ray_samples(streaming, inputs, out, part_rows):
                bar.update(pc.sum(summary.column("rows")).as_py() or 0, summary)
    shutil.rmtree(out / "pending", ignore_errors=True)
    check_all_stored(out, chunks, config.input.rows_per_chunk)
    run_deferred_stages(out, stages, local=local, progress=progress)
    run_outside_rows(out, config, stages, global_stages, local=local, progress=progress)

    manifest = decide_and_write(
        out, config, stages, global_stages, chunks.rows, local=local,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), started=started,
    )
    return RunResult(out=out, manifest=manifest)


def run_deferred_stages(out: Path, stages: list[Stage], *, local: bool, progress: bool) -> None:
    """The stages that train on the stored pool itself, in pipeline order: bootstrapped scorers, then bootstrapped
    captioners (which train on what the scores trust and rescore with the fold scorers). On Ray their trainings
    and their passes over the stored parts run as tasks, not in this driver."""
    score = None
    for stage in stages:
        if not stage.deferred:
            continue
        with in_process(local):
            if stage.name == "score":
                from curate.train.bootstrap import bootstrap_scores

                bootstrap_scores(out, stage, progress)
                score = stage.config
            elif stage.name == "caption":
                from curate.train.bootstrap_captions import bootstrap_captions

                bootstrap_captions(out, stage, score, progress)
            else:
                raise RuntimeError(f"stage {stage.name} is deferred but the runner has no pass for it")


def check_all_stored(out: Path, chunks: InputChunks, rows_per_chunk: int) -> None:
    """Every input row stored exactly once before anything is decided; duplicates from retried tasks are dropped."""
    index = part_store.PartIndex(out)
    for number, chunk in enumerate(chunks.files):
        rows = pq.ParquetFile(chunk).metadata.num_rows
        first = number * rows_per_chunk
        distinct, stored = index.stored_rows(first, first + rows - 1)
        if stored > len(distinct):
            part_store.drop_duplicate_rows(out, first, first + rows - 1)
            index = part_store.PartIndex(out)
        if len(distinct) != rows:
            raise CurateError(
                f"output {out}: input chunk {number} has {len(distinct)} of {rows} rows stored; "
                "run the same command again to resume"
            )
