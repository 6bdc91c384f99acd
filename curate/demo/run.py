"""`curate demo`: a synthetic pool with planted faults, served on loopback, curated by pipelines/demo.yaml."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from curate.config import load_pipeline
from curate.errors import CurateError
from curate.report.inspect import print_funnel
from curate.runner import run_pipeline


def demo_pipeline_path() -> Path:
    """pipelines/demo.yaml of the checkout this package runs from."""
    path = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"
    if not path.exists():
        raise CurateError(f"{path}: the demo pipeline is missing; run curate from a checkout (pip install -e .)")
    return path


def print_alignment(run_dir: Path) -> None:
    """Mean clip_score of the kept rows by planted kind: misaligned captions should score lowest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = pa.concat_tables([pq.read_table(p, columns=["kind", "clip_score"])
                              for p in sorted((run_dir / "shards").glob("*.parquet"))])
    by_kind: dict[str, list[float]] = {}
    for kind, score in zip(index.column("kind").to_pylist(), index.column("clip_score").to_pylist()):
        by_kind.setdefault(kind, []).append(score)
    print("\nbootstrapped CLIP score (mean, kept rows) by planted kind:")
    for kind, scores in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"  {kind:<16} {sum(scores) / len(scores):7.3f}  ({len(scores)} rows)")


def run_demo(n: int, output: Path, seed: int = 0, local: bool = False, overrides: list[str] | None = None,
             score: bool = False) -> Path:
    from curate.demo.pool import make_pool, write_url_list
    from curate.demo.server import FaultServer

    if n < 20:
        raise CurateError(f"--n {n}: the demo pool needs at least 20 rows to plant every kind of fault")
    config = load_pipeline(demo_pipeline_path(), overrides)
    if score:  # no pretrained weights needed: small CLIPs cross-fitted on the pool score it
        from curate.stages.score import ScoreConfig

        config.stages.append(ScoreConfig(model="bootstrap", bootstrap={"steps": 200, "batch_size": 32}))
    output = output.resolve()
    marker = output / ".curate-demo"
    if output.is_dir() and any(output.iterdir()) and not marker.exists():
        raise CurateError(f"--output {output}: folder is not empty and is not a curate demo; choose another")
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `curate demo`; it replaces pool/ and run/ here on every run\n")
    pool_dir, run_dir = output / "pool", output / "run"
    started = time.monotonic()
    print(f"demo: drawing a pool of {n} image-text pairs in {pool_dir}", file=sys.stderr)
    shutil.rmtree(pool_dir, ignore_errors=True)
    items = make_pool(pool_dir, n=n, seed=seed)
    # The server's port changes every time, so a previous demo run's results cannot be resumed: start clean.
    shutil.rmtree(run_dir, ignore_errors=True)
    with FaultServer(pool_dir / "files") as server:
        urls = write_url_list(items, server.base_url, pool_dir / "urls.parquet")
        print(f"demo: serving it at {server.base_url} (loopback only)", file=sys.stderr)
        run_pipeline(config, input_path=str(urls), output=run_dir, local=local)
    print_funnel(run_dir)
    if score:
        print_alignment(run_dir)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; output: {run_dir}")
    print(f"  read it: python -c \"import webdataset as wds; print(next(iter(wds.WebDataset('{run_dir}/shards/00000.tar'))).keys())\"")
    return run_dir
