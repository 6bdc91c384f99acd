"""Benchmark for a machine with a GPU: `curate train` samples/s for ViT-B-32 in bf16, and the share of each step
the GPU waits for data.

Generates --n 256 px JPEG + caption samples into WebDataset shards there, then runs `curate train` (clip objective,
random init, loader workers) for --steps steps and reads its log. The data wait is measured the same way in a second,
instrumented pass over the same loader: time spent in next(batches) against the whole step (synchronised).

    .venv/bin/python benchmarks/train_gpu.py --n 50000 --steps 300 --workers 12      # batch sizes tried: 256 ... 2048
    .venv/bin/python benchmarks/train_gpu.py --device cpu --model curate-tiny --n 512 --steps 20 --batch-size 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def data_wait_share(config, steps: int) -> float:
    """Share of wall time spent waiting for the next batch, over `steps` training steps after a warm-up."""
    import torch

    from curate.models.clip import ClipSpec
    from curate.train.data import shard_list
    from curate.train.loop import batch_stream, build_model, make_optimizer, resolve_device
    from curate.train.step import forward
    from curate.train.losses import make_losses

    device = resolve_device(config)
    model, preprocess, tokenizer, _ = build_model(ClipSpec(config.model), config.objectives, device)
    optimizer, losses = make_optimizer([model], config), make_losses(config.objectives)
    position = {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped": 0}
    batches = batch_stream(shard_list(config.data), preprocess, tokenizer, config, position)
    gpu = device == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    waited = total = 0.0
    for step in range(steps + 5):
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = sum(losses(forward(model, batch.images.to(device), batch.texts.to(device), False)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()
        if step >= 5:
            waited, total = waited + got - start, total + time.perf_counter() - start
    return waited / total


def step_rate(model_name: str, batch_size: int, device: str, steps: int) -> float:
    """Samples/s of training steps alone (forward, loss, backward, AdamW) on random tensors already on the device."""
    import torch

    from curate.models.clip import ClipSpec
    from curate.train.config import load_train_config
    from curate.train.loop import build_model, make_optimizer
    from curate.train.losses import make_losses
    from curate.train.step import forward

    config = load_train_config(None, [f"model={model_name}", "data=unused", "output=unused", f"device={device}"])
    model, _, tokenizer, _ = build_model(ClipSpec(model_name), config.objectives, device)
    optimizer, losses = make_optimizer([model], config), make_losses(config.objectives)
    size = model.visual.image_size
    images = torch.randn(batch_size, 3, *(size if isinstance(size, tuple) else (size, size)), device=device)
    texts = tokenizer([f"a gradient picture number {i}" for i in range(batch_size)]).to(device)
    gpu = device == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for step in range(steps + 3):
        if step == 3:
            sync()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = sum(losses(forward(model, images, texts, False)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 512, 1024, 2048],
                        help="batch sizes to try with steps alone; the fastest trains from the shards")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    from fill_card import fill_the_card

    steps = 10 if args.device == "cuda" else 2
    args.batch_size, _ = fill_the_card(args.batch_size, lambda size: step_rate(args.model, size, args.device, steps),
                                       "training steps alone, samples", args.device)

    from score_gpu import write_shards

    from curate.train.config import load_train_config
    from curate.train.loop import train

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-train-gpu-")
    work = Path(args.work or temp.name)  # type: ignore[union-attr]
    write_shards(work / "shards", args.n, args.side, per_shard=max(1, args.n // max(4, args.workers * 2)))
    config = load_train_config(None, [
        f"model={args.model}", f"data={work / 'shards'}", f"output={work / 'run'}", f"steps={args.steps}",
        f"batch_size={args.batch_size}", f"workers={args.workers}", f"device={args.device}", "log_every=10",
        f"checkpoint_every={args.steps}", "shuffle_buffer=2000", "warmup_steps=10"])
    start = time.perf_counter()
    train(config, progress=True)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()][1:]
    overall = args.steps * args.batch_size / seconds
    # once running: the logged steps after the first record (a run too short to log twice: the whole run's rate)
    steady = sum(r["samples_per_second"] for r in records) / len(records) if records else overall
    wait = data_wait_share(config, min(args.steps, 50))
    print(f"\n{args.model} on {args.device}, batch {args.batch_size}, {args.workers} loader workers, {args.steps} steps")
    print(f"curate train: {overall:.0f} samples/s over the run (setup included), "
          f"{steady:.0f} samples/s once running")
    print(f"share of step time waiting for data: {wait:.0%}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
            "samples_per_second": round(steady, 1), "data_wait_share": round(wait, 3)}))
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
