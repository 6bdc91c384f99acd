"""Shared fixtures: offline environment, a loopback fault server over a synthetic pool, one Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by default: no hub lookups, no albumentations update check at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory):
    """A 120-row synthetic pool with every kind of planted fault, and its items."""
    from curate.demo.pool import make_pool

    root = tmp_path_factory.mktemp("pool")
    items = make_pool(root, n=120, seed=7)
    return root, items


@pytest.fixture(scope="session")
def fault_server(demo_pool):
    """The pool served on 127.0.0.1; slow URLs answer after 20 s (tests use short timeouts)."""
    from curate.demo.server import FaultServer

    root, _ = demo_pool
    with FaultServer(root / "files", slow_seconds=20.0) as server:
        yield server


@pytest.fixture(scope="session")
def url_list(demo_pool, fault_server, tmp_path_factory) -> Path:
    from curate.demo.pool import write_url_list

    _, items = demo_pool
    return write_url_list(items, fault_server.base_url, tmp_path_factory.mktemp("urls") / "urls.parquet")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (a start costs seconds)."""
    import ray

    from curate.config import RayConfig
    from curate.cluster.ray_env import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_pipeline():
    """pipelines/demo.yaml with test-friendly timeouts and small shards, plus any `--set` strings given; `score`
    (a ScoreConfig) appends a score stage."""
    from curate.core.pipeline import load_pipeline

    def make(*sets: str, score=None):
        base = ["download.timeout=1.5", "download.retries=1", "download.backoff=0.05",
                "output.samples_per_shard=40", "input.rows_per_chunk=50"]
        config = load_pipeline(REPO / "pipelines" / "demo.yaml", base + list(sets))
        if score is not None:
            config.stages.append(score)
        return config

    return make


@pytest.fixture(scope="session")
def download_outcomes():
    """Run a DownloadStage (set up once) over URLs; return each row's (status, reason)."""
    import pyarrow as pa

    def run(stage, urls):
        n = len(urls)
        batch = pa.table({
            "uid": [str(i) for i in range(n)], "row": list(range(n)), "url": urls, "caption": [""] * n,
            "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()), "decided_by": pa.nulls(n, pa.string()),
        })
        if not hasattr(stage, "_pools"):
            stage.setup()
        out = stage.process(batch)
        return list(zip(out.column("status").to_pylist(), out.column("reason").to_pylist()))

    return run


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-init curate-tiny CLIP saved as a checkpoint folder (open_clip_config.json + safetensors)."""
    import json

    import open_clip
    import torch

    from curate.models.clip import BUNDLED_CONFIGS, save_checkpoint_dir

    torch.manual_seed(0)
    config = BUNDLED_CONFIGS / "curate-tiny.json"
    open_clip.add_model_config(config)
    model = open_clip.create_model("curate-tiny")
    return save_checkpoint_dir(model, json.loads(config.read_text()), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def pool_images(demo_pool):
    """(image bytes, caption) of the demo pool's clean rows, as the score stage receives them."""
    root, items = demo_pool
    return [((root / "files" / item.name).read_bytes(), item.caption) for item in items if item.kind == "clean"]


@pytest.fixture(scope="session")
def curated_shards(url_list, make_pipeline, tmp_path_factory, fault_server) -> Path:
    """The demo pool curated in-process (no Ray): its shards folder, ~90 kept samples in 3 tars."""
    from curate.core.runner import run_pipeline

    out = tmp_path_factory.mktemp("curated") / "run"
    run_pipeline(make_pipeline(), input_path=str(url_list), output=out, local=True, progress=False)
    return out / "shards"
