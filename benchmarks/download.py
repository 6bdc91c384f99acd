"""Benchmark: curate's download stage against img2dataset on the same loopback pool, with the same settings.

One run generates a synthetic pool (curate.demo.pool), serves its fetchable images from a FaultServer on 127.0.0.1,
then runs each tool end to end in its own subprocess so that the peak memory of each (its whole process tree,
Ray's raylet and workers included) can be measured on its own. Prints a table and the curate/img2dataset ratios;
figures only, no asserts.

    .venv/bin/python benchmarks/download.py --n 2000 --processes 2 --threads 32
    .venv/bin/python benchmarks/download.py --n 2000 --set download.resources.batch_size=250
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

# Set before img2dataset (albumentations) or curate's model code is imported, here and in the children.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# Planted kinds whose files decode cleanly; served through the plain "img" route so neither tool meets a fault
# (a 30 s slow URL or a decompression bomb would measure the fault, not the throughput).
FETCHABLE = {"clean", "misaligned", "exact_duplicate", "near_duplicate", "alpha", "slow", "flaky", "redirect"}
POLL_SECONDS = 0.2


@dataclass
class Measured:
    tool: str
    samples: int
    seconds: float  # around the run only (imports and pool generation excluded)
    startup: float  # part of `seconds` spent starting Ray (curate only)
    peak_rss_mib: float  # summed RSS over the process tree (shared pages, e.g. Ray's object store, count per process)
    peak_private_mib: float  # summed RSS minus shared pages: closer to what the tree really holds
    driver_maxrss_mib: float  # ru_maxrss of the child's main process


def make_url_list(root: Path, n: int, base_url: str) -> tuple[Path, int]:
    """Generate the pool under root and write a parquet (url, caption) of its fetchable images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.demo.pool import make_pool

    items = [item for item in make_pool(root, n) if item.kind in FETCHABLE]
    path = root / "urls.parquet"
    pq.write_table(pa.table({
        "url": [f"{base_url}/img/{item.name}" for item in items],
        "caption": [item.caption for item in items],
    }), path)
    return path, len(items)


def count_samples(folder: Path, ext: str) -> int:
    """Samples written = image members in the tars under folder."""
    total = 0
    for path in sorted(folder.rglob("*.tar")):
        with tarfile.open(path) as tar:
            total += sum(1 for member in tar.getmembers() if member.name.endswith(f".{ext}"))
    return total


def curate_overrides(args: argparse.Namespace) -> list[str]:
    """demo.yaml made to match img2dataset's defaults and this run's settings; --set strings go last."""
    return [
        f"download.image_size={args.image_size}", f"download.resize_mode={args.resize_mode}",
        f"download.output_format={args.format}", "download.encode_quality=95", "download.min_image_size=0",
        "download.max_aspect_ratio=.inf", f"download.threads={args.threads}", f"download.timeout={args.timeout}",
        f"download.retries={args.retries}", f"download.resources.concurrency={args.processes}",
        f"output.samples_per_shard={args.samples_per_shard}", *args.set,
    ]


def child_curate(spec: dict) -> dict:
    from curate.config import load_pipeline
    from curate.ray_env import ensure_ray
    from curate.runner import run_pipeline

    config = load_pipeline(REPO / "pipelines" / "demo.yaml", spec["overrides"])
    start = time.perf_counter()
    ensure_ray(config.ray)  # timed apart: run_pipeline reuses the Ray started here
    ready = time.perf_counter()
    run_pipeline(config, input_path=spec["urls"], output=spec["out"], progress=False)
    end = time.perf_counter()
    import ray

    ray.shutdown()
    return {"seconds": end - start, "startup": ready - start}


def child_img2dataset(spec: dict) -> dict:
    from img2dataset import download

    a = spec["args"]
    start = time.perf_counter()
    download(
        url_list=spec["urls"], input_format="parquet", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=spec["out"], image_size=a["image_size"],
        resize_mode=a["resize_mode"], encode_format=a["format"], encode_quality=95,
        processes_count=a["processes"], thread_count=a["threads"], number_sample_per_shard=a["samples_per_shard"],
        distributor="multiprocessing", timeout=a["timeout"], retries=a["retries"], enable_wandb=False,
    )
    return {"seconds": time.perf_counter() - start, "startup": 0.0}


