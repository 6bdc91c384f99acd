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
LOCAL = "curate-local"  # `curate run --local`: every stage in one process, no Ray


@dataclass
class Measured:
    tool: str
    samples: int
    seconds: float  # around the run only (imports and pool generation excluded)
    startup: float  # part of `seconds` spent starting Ray (curate only)
    peak_rss_mib: float  # summed RSS over the process tree (shared pages, e.g. Ray's object store, count per process)
    peak_private_mib: float  # summed RSS minus shared pages: closer to what the tree really holds
    driver_maxrss_mib: float  # ru_maxrss of the child's main process
    p50_ms: float  # per-request fetch latency (curate: fetch_seconds; img2dataset: its download_image_with_retry)
    p99_ms: float


def make_url_list(root: Path, n: int, base_url: str, pool: str, sides: str) -> tuple[Path, int]:
    """Generate the pool under root and write a parquet (url, caption) of its fetchable images; a pool already
    generated there with the same settings (a kept --out folder) is reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, made = root / "urls.parquet", root / "pool.json"
    settings = {"n": n, "pool": pool, "sides": sides}
    if made.exists() and path.exists() and json.loads(made.read_text()) == settings:
        table = pq.read_table(path)
        urls = [f"{base_url}/img/{url.rsplit('/', 1)[1]}" for url in table.column("url").to_pylist()]
        pq.write_table(table.set_column(0, "url", pa.array(urls, pa.string())), path)  # this run's server port
        return path, table.num_rows
    made.unlink(missing_ok=True)

    from curate.demo.pool import make_pool, make_sized_pool

    if pool == "sized":
        items = make_sized_pool(root, n, sides=sides)
    else:
        items = [item for item in make_pool(root, n) if item.kind in FETCHABLE]
    pq.write_table(pa.table({
        "url": [f"{base_url}/img/{item.name}" for item in items],
        "caption": [item.caption for item in items],
    }), path)
    made.write_text(json.dumps(settings))
    return path, len(items)


def real_url_list(pool: Path, root: Path, n: int, base_url: str) -> tuple[Path, int]:
    """The real development pool's first ``n`` rows served as plain images (route ``img``: its download faults
    left out), as a URL list (url, caption) for both tools."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(pool / "pool.parquet")
    table = table.filter(pc.equal(table.column("route"), "img")).slice(0, n)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{base_url}/img/{name}" for name in table.column("name").to_pylist()],
                             "caption": table.column("caption")}), path)
    return path, table.num_rows


