"""Benchmark: peak memory of `curate run` must not grow with the size of the input list.

Runs the same pipeline on URL lists of N and k×N rows (same images, same mix of good and missing URLs, served on
127.0.0.1), each in its own subprocess on the embedded Ray, and prints the driver's peak RSS and the peak summed RSS
of the whole process tree (Ray's raylet and workers included) for each size, and their ratios. Figures only.

    .venv/bin/python benchmarks/memory.py --n 2000 --factor 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.2


def write_images(folder: Path, count: int = 16) -> list[str]:
    """A few small distinct JPEGs: the benchmark is about rows, not pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (96 + i, 80), (i * 15 % 256, 90, 200 - i * 10)).save(buffer, "JPEG", quality=85)
        (folder / f"{i:03d}.jpg").write_bytes(buffer.getvalue())
        names.append(f"{i:03d}.jpg")
    return names


def write_url_list(path: Path, rows: int, base_url: str, names: list[str], good_every: int) -> None:
    """One row in `good_every` points at a real image, the others at 404s (cheap to serve, still ledger rows)."""
    urls = [f"{base_url}/img/{names[i % len(names)]}" if i % good_every == 0 else f"{base_url}/missing/{i}.jpg"
            for i in range(rows)]
    pq.write_table(pa.table({"url": urls, "caption": [f"row {i}" for i in range(rows)]}), path)


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """Run cmd; return (seconds, peak summed RSS of its process tree in MiB, the driver's peak RSS in MiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    tree_peak = driver_peak = 0
    while proc.poll() is None:
        try:
            members = [root] + root.children(recursive=True)
            total = 0
            for member in members:
                try:
                    rss = member.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if member.pid == proc.pid:
                    driver_peak = max(driver_peak, rss)
            tree_peak = max(tree_peak, total)
        except psutil.Error:
            pass
        time.sleep(POLL_SECONDS)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return time.monotonic() - start, tree_peak / 2**20, driver_peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="rows of the small input")
    parser.add_argument("--factor", type=int, default=10, help="the large input has factor × n rows")
    parser.add_argument("--good-every", type=int, default=10, help="one real image every this many rows")
    parser.add_argument("--local", action="store_true", help="run without Ray")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from curate.demo.server import FaultServer

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with tempfile.TemporaryDirectory() as tmp_name, FaultServer(Path(tmp_name) / "files") as server:
        tmp = Path(tmp_name)
        names = write_images(tmp / "files")
        results = []
        for rows in (args.n, args.n * args.factor):
            urls = tmp / f"urls-{rows}.parquet"
            write_url_list(urls, rows, server.base_url, names, args.good_every)
            out = tmp / f"out-{rows}"
            cmd = [sys.executable, "-m", "curate.cli", "run", str(REPO / "pipelines" / "demo.yaml"), "--input",
                   str(urls), "--output", str(out), "--quiet", "--set", "input.rows_per_chunk=1000",
                   "--set", "download.retries=0"] + (["--local"] if args.local else [])
            seconds, tree, driver = peak_memory(cmd)
            manifest = json.loads((out / "manifest.json").read_text())
            results.append((rows, seconds, tree, driver, manifest["totals_by_status"]["kept"]))
    print(f"{'rows':>8} {'kept':>7} {'seconds':>8} {'rows/s':>7} {'driver peak MiB':>16} {'tree peak MiB':>14}")
    for rows, seconds, tree, driver, kept in results:
        print(f"{rows:>8} {kept:>7} {seconds:>8.1f} {rows / seconds:>7.0f} {driver:>16.0f} {tree:>14.0f}")
    (small, *_), (large, *_) = results[0], results[1]
    print(f"input ×{large // small}: driver peak ×{results[1][3] / results[0][3]:.2f}, "
          f"tree peak ×{results[1][2] / results[0][2]:.2f}")


if __name__ == "__main__":
    main()
