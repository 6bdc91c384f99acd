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


def _tiny_transformers_model(folder: Path, kind: str) -> Path:
    """A random-init CLIP or SigLIP in transformers' layout (config.json, model.safetensors, processor files), with
    a real tokenizer: CLIP's BPE vocabulary (open_clip ships it), or a SentencePiece model trained here."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(tower, image_size=32, patch_size=8)
    if kind == "clip":
        from open_clip.tokenizer import SimpleTokenizer

        bpe = SimpleTokenizer()
        names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's names of them
        vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
        merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
        tokenizer = tf.CLIPTokenizer(vocab=vocab, merges=merges)
        text = dict(tower, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = tf.CLIPProcessor(image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    else:
        import sentencepiece

        from curate.demo.pool import SHAPES

        words = [*SHAPES, "a", "photo", "of", "red", "green", "blue", "on", "white", "background", "watermark"]
        corpus = folder.parent / f"{kind}-corpus.txt"
        corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder.parent / kind), vocab_size=64, hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        tokenizer = tf.SiglipTokenizer(vocab_file=str(folder.parent / f"{kind}.model"), model_max_length=16)
        text = dict(tower, vocab_size=tokenizer.vocab_size, max_position_embeddings=16)
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        processor = tf.SiglipProcessor(image_processor=tf.SiglipImageProcessor(size={"height": 32, "width": 32}),
                                       tokenizer=tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_transformers(tmp_path_factory) -> dict[str, Path]:
    """Random-init transformers CLIP and SigLIP folders, by model_type."""
    root = tmp_path_factory.mktemp("transformers")
    return {kind: _tiny_transformers_model(root / kind, kind) for kind in ("clip", "siglip")}


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
