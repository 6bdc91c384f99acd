"""`curate run PIPELINE --from-run OUT [--dry-run]`: decide again over a finished run's stored metadata.

Score once, decide later: a new filter or dedup config needs no download and no GPU. With ``--dry-run`` the new
decisions are only counted and printed (seconds, nothing written). Without it they are published in a new output
folder: its ``parts/`` link to the finished run's stored rows, and the shards, ledger and manifest are written from
them — the kept samples resharded, nothing fetched or scored again.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from curate.core import parts as part_store
from curate.config import PipelineConfig
from curate.core.decide import apply_decisions, decide_and_write, package_versions, run_global_stages, stage_stats
from curate.errors import CurateError
from curate.core.ledger import Manifest, read_manifest
from curate.core.runner import (CONFIG_FILE, build_stages, first_difference, per_sample_signature,
                                 run_outside_rows)
from curate.core.stage import KEPT, OK


def _check_same_per_sample_work(source: Path, config: PipelineConfig) -> Manifest:
    manifest = read_manifest(source)
    if manifest is None:
        raise CurateError(f"--from-run {source}: not a finished run (no manifest.json); finish it first")
    saved = yaml.safe_load((source / CONFIG_FILE).read_text()) or {}
    old, new = saved.get("per_sample_signature"), per_sample_signature(config)
    if old is not None and old != new:
        raise CurateError(f"--from-run {source}: its per-sample stages differ from this pipeline's "
                          f"({first_difference(old, new)}); only global stages (filters, dedup) can be re-decided")
    return manifest


def dry_run(config: PipelineConfig, source: Path, local: bool = False) -> Manifest:
    """The manifest the new decisions would publish (no shards); nothing is written (outside rows a decision needs,
    such as eval images the finished run did not process, go through the per-sample stages in a temporary folder)."""
    started = time.monotonic()
    source = Path(source).resolve()
    previous = _check_same_per_sample_work(source, config)
    stages, global_stages = build_stages(config)
    parts = part_store.part_files(source)
    decide_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="curate-dry-run-") as scratch:
        run_outside_rows(Path(scratch), config, stages, global_stages, local=local, progress=False, reuse=source)
    decisions, would_reject = run_global_stages(parts, global_stages, stages)
    decide_seconds = time.perf_counter() - decide_start
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    stopped_by: Counter[str] = Counter()
    for part in parts:
        table = apply_decisions(pq.read_table(part, columns=["row", "status", "reason", "decided_by"]), decisions, {})
        for status, reason, stage in zip(*(table.column(c).to_pylist() for c in ("status", "reason", "decided_by"))):
            by_status[KEPT if status == OK else status] += 1
            if reason:
                by_reason[reason] += 1
            if stage and status != OK:
                stopped_by[stage] += 1
    stats = stage_stats([*stages, *global_stages], previous.input_rows, stopped_by,
                        {stage.name: decide_seconds for stage in global_stages})
    return Manifest(pipeline=config.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    input_rows=previous.input_rows, shards=[],
                    totals_by_status={s: by_status.get(s, 0) for s in ("kept", "filtered", "failed")},
                    totals_by_reason=dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
                    would_reject=would_reject, stages=stats, elapsed_seconds=round(time.monotonic() - started, 3),
                    config=config.resolved(), versions=package_versions())


def redecide(config: PipelineConfig, source: Path, output: Path, local: bool = False) -> Manifest:
    """Publish the new decisions in ``output`` from ``source``'s stored rows (linked, not copied)."""
    started = time.monotonic()
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source:
        raise CurateError(f"--output {output}: is the run decided from; write the new decisions to another folder")
    previous = _check_same_per_sample_work(source, config)
    if output.exists() and any(output.iterdir()) and not (output / ".from-run").exists():
        raise CurateError(f"--output {output}: folder is not empty; choose a new or empty folder")
    stages, global_stages = build_stages(config)
    (output / part_store.PARTS).mkdir(parents=True, exist_ok=True)
    (output / ".from-run").write_text(f"{source}\n")
    for part in part_store.part_files(source):  # the stored rows, images included, shared with the source run
        link = output / part_store.PARTS / part.name
        if not link.exists():
            os.symlink(part, link)
    resolved = config.resolved()
    resolved["per_sample_signature"] = per_sample_signature(config)
    resolved["from_run"] = str(source)
    (output / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    run_outside_rows(output, config, stages, global_stages, local=local, progress=True, reuse=source)
    return decide_and_write(output, config, stages, global_stages, previous.input_rows, local=local,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), started=started)
