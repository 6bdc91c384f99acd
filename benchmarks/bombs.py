"""Benchmark: peak memory of a download run whose input is full of huge images, with 64 requests in flight.

Serves on 127.0.0.1: 20000×30000 and 40000×40000 PNG bombs (refused from their header), large but legal images
(8000×8000 PNGs: 256 MB each once decoded with alpha) and ordinary JPEGs, then runs `curate run` with
threads=64 on the embedded Ray in a subprocess, twice: with the default decode budget and with the budget
effectively off. Prints peak RSS of the whole process tree for each, summed and without shared pages (target:
under 2 GB with the budget).

    .venv/bin/python benchmarks/bombs.py --rows 256
"""

from __future__ import annotations

import argparse
import io
import json
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


def write_files(folder: Path) -> list[str]:
    from curate.demo.pool import bomb_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bomb-20k-30k.png").write_bytes(bomb_png(20000, 30000))
    (folder / "bomb-40k.png").write_bytes(bomb_png(40000))
    names = ["bomb-20k-30k.png", "bomb-40k.png"]
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGBA", (8000, 8000), (40 * i, 90, 160, 200)).save(buffer, "PNG", compress_level=1)
        (folder / f"large-{i}.png").write_bytes(buffer.getvalue())
        names.append(f"large-{i}.png")
    for i in range(8):
        buffer = io.BytesIO()
        Image.new("RGB", (640, 480), (30 * i, 200, 90)).save(buffer, "JPEG", quality=90)
        (folder / f"small-{i}.jpg").write_bytes(buffer.getvalue())
        names.append(f"small-{i}.jpg")
    return names


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak summed RSS of the process tree, peak summed RSS minus shared pages; MiB). Summed RSS counts
    pages shared between processes (Ray's object store, libraries) once per process; the private figure does not."""
    start, peak, peak_private = time.monotonic(), 0, 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = private = 0
        try:
            for member in [root, *root.children(recursive=True)]:
                try:
                    mem = member.memory_info()
                except psutil.Error:
                    continue
                total, private = total + mem.rss, private + mem.rss - mem.shared
        except psutil.Error:
            pass
        peak, peak_private = max(peak, total), max(peak_private, private)
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"run failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return time.monotonic() - start, peak / 2**20, peak_private / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from curate.demo.server import FaultServer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        names = write_files(tmp / "files")
        with FaultServer(tmp / "files") as server:
            urls = tmp / "urls.parquet"
            picks = [names[i % len(names)] for i in range(args.rows)]
            pq.write_table(pa.table({"url": [server.url("img", n) for n in picks], "caption": picks}), urls)
            results = []
            for label, budget_mb in (("decode budget 768 MiB (default)", 768), ("budget off", 1_000_000)):
                out = tmp / f"out-{budget_mb}"
                cmd = [sys.executable, "-m", "curate.cli", "run", str(REPO / "pipelines" / "demo.yaml"),
                       "--input", str(urls), "--output", str(out), "--quiet",
                       "--set", "download.threads=64", "--set", "download.resources.batch_size=64",
                       "--set", "download.resources.concurrency=1", "--set", "download.timeout=60",
                       "--set", "download.max_image_pixels=89478485", "--set", "download.max_bytes=268435456",
                       "--set", f"download.decode_memory_mb={budget_mb}", "--set", "input.rows_per_chunk=64"]
                seconds, peak, private = run(cmd)
                manifest = json.loads((out / "manifest.json").read_text())
                results.append((label, seconds, peak, private, manifest["totals_by_status"],
                                manifest["totals_by_reason"]))
    for label, seconds, peak, private, statuses, reasons in results:
        print(f"{label:<34} {seconds:6.1f}s  peak RSS {peak:7.0f} MiB  private {private:7.0f} MiB  {statuses}  "
              f"{reasons}")


if __name__ == "__main__":
    main()
