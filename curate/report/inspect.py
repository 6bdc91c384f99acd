"""`curate inspect OUT`: the funnel, counts by reason and a few rows, from the manifest and the ledger."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from curate.errors import CurateError
from curate.core.ledger import Manifest, check_run, read_ledger, read_manifest
from curate.report.terminal import printable


def _funnel_steps(manifest: Manifest) -> list[str]:
    """rows in → downloaded → decoded → ... → kept, from the reason domains each stage declared (the manifest
    carries them: the report reads a run's outputs, not the stage classes)."""
    steps = [f"{manifest.input_rows} in"]
    for stage in manifest.stages:
        alive = stage.rows_in
        for domain, label in stage.funnel:
            alive -= sum(n for reason, n in manifest.totals_by_reason.items() if reason.startswith(f"{domain}:"))
            steps.append(f"{alive} {label}")
        if stage.name != "write" and stage.rows_out != alive:
            steps.append(f"{stage.rows_out} past {stage.name}")
    steps.append(f"{manifest.totals_by_status.get('kept', 0)} kept")
    return steps


def print_funnel(out: Path) -> None:
    manifest = read_manifest(out)
    if manifest is None:
        raise CurateError(f"{out}: no manifest.json; the run has not finished (run it again to resume)")
    print_manifest(manifest, out)


def print_manifest(manifest: Manifest, out: Path | None) -> None:
    """The funnel, per-stage counts, counts by reason; ``out`` None for a dry run (nothing was written)."""
    total = manifest.input_rows
    print(f"\n{manifest.pipeline}: {total} rows in" + ("" if out else " (dry run: nothing written)"))
    print("  " + " -> ".join(_funnel_steps(manifest)))
    for stage in manifest.stages:
        share = 100 * stage.rows_out / total if total else 0.0
        print(f"  {stage.name:<12} {stage.rows_in:>9} -> {stage.rows_out:>9}  ({share:5.1f}% of input)"
              f"  {stage.wall_seconds:8.1f}s busy")
    print("  by status: " + ", ".join(f"{k} {v}" for k, v in manifest.totals_by_status.items()))
    if manifest.totals_by_reason:
        print("  by reason:")
        for reason, count in manifest.totals_by_reason.items():
            print(f"    {reason:<32} {count:>8}")
    if manifest.would_reject:
        print("  each filter on its own would reject:")
        for reason, count in manifest.would_reject.items():
            print(f"    {reason:<32} {count:>8}")
    if out is None:
        return
    samples = sum(s.samples for s in manifest.shards)
    size = sum(s.bytes for s in manifest.shards)
    print(f"  {len(manifest.shards)} shards, {samples} samples, {size / 2**20:.1f} MiB in {Path(out) / 'shards'}")
    print(f"  ledger: {Path(out) / 'ledger.parquet'}   manifest: {Path(out) / 'manifest.json'}")


def inspect_run(out: Path, sample: int = 5, reason: str | None = None, verify: bool = False) -> int:
    print_funnel(out)
    ledger = read_ledger(out)
    if reason:
        column = "status" if reason in ("kept", "filtered", "failed") else "reason"
        rows = ledger.filter(pc.equal(ledger.column(column), reason))
        if rows.num_rows == 0:
            known = sorted({r for r in ledger.column("reason").to_pylist() if r})
            raise CurateError(f"{out}: no rows with reason '{reason}'; reasons present: {', '.join(known) or 'none'}")
    else:
        rows = ledger
    print(f"\n{min(sample, rows.num_rows)} of {rows.num_rows} rows" + (f" with {reason}" if reason else "") + ":")
    for row in rows.slice(0, sample).to_pylist():
        where = f"{row['shard']}#{row['key']}" if row["shard"] else row["reason"]
        caption = (row["caption"] or "")[:60]
        print(f"  {row['uid'][:12]}  {row['status']:<8} {where:<34} {printable(row['url'])}  {caption!r}")
    if verify:
        problems = check_run(out)
        if problems:
            for problem in problems:
                print(f"verify: {problem}")
            return 1
        print("\nverify: ok (ledger rows = input rows, uids unique, kept = manifest = tars)")
    return 0
