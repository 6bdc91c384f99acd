"""Benchmark: the pHash dedup tier on generated hash sets of 10k, 100k and 1M rows with planted near-duplicates.

Each size runs in its own subprocess (so its peak memory is its own): a table of uids, 64-bit codes (uniformly random,
like distinct pHashes) of which 10% are near copies of another row — flipped by 0-2 bits (re-encodes, resizes: 60%),
3-6 bits (25%) or 7-12 bits (crops: 15%), as measured on the demo pool — is written as parquet parts of 10k rows
(not timed) and goes through ``DedupPhash.decide_pool``, the exact code a pipeline runs (the shuffle by hash band,
banding, exact check, groups, keep policy). Prints seconds, peak RSS and rows removed per size,
the time ratio per 10× rows (target ≤ 12×), and on the 10k set the recall and precision of the banded pairs against
brute force over all pairs at the same radius (target recall ≥ 0.95 at precision ≥ 0.99). Figures only.

    .venv/bin/python benchmarks/dedup.py
    .venv/bin/python benchmarks/dedup.py --sizes 10000 100000 --radius 6
    .venv/bin/python benchmarks/dedup.py --ray       # map and reduce tasks on an embedded Ray
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def planted_codes(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    codes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64).view(np.uint64)
    copies = rng.choice(n, size=n // 10, replace=False)
    sources = rng.integers(0, n, size=len(copies))
    flips = np.select([rng.random(len(copies)) < 0.6, rng.random(len(copies)) < 0.625],
                      [rng.integers(0, 3, len(copies)), rng.integers(3, 7, len(copies))],
                      rng.integers(7, 13, len(copies)))
    for copy, source, count in zip(copies, sources, flips):
        code = codes[source]
        for bit in rng.choice(64, size=int(count), replace=False):
            code ^= np.uint64(1) << np.uint64(int(bit))
        codes[copy] = code
    return codes.view(np.int64)


def content_columns(codes, seed: int) -> dict:
    """The hash stage's content columns for planted codes: five view codes per row, each the row's code with the
    same bits flipped in every view of a copy as in its whole-image code (so copies stay copies in every view),
    and thumbnails and colour grids copied from the source row for copies (random for the rest)."""
    import numpy as np

    rng = np.random.default_rng([seed, 5])
    n = len(codes)
    views = rng.integers(-2**63, 2**63 - 1, size=(n, 5), dtype=np.int64)
    views[:, 0] = codes
    thumbs = rng.integers(0, 256, size=(n, 256), dtype=np.uint8)
    colours = rng.integers(0, 256, size=(n, 192), dtype=np.uint8)
    rng = np.random.default_rng(seed)  # planted_codes' draws, again: which rows copy which
    rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    copies = rng.choice(n, size=n // 10, replace=False)
    sources = rng.integers(0, n, size=len(copies))
    flips = (codes[copies].view(np.uint64) ^ codes[sources].view(np.uint64)).view(np.int64)
    views[copies] = (views[sources].view(np.uint64) ^ flips.view(np.uint64)[:, None]).view(np.int64)
    thumbs[copies], colours[copies] = thumbs[sources], colours[sources]
    return {"views": views, "thumbs": thumbs, "colours": colours}


def write_parts(folder: Path, codes, rows_per_part: int, content: dict | None = None) -> list[Path]:
    """The codes as a run stores them: parquet parts of ``rows_per_part`` rows with uid, row, status and hashes
    (and the content columns when given)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for start in range(0, len(codes), rows_per_part):
        rows = np.arange(start, min(len(codes), start + rows_per_part))
        columns = {"uid": [f"{i:012x}" for i in rows], "row": pa.array(rows, pa.int64()),
                   "status": ["ok"] * len(rows), "phash": pa.array(codes[rows], pa.int64()),
                   "color_signature": pa.array([bytes(48)] * len(rows), pa.binary())}
        if content is not None:
            columns["content_phash"] = pa.array(content["views"][rows].tolist(), pa.list_(pa.int64()))
            columns["content_thumbnail"] = pa.array([r.tobytes() for r in content["thumbs"][rows]], pa.binary())
            columns["content_colors"] = pa.array([r.tobytes() for r in content["colours"][rows]], pa.binary())
        table = pa.table(columns)
        paths.append(folder / f"{start:012d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def child(n: int, radius: int, seed: int, on_ray: bool, content: bool = False) -> dict:
    import tempfile

    if on_ray:  # map and reduce tasks on Ray (curate.core.pool, curate.core.fan_out), as in a pipeline run on Ray
        from curate.config import RayConfig
        from curate.cluster.ray_env import ensure_ray

        ensure_ray(RayConfig())

    from curate.core.pool import Pool
    from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig

    codes = planted_codes(n, seed)
    with tempfile.TemporaryDirectory(prefix="curate-dedup-bench-") as folder:
        pool = Pool.from_parts(write_parts(Path(folder), codes, rows_per_part=10_000,
                                           content=content_columns(codes, seed) if content else None))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        removed = DedupPhash(DedupPhashConfig(radius=radius)).decide_pool(pool)
        seconds = time.perf_counter() - start
    result = {"n": n, "seconds": round(seconds, 2), "removed": removed.num_rows,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "rss_before_mib": round(before / 1024, 1)}
    if n <= 20_000:
        from curate.dedup.bands import brute_force_pairs, phash_pairs

        truth = brute_force_pairs(codes, radius)
        left, right = phash_pairs(codes, radius=radius)
        found = set(zip(left.tolist(), right.tolist()))
        result["recall"] = round(len(found & truth) / max(1, len(truth)), 4)
        result["precision"] = round(len(found & truth) / max(1, len(found)), 4)
        result["pairs_within_radius"] = len(truth)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--radius", type=int, default=None, help="default: the stage's default radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray", action="store_true",
                        help="run the map and reduce tasks on an embedded Ray; Ray's start not timed")
    parser.add_argument("--content", action="store_true", help="the content path a pipeline with today's hash stage "
                        "runs: five view codes a row in the band search, then the thumbnails' second check")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from curate.dedup.bands import DEFAULT_RADIUS, tables_for

    radius = DEFAULT_RADIUS if args.radius is None else args.radius
    if args.child:
        print(json.dumps(child(args.child, radius, args.seed, args.ray, args.content)))
        return
    print(f"pHash dedup tier, radius {radius}: {radius + 1} bands × {tables_for(radius)} banding tables; 10% planted "
          "near copies" + ("; content path (five codes a row, second check)" if args.content else "") + ("; map and reduce tasks on Ray (peak RSS: the driver's)" if args.ray else ""))
    print(f"{'rows':>10}{'seconds':>10}{'peak RSS MiB':>14}{'removed':>10}{'time ratio':>12}")
    results = []
    for n in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--child", str(n), "--radius", str(radius),
                               "--seed", str(args.seed)] + (["--ray"] if args.ray else [])
                              + (["--content"] if args.content else []), capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = f"{result['seconds'] / results[-1]['seconds']:.1f}x" if results else ""
        results.append(result)
        print(f"{n:>10}{result['seconds']:>10.2f}{result['peak_rss_mib']:>14.1f}{result['removed']:>10}{ratio:>12}")
    for result in results:
        if "recall" in result:
            print(f"on {result['n']} rows vs brute force ({result['pairs_within_radius']} pairs within {radius} bits):"
                  f" recall {result['recall']:.4f}, precision {result['precision']:.4f}")


if __name__ == "__main__":
    main()