def _psutil() -> ModuleType:
    """psutil, or the copy Ray vendors (ray/thirdparty_files) when it is not installed on its own."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # type: ignore[union-attr, arg-type]
        sys.path.append(str(ray_dir / "thirdparty_files"))
        import psutil
    return psutil


def run_child(tool: str, spec: dict, work: Path) -> dict:
    """Run this script as `--child tool` and poll its process tree's memory until it exits."""
    psutil = _psutil()

    spec_path, result_path = work / f"{tool}.spec.json", work / f"{tool}.result.json"
    spec_path.write_text(json.dumps(spec))
    log = open(work / f"{tool}.log", "wb")
    proc = psutil.Popen(
        [sys.executable, __file__, "--child", tool, "--spec", str(spec_path), "--result", str(result_path)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    peak = peak_private = 0
    while proc.poll() is None:
        rss = private = 0
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                mem = p.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, private = rss + mem.rss, private + mem.rss - mem.shared
        peak, peak_private = max(peak, rss), max(peak_private, private)
        time.sleep(POLL_SECONDS)
    log.close()
    if proc.returncode != 0 or not result_path.exists():
        tail = (work / f"{tool}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tool} failed (exit {proc.returncode}); end of {work / f'{tool}.log'}:\n{tail}")
    result = json.loads(result_path.read_text())
    return {**result, "peak_rss_mib": peak / 2**20, "peak_private_mib": peak_private / 2**20}


def print_table(rows: list[Measured], offered: int) -> None:
    print(f"\n{offered} fetchable URLs offered")
    header = ("tool", "samples", "seconds", "samples/s", "peak RSS MiB", "private MiB", "driver maxrss MiB")
    print("{:<24}{:>9}{:>9}{:>11}{:>14}{:>13}{:>19}".format(*header))
    lines: list[tuple[str, Measured, float]] = []
    for row in rows:
        lines.append((row.tool, row, row.seconds))
        if row.startup:  # curate: the same run without Ray's start-up
            lines.append((f"{row.tool} (no Ray start)", row, row.seconds - row.startup))
    for name, row, seconds in lines:
        print(f"{name:<24}{row.samples:>9}{seconds:>9.2f}{row.samples / seconds:>11.1f}{row.peak_rss_mib:>14.0f}"
              f"{row.peak_private_mib:>13.0f}{row.driver_maxrss_mib:>19.0f}")
    by_tool = {row.tool: row for row in rows}
    if {"curate", "img2dataset"} <= set(by_tool):
        c, i = by_tool["curate"], by_tool["img2dataset"]
        reference = i.samples / i.seconds
        print(f"\ncurate/img2dataset samples/s: {c.samples / c.seconds / reference:.2f} "
              f"(without Ray start: {c.samples / (c.seconds - c.startup) / reference:.2f}); "
              f"peak RSS: {c.peak_rss_mib / i.peak_rss_mib:.2f}; "
              f"private: {c.peak_private_mib / i.peak_private_mib:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="pool rows generated (fetchable ones are served)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes = curate download actors")
    parser.add_argument("--threads", type=int, default=32, help="download threads per process/actor, both tools")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--timeout", type=int, default=10)
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    parser.add_argument("--skip-img2dataset", action="store_true", help="run curate only")
    parser.add_argument("--set", action="append", default=[], help="extra curate pipeline override KEY=VALUE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # inside a measured subprocess
        spec = json.loads(Path(args.spec).read_text())
        result = (child_curate if args.child == "curate" else child_img2dataset)(spec)
        result["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(args.result).write_text(json.dumps(result))
        return

    from curate.demo.server import FaultServer

    temp = None if args.out else tempfile.TemporaryDirectory(prefix="bench-download-")
    work = Path(args.out or temp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        with FaultServer(work / "pool" / "files") as server:
            start = time.perf_counter()
            urls, offered = make_url_list(work / "pool", args.n, server.base_url)
            print(f"pool: {args.n} rows, {offered} fetchable, generated in {time.perf_counter() - start:.1f}s")
            rows: list[Measured] = []
            tools = ["curate"] + ([] if args.skip_img2dataset else ["img2dataset"])
            for tool in tools:
                out = work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)  # both tools resume from what they find: start empty
                settings = vars(args) | {"out": None}  # JSON-able: the child needs only the numbers and names
                spec = {"urls": str(urls), "out": str(out), "overrides": curate_overrides(args), "args": settings}
                print(f"running {tool} ...", flush=True)
                r = run_child(tool, spec, work)
                samples = count_samples(out, args.format)
                rows.append(Measured(tool, samples, r["seconds"], r["startup"], r["peak_rss_mib"],
                                     r["peak_private_mib"], r["driver_maxrss_mib"]))
                print(json.dumps(asdict(rows[-1])), flush=True)
        print_table(rows, offered)
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    main()
