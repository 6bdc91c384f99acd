"""`curate why OUT UID|URL`: the whole story of one row — what each stage stored for it, the decision and the stage
that made it, the row it duplicates, and where it sits in its shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import parts as part_store
from curate.errors import CurateError
from curate.core.ledger import DECISION_TABLES, Manifest, read_ledger, read_manifest
from curate.report.terminal import printable
from curate.core.schema import BASE_COLUMNS, is_embedding_column

HIDDEN = {"image"}  # bytes: shown as a size


def _stage_of_columns(manifest: Manifest) -> dict[str, str]:
    """Which stage stored each column, as the run's manifest records it."""
    owner = {name: "input" for name in BASE_COLUMNS}
    for stage in manifest.stages:
        for column in stage.columns:
            owner.setdefault(column, stage.name)
        owner.setdefault(f"{stage.name}_seconds", stage.name)
    return owner


def find_rows(out: Path, key: str) -> list[dict[str, Any]]:
    ledger = read_ledger(out)
    column = "uid" if 0 < len(key) <= 32 and all(c in "0123456789abcdef" for c in key) else "url"
    if column == "uid":  # a whole uid or its first characters
        rows = ledger.filter(pc.starts_with(ledger.column("uid"), key)).to_pylist()
    else:
        rows = ledger.filter(pc.equal(ledger.column("url"), key)).to_pylist()
    if not rows:
        raise CurateError(f"{out}: no row with {column} {key}")
    return rows


def stored_row(out: Path, uid: str) -> dict[str, Any]:
    for part in part_store.part_files(out):  # uids first: images are read only from the part that holds the row
        uids = pq.read_table(part, columns=["uid"]).column("uid")
        if pc.any(pc.equal(uids, uid)).as_py():
            return pq.read_table(part, filters=[("uid", "=", uid)]).to_pylist()[0]
    return {}


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return f"<vector of {len(value)}>"
    return repr(value) if isinstance(value, str) else str(value)


def balance_entries_of(out: Path, manifest: Manifest, caption: str | None) -> list[tuple[str, int, int]]:
    """The balance entries ``caption`` holds, as the run's balance stage matched them, each with the live rows
    that held it and the rows kept after balancing (OUT/decisions/balance_entries.parquet); [] without one."""
    path = out / DECISION_TABLES / "balance_entries.parquet"
    if not caption or not path.exists() or not any(s.name == "balance" for s in manifest.stages):
        return []
    from curate.stages.metadata_entries import build_matcher, matched_entries

    table = pq.read_table(path).to_pylist()
    found = matched_entries(build_matcher([r["entry"] for r in table]), caption)
    return [(table[i]["entry"], table[i]["rows"], table[i]["kept"]) for i in found]


def print_why(out: Path, key: str) -> int:
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise CurateError(f"{out}: no manifest.json; the run has not finished (run it again to resume)")
    owner = _stage_of_columns(manifest)
    ledger = read_ledger(out)
    by_uid = {r["uid"]: r for r in ledger.select(["uid", "status", "reason"]).to_pylist()}
    for row in find_rows(out, key):
        print(f"uid {row['uid']}\n  url      {printable(row['url'])}\n  caption  {row['caption']!r}")
        stored = stored_row(out, row["uid"])
        stages: dict[str, list[str]] = {}
        for column, value in stored.items():
            if column in ("uid", "url", "caption", "status", "reason", "decided_by") or is_embedding_column(column):
                continue
            stages.setdefault(owner.get(column, "input"), []).append(f"{printable(column)}={_show(value)}")
        for stage, values in stages.items():
            print(f"  [{stage}] " + ", ".join(values))
        embedded = [c for c in stored if is_embedding_column(c) and stored[c] is not None]
        if embedded:
            print(f"  [embeddings] {', '.join(embedded)} (in {out / 'embeddings'})")
        entries = balance_entries_of(out, manifest, stored.get("caption", row["caption"]))
        if entries:
            print("  [balance] entries: " + ", ".join(f"{printable(e)} ({rows} rows, {kept} kept)"
                                                     for e, rows, kept in entries))
        decided = row.get("decided_by") or stored.get("decided_by")
        print(f"  decision: {row['status']}" + (f" — {row['reason']}" if row["reason"] else "")
              + (f" (by {decided})" if decided else ""))
        target = row.get("duplicate_of")
        if target:
            other = by_uid.get(target)
            state = f"{other['status']}" + (f", {other['reason']}" if other and other["reason"] else "") if other \
                else "not a pool row"
            print(f"  duplicate of {target} ({state})")
        if row["shard"]:
            index = pq.read_table(out / row["shard"].replace(".tar", ".parquet"), columns=["key"])
            position = index.column("key").to_pylist().index(row["key"])
            print(f"  in {row['shard']} as {row['key']} (sample {position + 1} of {index.num_rows})")
    return 0
