"""Benchmark: what the decide phase costs the driver, on a synthetic stored run.

A run's stored parts are generated (not timed): uids, 64-bit pHashes with 10% near copies, sha256 and pixel digests
with 5% exact copies, CLIP scores and 64-d float16 image embeddings with 5% near-identical vectors, in parts of
``--part-rows`` rows. The global stages a LAION-style pipeline runs (dedup_exact, dedup_phash on whole-image hashes,
dedup_semantic, alignment top 70%) then decide over them through ``run_global_stages``, the code a pipeline runs.

Each mode runs in its own subprocess, so its peak memory is its own:
- ``in_process``: every read happens in this process, so the script counts them: reads of each part's columns
  (``pq.read_table``) per part is the number of passes the decide phase makes over the stored parts;
- ``ray``: the tiers as tasks on an embedded Ray; the figure is the driver's own peak RSS (tasks run in workers).

Prints rows, seconds, the driver's peak RSS, and passes over the parts (in_process) per size. Figures only.

    .venv/bin/python benchmarks/decide.py                      # 10k and 100k rows, both modes
    .venv/bin/python benchmarks/decide.py --sizes 100000 --modes ray
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_run(folder: Path, n: int, part_rows: int, seed: int = 0) -> list[Path]:
    import numpy as np
    import pyarrow as pa

    from benchmarks.dedup import planted_codes
    from curate.core.parts import part_files, write_part

    rng = np.random.default_rng(seed)
    codes = planted_codes(n, seed)
    digests = rng.integers(0, 2**62, size=n)
    copies = rng.choice(n, size=n // 20, replace=False)
    digests[copies] = digests[rng.integers(0, n, size=len(copies))]
    vectors = rng.standard_normal((n, 64)).astype(np.float32)
    near = rng.choice(n, size=n // 20, replace=False)
    vectors[near] = vectors[rng.integers(0, n, size=len(near))] + 0.01 * rng.standard_normal((len(near), 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    for start in range(0, n, part_rows):
        rows = np.arange(start, min(n, start + part_rows))
        k = len(rows)
        write_part(pa.table({
            "uid": [f"{i:032x}" for i in rows], "row": pa.array(rows, pa.int64()),
            "status": ["ok"] * k, "reason": pa.nulls(k, pa.string()), "decided_by": pa.nulls(k, pa.string()),
            "caption": [f"caption {i}" for i in rows],
            "phash": pa.array(codes[rows]), "color_signature": [bytes(48)] * k, "sha256": [f"{d:064x}" for d in digests[rows]],
            "pixel_sha256": [f"{d:064x}" for d in digests[rows]],
            "original_width": pa.array(rng.integers(64, 1024, k), pa.int32()),
            "original_height": pa.array(rng.integers(64, 1024, k), pa.int32()),
            "clip_score": pa.array(rng.random(k).astype(np.float32)), "clip_model": ["bench-model"] * k,
            "image_embedding": pa.array(list(vectors[rows]), pa.list_(pa.float16())),
        }), str(folder / "parts"))
    return part_files(folder)


def decide(n: int, mode: str, part_rows: int) -> dict:
    import pyarrow.parquet as pq

    from curate.core.decide import run_global_stages
    from curate.core.fan_out import in_process
    from curate.stages.alignment import AlignmentConfig, AlignmentFilter
    from curate.stages.dedup_exact import DedupExact, DedupExactConfig
    from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig
    from curate.stages.dedup_semantic import DedupSemantic, DedupSemanticConfig

    with tempfile.TemporaryDirectory() as tmp:
        parts = write_run(Path(tmp), n, part_rows)
        stages = [DedupExact(DedupExactConfig()), DedupPhash(DedupPhashConfig(content=False)),
                  DedupSemantic(DedupSemanticConfig(threshold=0.99)), AlignmentFilter(AlignmentConfig(keep_top=0.7))]
        reads: Counter[str] = Counter()
        embedding_reads: Counter[str] = Counter()
        real_read = pq.read_table

        def counted(source, *args, **kwargs):
            reads[str(source)] += 1
            embedding_reads[str(source)] += "image_embedding" in (kwargs.get("columns") or [])
            return real_read(source, *args, **kwargs)

        by_stage: Counter[str] = Counter()
        for stage in stages:  # each stage's reads, for the passes it makes
            def counted_stage(pool, decide_pool=stage.decide_pool, name=stage.name):
                start_reads = sum(reads.values())
                result = decide_pool(pool)
                by_stage[name] += sum(reads.values()) - start_reads
                return result
            stage.decide_pool = counted_stage
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if mode == "ray":
            from curate.cluster.ray_env import ensure_ray
            from curate.config import RayConfig

            ensure_ray(RayConfig())
            start = time.perf_counter()
            decisions, _ = run_global_stages(parts, stages)
        else:
            pq.read_table = counted
            start = time.perf_counter()
            with in_process():
                decisions, _ = run_global_stages(parts, stages)
            pq.read_table = real_read
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        passes = sum(reads[str(p)] for p in parts) / len(parts) if mode != "ray" else None
        return {"rows": n, "mode": mode, "parts": len(parts), "seconds": round(seconds, 2),
                "driver_peak_rss_mib": round(peak, 1), "rss_before_decide_mib": round(before, 1),
                "passes_over_parts": passes, "removed": len(decisions),
                "embedding_passes": sum(embedding_reads.values()) / len(parts) if mode != "ray" else None,
                "passes_by_stage": {k: v / len(parts) for k, v in by_stage.items()} if mode != "ray" else None,
                "removed_by": dict(Counter(d[2] for d in decisions.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--modes", nargs="+", default=["in_process", "ray"], choices=["in_process", "ray"])
    parser.add_argument("--part-rows", type=int, default=5_000)
    parser.add_argument("--one", nargs=2, metavar=("ROWS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(decide(int(args.one[0]), args.one[1], args.part_rows)))
        return
    for n in args.sizes:
        for mode in args.modes:
            done = subprocess.run([sys.executable, __file__, "--one", str(n), mode, "--part-rows",
                                   str(args.part_rows)], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            passes = result["passes_over_parts"]
            print(f"{n:>8} rows  {mode:<10}  {result['seconds']:7.2f} s  driver peak RSS "
                  f"{result['driver_peak_rss_mib']:7.1f} MiB (before deciding {result['rss_before_decide_mib']:.1f})"
                  + (f"  passes over the parts {passes:.1f} {result['passes_by_stage']}, of them reading the "
                     f"embeddings {result['embedding_passes']:.1f}" if passes is not None else "")
                  + f"  removed {result['removed']} {result['removed_by']}")


if __name__ == "__main__":
    main()
