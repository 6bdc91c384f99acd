"""Benchmark for a machine with a GPU: CLIP scoring pairs/s end to end from WebDataset shards, against the model's
forward alone.

Generates --n 256 px JPEGs with captions into WebDataset shards (there, on the GPU machine), then measures:

1. forward alone: ViT-B-32 (random weights) encode_image + encode_text on random tensors already on the GPU, bf16
   autocast, at each --chunk-size in turn until one stops gaining (the chunk that fills the card): the ceiling;
2. end to end: `curate run` on those shards (read from the tars, decoded and resized by the download stage on CPU
   workers, scored by GPU actors that preprocess with a thread pool), from the first row to the published manifest,
   with GPU utilisation sampled by nvidia-smi every 0.2 s while it runs.

Prints pairs/s of both, their ratio and mean/median GPU utilisation. Target on an H200: >= 10,000 pairs/s end to end.

    .venv/bin/python benchmarks/score_gpu.py --n 100000
    .venv/bin/python benchmarks/score_gpu.py --device cpu --n 512 --model curate-tiny --chunk-size 64   # dry run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _jpeg(seed: int, side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    tilt = rng.uniform(-120, 120, 3).astype(np.float32)
    pixels = base + ramp[:, None, None] * tilt + rng.normal(0, 6, (side, side, 3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, n: int, side: int, per_shard: int = 10_000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for first in range(0, n, per_shard):
            count = min(per_shard, n - first)
            images = list(pool.map(lambda i: _jpeg(i, side), range(first, first + count)))
            with tarfile.open(folder / f"{first // per_shard:05d}.tar", "w") as tar:
                for i, image in zip(range(first, first + count), images):
                    for ext, data in (("jpg", image), ("txt", f"a gradient picture number {i}".encode())):
                        info = tarfile.TarInfo(f"{i:09d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


def forward_alone(model_name: str, chunk: int, device: str, seconds: float = 20.0) -> float:
    """Pairs/s of the model's forward on inputs already on the device (bf16 autocast on a GPU), after a warm-up."""
    import open_clip
    import torch

    from curate.models.clip import ClipSpec, load_clip

    clip = load_clip(ClipSpec(model_name, None), device)
    size = clip.model.visual.image_size
    images = torch.randn(chunk, 3, *(size if isinstance(size, tuple) else (size, size)), device=device)
    texts = clip.tokenizer(["a gradient picture"] * chunk).to(device)
    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float16
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=gpu):
        for _ in range(3):
            clip.model.encode_image(images), clip.model.encode_text(texts)
        sync()
        start, pairs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            clip.model.encode_image(images), clip.model.encode_text(texts)
            pairs += chunk
        sync()
    del open_clip
    return pairs / (time.perf_counter() - start)


class GpuSampler:
    """nvidia-smi utilisation.gpu every 0.2 s while in the with-block."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[float] = []

    def __enter__(self) -> GpuSampler:
        if not self.enabled:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            first = line.strip().split(",")[0]
            if first.replace(".", "").isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._proc.terminate()
        self._thread.join(timeout=2)


def end_to_end(shards: Path, out: Path, args: argparse.Namespace) -> tuple[float, int, list[float]]:
    from curate.core.pipeline import load_pipeline
    from curate.cluster.ray_env import ensure_ray
    from curate.core.runner import run_pipeline

    cpus = os.cpu_count() or 1
    config = load_pipeline(REPO / "pipelines" / "laion_style.yaml", [
        "input.format=webdataset", "input.caption_col=caption", "input.url_col=url", "input.rows_per_chunk=20000",
        f"download.image_size={args.side}", "download.resize_mode=no", "download.min_image_size=0",
        "download.resources.cpus=1", "download.resources.batch_size=512",
        f"score.model={args.model}", "score.pretrained=null", f"score.chunk_size={args.chunk_size}",
        f"score.resources.gpus={args.gpus_per_actor if args.device == 'cuda' else 0}",
        f"score.resources.cpus={args.score_cpus}", f"score.preprocess_threads={max(1, int(args.score_cpus * 2))}",
        "score.resources.batch_size=2048", "output.samples_per_shard=10000",
    ])
    ensure_ray(config.ray)  # started before the clock
    gpus = config.stages[1].resources.gpus
    print(f"Ray up: {cpus} CPUs; scoring actors of {args.score_cpus:g} CPUs and {gpus:g} GPU", flush=True)
    with GpuSampler(args.device == "cuda") as gpu:
        start = time.perf_counter()
        result = run_pipeline(config, input_path=str(shards), output=out, progress=True)
        seconds = time.perf_counter() - start
    # pairs scored: the rows the score stage passed on (the kept ones are fewer: the pipeline dedups and filters)
    scored = next(stage.rows_out for stage in result.manifest.stages if stage.name == "score")
    return seconds, scored, gpu.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[256, 512, 1024, 2048],
                        help="scoring chunk sizes to try, forward alone; the fastest is used end to end")
    parser.add_argument("--score-cpus", type=float, default=6, help="CPUs per scoring actor (its preprocessing)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.5)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-score-gpu-")
    work = Path(args.work or temp.name)  # type: ignore[union-attr]
    start = time.perf_counter()
    write_shards(work / "shards", args.n, args.side)
    print(f"{args.n} {args.side} px JPEGs in shards in {time.perf_counter() - start:.1f} s", flush=True)
    from fill_card import fill_the_card

    seconds = 10.0 if args.device == "cuda" else 2.0
    args.chunk_size, ceiling = fill_the_card(args.chunk_size, lambda chunk: forward_alone(
        args.model, chunk, args.device, seconds), "forward alone, pairs", args.device)
    print(f"forward alone: {ceiling:.0f} pairs/s at chunk {args.chunk_size}", flush=True)
    seconds, scored, utilisation = end_to_end(work / "shards", work / "out", args)
    rate = scored / seconds
    print(f"\n{args.model} (random weights) on {args.device}, {args.n} pairs from WebDataset shards")
    print(f"forward alone            {ceiling:10.0f} pairs/s")
    print(f"end to end (curate run)  {rate:10.0f} pairs/s  ({scored} scored in {seconds:.1f} s)")
    print(f"end to end / forward     {rate / ceiling:10.2f}")
    if utilisation:
        print(f"GPU utilisation          mean {np.mean(utilisation):.0f}%  median {np.median(utilisation):.0f}%  "
              f"({len(utilisation)} samples)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "device": args.device, "pairs": args.n, "chunk_size": args.chunk_size,
            "forward_pairs_per_second": round(ceiling, 1), "end_to_end_pairs_per_second": round(rate, 1),
            "gpu_utilisation_mean": round(float(np.mean(utilisation)), 1) if utilisation else None}))
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
