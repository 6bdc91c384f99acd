"""Benchmark: `curate inspect OUT --html` on a finished run of 100,000 rows (targets: under 30 s, under 20 MB).

The run is synthesised in the layout a pipeline leaves (parts with 128 px JPEGs and scores, a ledger with reasons
and duplicate groups, a manifest), so the benchmark measures the report and not a download. Prints the seconds, the
file's size and the number of inline images. Figures only.

    .venv/bin/python benchmarks/report.py --rows 100000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthesise(out: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from curate.core.ledger import LedgerWriter, Manifest, StageStats, write_json_atomic
    from curate.core.parts import PARTS

    rng = np.random.default_rng(seed)
    images = []
    for k in range(64):  # a few distinct 128 px JPEGs, reused
        pixels = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((128, 128)).save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(rows)]
    scores = rng.normal(0.28, 0.05, rows).astype(np.float32)
    failed = rng.random(rows) < 0.1
    duplicate = (rng.random(rows) < 0.05) & ~failed
    low = (scores < np.quantile(scores, 0.3)) & ~failed & ~duplicate
    status = np.where(failed, "failed", np.where(duplicate | low, "filtered", "kept"))
    reason = np.where(failed, "download:http_404", np.where(duplicate, "dedup:phash",
                                                           np.where(low, "alignment:below_top_fraction", None)))
    (out / PARTS).mkdir(parents=True)
    per_part = 10_000
    for start in range(0, rows, per_part):
        end = min(rows, start + per_part)
        n = end - start
        digest = hashlib.sha256("".join(uids[start:end]).encode()).hexdigest()[:16]
        pq.write_table(pa.table({
            "uid": uids[start:end], "row": pa.array(range(start, end), pa.int64()),
            "url": [f"http://example.invalid/{i}.jpg" for i in range(start, end)],
            "caption": [f"a photo number {i}" for i in range(start, end)],
            "status": ["failed" if f else "ok" for f in failed[start:end]],
            "reason": pa.array([r if f else None for r, f in zip(reason[start:end], failed[start:end])], pa.string()),
            "decided_by": pa.array(["download" if f else None for f in failed[start:end]], pa.string()),
            "image": [None if failed[i] else images[i % len(images)] for i in range(start, end)],
            "clip_score": pa.array([None if failed[i] else float(scores[i]) for i in range(start, end)],
                                   pa.float32()),
        }), out / PARTS / f"{start:012d}-{end - 1:012d}-{digest}.parquet")
        del n
    survivors = np.flatnonzero(status == "kept")
    ledger = LedgerWriter(out)
    ledger.write(pa.table({
        "uid": uids, "url": [f"http://example.invalid/{i}.jpg" for i in range(rows)],
        "caption": [f"a photo number {i}" for i in range(rows)], "status": status.tolist(),
        "reason": pa.array(reason.tolist(), pa.string()),
        "shard": [f"shards/{i // 10_000:05d}.tar" if s == "kept" else None for i, s in enumerate(status)],
        "key": [f"{i:09d}" if s == "kept" else None for i, s in enumerate(status)],
        "duplicate_of": [uids[int(rng.choice(survivors))] if d else None for d in duplicate],
    }))
    ledger.close()
    counts = {s: int((status == s).sum()) for s in ("kept", "filtered", "failed")}
    by_reason = {r: int((reason == r).sum()) for r in set(reason.tolist()) if r}
    write_json_atomic(out / "manifest.json", Manifest(
        pipeline="synthetic", created="now", input_rows=rows, shards=[], totals_by_status=counts,
        totals_by_reason=by_reason, would_reject={}, stages=[
            StageStats(name="download", rows_in=rows, rows_out=rows - counts["failed"], wall_seconds=0),
            StageStats(name="dedup_phash", rows_in=rows - counts["failed"],
                       rows_out=rows - counts["failed"] - int(duplicate.sum()), wall_seconds=0),
            StageStats(name="alignment", rows_in=rows - counts["failed"] - int(duplicate.sum()),
                       rows_out=counts["kept"], wall_seconds=0)],
        elapsed_seconds=0, config={"stages": [{"stage": "alignment", "keep_top": 0.7}]}, versions={},
    ).model_dump(mode="json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    from curate.report.html import write_report

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        started = time.perf_counter()
        synthesise(out, args.rows)
        made = time.perf_counter() - started
        started = time.perf_counter()
        path = write_report(out, Path(tmp) / "report.html")
        seconds = time.perf_counter() - started
        text = path.read_text()
        print(f"{args.rows} rows (synthesised in {made:.1f} s): report in {seconds:.1f} s, "
              f"{path.stat().st_size / 2**20:.1f} MiB, {text.count('data:image/jpeg')} thumbnails, "
              f"{text.count('data:image/png')} charts (targets: < 30 s, < 20 MB)")


if __name__ == "__main__":
    main()