def half_url_list(urls: Path) -> Path:
    """The first half of the URL list, for the marginal rate (the fixed costs of both tools cancel out)."""
    import pyarrow.parquet as pq

    table = pq.read_table(urls)
    path = urls.with_name("urls-half.parquet")
    pq.write_table(table.slice(0, table.num_rows // 2), path)
    return path


def latencies(tool: str, out: Path, timing_dir: Path) -> list[float]:
    """Seconds per fetched URL: curate stores them (fetch_seconds in the shard indexes); img2dataset's were logged
    by benchmarks/i2d_timing/sitecustomize.py."""
    if tool.startswith("curate"):
        import pyarrow.parquet as pq

        return [v for path in sorted((out / "shards").glob("*.parquet"))
                for v in pq.read_table(path, columns=["fetch_seconds"]).column(0).to_pylist() if v is not None]
    return [float(line) for path in sorted(timing_dir.glob("*.txt")) for line in path.read_text().split()]


def percentile_ms(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) * 1000 if values else float("nan")


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


def child_curate(spec: dict, local: bool = False) -> dict:
    """curate on an embedded Ray (Ray's start timed apart), or with ``local`` in this one process (`--local`)."""
    from curate.core.pipeline import load_pipeline
    from curate.cluster.ray_env import ensure_ray
    from curate.core.runner import run_pipeline

    config = load_pipeline(REPO / "pipelines" / "demo.yaml", spec["overrides"])
    start = time.perf_counter()
    if not local:
        ensure_ray(config.ray)  # timed apart: run_pipeline reuses the Ray started here
    ready = time.perf_counter()
    run_pipeline(config, input_path=spec["urls"], output=spec["out"], progress=False, local=local)
    end = time.perf_counter()
    if not local:
        import ray

        ray.shutdown()
    return {"seconds": end - start, "startup": 0.0 if local else ready - start}


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


def run_child(tool: str, spec: dict, work: Path, timing_dir: Path) -> dict:
    """Run this script as `--child tool` and poll its process tree's memory until it exits."""
    psutil = _psutil()

    spec_path, result_path = work / f"{tool}.spec.json", work / f"{tool}.result.json"
    spec_path.write_text(json.dumps(spec))
    log = open(work / f"{tool}.log", "wb")
    env = dict(os.environ)
    if tool == "img2dataset":  # time its fetches in every process it spawns (see i2d_timing/sitecustomize.py)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "i2d_timing"),
                                                          env.get("PYTHONPATH")]))
        env["CURATE_BENCH_LATENCY_DIR"] = str(timing_dir)
    proc = psutil.Popen(
        [sys.executable, __file__, "--child", tool, "--spec", str(spec_path), "--result", str(result_path)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
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
    header = ("tool", "samples", "seconds", "samples/s", "peak RSS MiB", "private MiB", "driver maxrss MiB",
              "p50 ms", "p99 ms")
    print("{:<24}{:>9}{:>9}{:>11}{:>14}{:>13}{:>19}{:>9}{:>9}".format(*header))
    lines: list[tuple[str, Measured, float]] = []
    for row in rows:
        lines.append((row.tool, row, row.seconds))
        if row.startup:  # curate: the same run without Ray's start-up
            lines.append((f"{row.tool} (no Ray start)", row, row.seconds - row.startup))
    for name, row, seconds in lines:
        print(f"{name:<24}{row.samples:>9}{seconds:>9.2f}{row.samples / seconds:>11.1f}{row.peak_rss_mib:>14.0f}"
              f"{row.peak_private_mib:>13.0f}{row.driver_maxrss_mib:>19.0f}{row.p50_ms:>9.1f}{row.p99_ms:>9.1f}")
    by_tool = {row.tool: row for row in rows}
    halves = {row.tool.removesuffix(" (half)"): row for row in rows if row.tool.endswith(" (half)")}
    marginal = {}
    for tool, half in halves.items():  # the rate once running: fixed costs (Ray's start, spawning) cancel out
        full = by_tool[tool]
        marginal[tool] = (full.samples - half.samples) / max(full.seconds - half.seconds, 1e-9)
        print(f"{tool}: marginal samples/s (full run minus half run) {marginal[tool]:.1f}")
    if {"curate", "img2dataset"} <= set(marginal):
        print(f"curate/img2dataset marginal samples/s: {marginal['curate'] / marginal['img2dataset']:.2f}")
    if {"curate", "img2dataset"} <= set(by_tool):
        c, i = by_tool["curate"], by_tool["img2dataset"]
        reference = i.samples / i.seconds
        print(f"\ncurate/img2dataset samples/s: {c.samples / c.seconds / reference:.2f} "
              f"(without Ray start: {c.samples / (c.seconds - c.startup) / reference:.2f}); "
              f"peak RSS: {c.peak_rss_mib / i.peak_rss_mib:.2f}; "
              f"private: {c.peak_private_mib / i.peak_private_mib:.2f}")
        if LOCAL in by_tool:
            c = by_tool[LOCAL]
            print(f"curate --local/img2dataset samples/s: {c.samples / c.seconds / reference:.2f}; "
                  f"peak RSS: {c.peak_rss_mib / i.peak_rss_mib:.2f}; "
                  f"private: {c.peak_private_mib / i.peak_private_mib:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="pool rows generated (fetchable ones are served)")
    parser.add_argument("--pool", choices=["sized", "demo", "real"], default="sized",
                        help="sized: web-sized JPEG photos and PNG graphics, 100-2000 px (make_sized_pool); "
                             "demo: the demo pool's small images (160-640 px), planted faults left out; "
                             "real: the real development pool built by benchmarks/realpool.py (--real-pool), its "
                             "fetchable rows (the planted download faults left out)")
    parser.add_argument("--real-pool", type=Path, help="with --pool real: the folder realpool.py wrote")
    parser.add_argument("--sides", choices=["uniform", "log"], default="uniform",
                        help="sized pool: longer sides uniform in 100-2000 px, or log-uniform (mostly small images)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes = curate download actors")
    parser.add_argument("--threads", type=int, default=32, help="download threads per process/actor, both tools")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--timeout", type=int, default=10)
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    parser.add_argument("--marginal", action="store_true",
                        help="also run each tool on the first half of the list and print the marginal rate")
    parser.add_argument("--local", action="store_true",
                        help="also run curate in one process without Ray (curate run --local)")
    parser.add_argument("--skip-img2dataset", action="store_true", help="run curate only")
    parser.add_argument("--set", action="append", default=[], help="extra curate pipeline override KEY=VALUE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool == "real" and not args.real_pool:
        parser.error("--pool real needs --real-pool DIR (benchmarks/realpool.py --out DIR builds it)")

    if args.child:  # inside a measured subprocess
        spec = json.loads(Path(args.spec).read_text())
        if args.child == "img2dataset":
            result = child_img2dataset(spec)
        else:
            result = child_curate(spec, local=args.child == LOCAL)
        result["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(args.result).write_text(json.dumps(result))
        return

    from curate.demo.server import FaultServer

    temp = None if args.out else tempfile.TemporaryDirectory(prefix="bench-download-")
    work = Path(args.out or temp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        served = args.real_pool / "files" if args.pool == "real" else work / "pool" / "files"
        with FaultServer(served) as server:
            start = time.perf_counter()
            if args.pool == "real":
                urls, offered = real_url_list(args.real_pool, work / "pool", args.n, server.base_url)
            else:
                urls, offered = make_url_list(work / "pool", args.n, server.base_url, args.pool, args.sides)
            print(f"pool: {args.n} rows, {offered} fetchable, generated in {time.perf_counter() - start:.1f}s")
            rows: list[Measured] = []
            lists = [("", urls)] + ([(" (half)", half_url_list(urls))] if args.marginal else [])
            tools = ["curate"] + ([LOCAL] if args.local else []) + ([] if args.skip_img2dataset else ["img2dataset"])
            for tool in tools:
                for suffix, url_list in lists:
                    name = f"{tool}{suffix}"
                    out, timing_dir = work / f"out-{name}", work / f"latency-{name}"
                    for folder in (out, timing_dir):  # both tools resume from what they find: start empty
                        shutil.rmtree(folder, ignore_errors=True)
                    timing_dir.mkdir(parents=True)
                    # JSON-able: the child needs only the numbers and names
                    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"out": None}
                    spec = {"urls": str(url_list), "out": str(out), "overrides": curate_overrides(args),
                            "args": settings}
                    print(f"running {name} ...", flush=True)
                    r = run_child(tool, spec, work, timing_dir)
                    seconds = latencies(tool, out, timing_dir)
                    rows.append(Measured(name, count_samples(out, args.format), r["seconds"], r["startup"],
                                         r["peak_rss_mib"], r["peak_private_mib"], r["driver_maxrss_mib"],
                                         percentile_ms(seconds, 50), percentile_ms(seconds, 99)))
                    print(json.dumps(asdict(rows[-1])), flush=True)
        print_table(rows, offered)
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    main()
