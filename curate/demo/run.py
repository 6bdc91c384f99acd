"""`curate demo`: a synthetic pool with planted faults, served on loopback, curated by pipelines/demo.yaml."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from curate.core.pipeline import load_pipeline
from curate.errors import CurateError
from curate.report.inspect import print_funnel
from curate.core.runner import run_pipeline


def demo_pipeline_path(download_only: bool = False) -> Path:
    """pipelines/demo_curate.yaml (or the download-only demo.yaml) of the checkout this package runs from."""
    name = "demo.yaml" if download_only else "demo_curate.yaml"
    path = Path(__file__).resolve().parents[2] / "pipelines" / name
    if not path.exists():
        raise CurateError(f"{path}: the demo pipeline is missing; run curate from a checkout (pip install -e .)")
    return path


def print_alignment(run_dir: Path) -> None:
    """Mean bootstrapped clip_score and the share the alignment filter removed, by planted kind: misaligned
    captions should score lowest and be removed most."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from curate.core import parts as part_store
    from curate.core.ledger import read_ledger

    stored = pa.concat_tables([pq.read_table(p, columns=["uid", "kind", "clip_score"])
                               for p in part_store.part_files(run_dir)], promote_options="permissive")
    stored = stored.filter(pc.is_valid(stored.column("clip_score")))
    ledger = read_ledger(run_dir)
    reason = dict(zip(ledger.column("uid").to_pylist(), ledger.column("reason").to_pylist()))
    by_kind: dict[str, list[tuple[float, bool]]] = {}
    for uid, kind, score in zip(*(stored.column(c).to_pylist() for c in ("uid", "kind", "clip_score"))):
        by_kind.setdefault(kind, []).append((score, (reason.get(uid) or "").startswith("alignment:")))
    print("\nbootstrapped CLIP score by planted kind (rows that were scored):")
    print(f"  {'kind':<16}{'mean score':>11}{'rows':>7}{'removed by alignment':>22}")
    for kind, rows in sorted(by_kind.items(), key=lambda kv: -sum(s for s, _ in kv[1]) / len(kv[1])):
        removed = sum(r for _, r in rows)
        print(f"  {kind:<16}{sum(s for s, _ in rows) / len(rows):>11.3f}{len(rows):>7}"
              f"{removed:>14} ({removed / len(rows):4.0%})")


def make_eval_set(folder: Path, n: int, seed: int) -> Path:
    """Clean pairs drawn like the pool but from another seed: images no arm trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.demo.pool import make_pool

    shutil.rmtree(folder, ignore_errors=True)
    items = [item for item in make_pool(folder, n=n, seed=seed) if item.kind == "clean"]
    path = folder / "eval.parquet"
    pq.write_table(pa.table({"image_path": [f"files/{item.name}" for item in items],
                             "caption": [item.caption for item in items]}), path)
    return path


def run_demo(n: int, output: Path, seed: int = 0, local: bool = False, overrides: list[str] | None = None,
             download_only: bool = False, experiment_steps: int = 300) -> Path:
    """Draw and serve a pool, curate it; unless ``download_only``, score it with bootstrapped CLIPs, filter, and end
    with the raw-vs-curated experiment on a held-out eval set."""
    from curate.demo.pool import make_pool, write_url_list
    from curate.demo.server import FaultServer

    if n < 20:
        raise CurateError(f"--n {n}: the demo pool needs at least 20 rows to plant every kind of fault")
    config = load_pipeline(demo_pipeline_path(download_only), overrides)
    output = output.resolve()
    marker = output / ".curate-demo"
    if output.is_dir() and any(output.iterdir()) and not marker.exists():
        raise CurateError(f"--output {output}: folder is not empty and is not a curate demo; choose another")
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `curate demo`; it replaces pool/, eval/ and run/ here on every run\n")
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
    if not download_only:
        from curate.train.experiment import ExperimentConfig, print_comparison, run_experiment

        print_alignment(run_dir)
        eval_data = make_eval_set(output / "eval", n=max(100, n // 3), seed=seed + 1)
        batch = min(64, max(8, n // 12))  # a tiny demo pool still leaves more than one batch per arm
        results = run_experiment(run_dir, ExperimentConfig(steps=experiment_steps, batch_size=batch,
                                                           eval_every=max(1, experiment_steps // 6),
                                                           eval_data=str(eval_data), seed=seed))
        print_comparison(results)
        print(f"curves: {run_dir / 'experiment' / 'curves.png'}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; output: {run_dir}")
    print(f"  read it: python -c \"import webdataset as wds; print(next(iter(wds.WebDataset('{run_dir}/shards/00000.tar'))).keys())\"")
    return run_dir
