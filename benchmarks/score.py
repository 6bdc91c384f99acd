"""Benchmark: the score stage through Ray against a bare loop calling open_clip on the same images (CPU).

Both sides load the same model (random weights unless --pretrained is given), decode and preprocess with the same
number of threads, run the same forward in chunks of the same size, and compare in fp32. The Ray side is the
stage as a pipeline runs it (the runner's StageWorker in a Ray Data actor pool of one actor with the CPUs the runner
would give it); the bare loop is one process. Prints pairs/s of each and their ratio (target: Ray >= 0.9x, i.e.
at most 10% overhead). Figures only, no asserts.

    .venv/bin/python benchmarks/score.py --n 512 --model ViT-B-32
    .venv/bin/python benchmarks/score.py --n 2048 --model curate-tiny
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_table(n: int, side: int):
    """n (JPEG bytes, caption) rows as the download stage stores them, in the runner's row schema."""
    import pyarrow as pa

    from curate.demo.pool import make_sized_pool
    from curate.core.schema import BASE_COLUMNS

    with tempfile.TemporaryDirectory() as tmp:
        items = make_sized_pool(Path(tmp), n, min_side=side, max_side=side + 1, png_share=0.0)
        images = [(Path(tmp) / "files" / item.name).read_bytes() for item in items]
    return pa.table({
        "uid": [f"{i:08d}" for i in range(n)], "row": pa.array(range(n), pa.int64()), "url": [None] * n,
        "caption": [item.caption for item in items], "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
        "decided_by": pa.nulls(n, pa.string()),
    }, schema=pa.schema(BASE_COLUMNS)).append_column("image", pa.array(images, pa.binary()))


def bare_loop(table, args, threads: int, torch_threads: int) -> float:
    """open_clip as its README uses it, with the stage's preprocessing threads and chunk size; returns seconds."""
    import open_clip
    import torch
    from PIL import Image

    from curate.models.clip import ClipSpec, _register_architecture

    start = time.perf_counter()
    torch.set_num_threads(torch_threads)
    _register_architecture(ClipSpec(args.model, args.pretrained))
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.eval()

    def pixels(data: bytes):
        with Image.open(io.BytesIO(data)) as img:
            return preprocess(img.convert("RGB"))

    images, captions = table.column("image").to_pylist(), table.column("caption").to_pylist()
    scores = []
    with ThreadPoolExecutor(threads) as pool:
        tensors = list(pool.map(pixels, images))
        for i in range(0, len(images), args.chunk_size):
            with torch.inference_mode():
                image = model.encode_image(torch.stack(tensors[i:i + args.chunk_size]), normalize=True)
                text = model.encode_text(tokenizer(captions[i:i + args.chunk_size]), normalize=True)
            scores.append((image * text).sum(-1))
    torch.cat(scores)
    return time.perf_counter() - start


def through_ray(table, args, threads: int) -> tuple[float, float, float]:
    """(seconds, of which Ray's start, seconds inside the stage's process()) for the stage in a one-actor pool,
    outputs pulled back to the driver."""
    import ray

    from curate.config import RayConfig
    from curate.cluster.ray_env import ensure_ray, worker_cpus
    from curate.config import Resources
    from curate.stages.score import ScoreConfig, ScoreStage
    from curate.core.worker import segment_class

    start = time.perf_counter()
    ensure_ray(RayConfig())
    ready = time.perf_counter()
    resources = Resources(cpus=args.cpus, batch_size=args.batch_size, concurrency=1)
    stage = ScoreStage(ScoreConfig(model=args.model, pretrained=args.pretrained, chunk_size=args.chunk_size,
                                   preprocess_threads=threads, resources=resources))
    stage.preflight()
    ds = ray.data.from_arrow(table).map_batches(
        segment_class([stage], reads_units=False, parts_folder=None), batch_size=args.batch_size,
        batch_format="pyarrow", zero_copy_batch=False,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=worker_cpus(resources),
    )
    rows, inside = 0, 0.0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
        inside += sum(batch.column("score_seconds").to_pylist())  # the worker's per-row share of each batch
    assert rows == table.num_rows
    return time.perf_counter() - start, ready - start, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--side", type=int, default=256, help="stored image size (the download stage's output)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="a tag or weights file (default: random weights)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per Ray batch")
    parser.add_argument("--chunk-size", type=int, default=64, help="rows per forward pass, both sides")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="the actor's CPUs")
    args = parser.parse_args()

    from curate.cluster.ray_env import RESERVED_CPUS

    table = make_table(args.n, args.side)
    # what the runner would give the actor on this machine, and the same threads for the bare loop
    torch_threads = max(1, int(round(min(args.cpus, (os.cpu_count() or 1) - RESERVED_CPUS))))
    threads = 4
    bare = bare_loop(table, args, threads, torch_threads)
    ray_seconds, ray_start, inside = through_ray(table, args, threads)
    stage_seconds = ray_seconds - ray_start
    print(f"{args.n} pairs, {args.model} ({args.pretrained or 'random weights'}), {args.side} px JPEGs, CPU, "
          f"{torch_threads} torch threads, {threads} preprocessing threads")
    print(f"bare open_clip loop        {bare:8.2f} s  {args.n / bare:8.1f} pairs/s")
    print(f"score stage through Ray    {stage_seconds:8.2f} s  {args.n / stage_seconds:8.1f} pairs/s  "
          f"(+{ray_start:.1f} s starting Ray; {inside:.2f} s inside process(), the rest is the actor's start, "
          "model load and Ray)")
    print(f"ratio Ray/bare pairs/s: {bare / stage_seconds:.2f} (with Ray's start: {bare / ray_seconds:.2f})")


if __name__ == "__main__":
    main()
