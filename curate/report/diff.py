"""`curate diff OUT_A OUT_B`: two runs compared — counts by status and reason side by side, and the rows kept in one
run and not in the other, with examples and the reason the other run gave."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from curate.errors import CurateError
from curate.core.ledger import read_ledger, read_manifest
from curate.report.terminal import printable


def print_diff(a: Path, b: Path, examples: int = 5) -> int:
    for out in (a, b):
        if read_manifest(out) is None:
            raise CurateError(f"{out}: not a finished run (no manifest.json)")
    rows_a = {r["uid"]: r for r in read_ledger(a).select(["uid", "url", "caption", "status", "reason"]).to_pylist()}
    rows_b = {r["uid"]: r for r in read_ledger(b).select(["uid", "url", "caption", "status", "reason"]).to_pylist()}
    print(f"A: {a}  ({len(rows_a)} rows)\nB: {b}  ({len(rows_b)} rows)")
    if rows_a.keys() != rows_b.keys():
        print(f"  the inputs differ: {len(rows_a.keys() - rows_b.keys())} rows only in A, "
              f"{len(rows_b.keys() - rows_a.keys())} only in B; comparing the {len(rows_a.keys() & rows_b.keys())} "
              "rows in both")
    for label, key in (("status", "status"), ("reason", "reason")):
        count_a = Counter(r[key] for r in rows_a.values() if r[key])
        count_b = Counter(r[key] for r in rows_b.values() if r[key])
        print(f"\n{'by ' + label:<36}{'A':>9}{'B':>9}{'B-A':>9}")
        for value in sorted(count_a.keys() | count_b.keys(), key=lambda v: -(count_a[v] + count_b[v])):
            print(f"  {value:<34}{count_a[value]:>9}{count_b[value]:>9}{count_b[value] - count_a[value]:>+9}")
    common = rows_a.keys() & rows_b.keys()
    only = {"kept in A, not in B": [u for u in common if rows_a[u]["status"] == "kept" != rows_b[u]["status"]],
            "kept in B, not in A": [u for u in common if rows_b[u]["status"] == "kept" != rows_a[u]["status"]]}
    for title, uids in only.items():
        print(f"\n{title}: {len(uids)}")
        other = rows_b if title.endswith("in B") else rows_a
        for uid in sorted(uids)[:examples]:
            row = other[uid]
            print(f"  {uid[:12]}  {row['status']:<8} {row['reason'] or '':<30} {printable(row['url'])}  {(row['caption'] or '')[:50]!r}")
    return 0
