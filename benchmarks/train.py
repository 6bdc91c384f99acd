"""Benchmark: `curate train` against a bare open_clip training loop on the same shards, model and batch size.

The bare loop is what open_clip's README and training code boil down to: webdataset pipeline (shuffle, decode,
the model's train transform, tokenizer, batches), AdamW, ClipLoss, backward, step. Both run the same number of
steps in this process, one after the other; samples/s count the steps after a short warm-up. Prints both and the
ratio (target: curate >= 0.9x). Figures only.

    .venv/bin/python benchmarks/train.py --shards curate-demo/run/shards --model curate-small --steps 60
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_loop(urls: list[str], args: argparse.Namespace) -> float:
    """Samples/s of the steps after the warm-up."""
    import open_clip
    import torch
    import webdataset as wds
    from PIL import Image

    from curate.models.clip import ClipSpec, _register_architecture

    torch.manual_seed(0)
    _register_architecture(ClipSpec(args.model))
    model, preprocess, _ = open_clip.create_model_and_transforms(args.model, output_dict=True)
    tokenizer = open_clip.get_tokenizer(args.model)

    def to_pair(sample):
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            return preprocess(img.convert("RGB")), tokenizer([sample["txt"].decode()])[0]

    def batches():
        while True:
            pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.shuffle(1000),
                                        wds.map(to_pair), wds.batched(args.batch_size, partial=False))
            yield from torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    loss_fn = open_clip.ClipLoss()
    model.train()
    start = None
    for step, (images, texts) in enumerate(batches()):
        if step == args.warmup:
            start = time.perf_counter()
        if step == args.steps:
            break
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (args.steps - args.warmup) * args.batch_size / (time.perf_counter() - start)  # type: ignore[operator]


def curate_train(shards: str, args: argparse.Namespace, out: Path) -> float:
    """Samples/s of `curate train`'s steps after the warm-up, from its log."""
    import json

    from curate.train.config import load_train_config
    from curate.train.loop import train

    config = load_train_config(None, [
        f"model={args.model}", f"data={shards}", f"output={out}", f"steps={args.steps}",
        f"batch_size={args.batch_size}", f"lr={args.lr}", "log_every=1", f"checkpoint_every={args.steps}",
        "shuffle_buffer=1000"])
    train(config, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][args.warmup:]
    return len(records) * args.batch_size / sum(args.batch_size / r["samples_per_second"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="WebDataset shards (folder or glob), e.g. a demo run's")
    parser.add_argument("--model", default="curate-small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    from curate.train.data import shard_list

    urls = shard_list(args.shards)
    bare = bare_loop(urls, args)
    with tempfile.TemporaryDirectory() as tmp:
        ours = curate_train(args.shards, args, Path(tmp) / "run")
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), CPU")
    print(f"bare open_clip loop  {bare:8.1f} samples/s")
    print(f"curate train         {ours:8.1f} samples/s")
    print(f"ratio curate/bare: {ours / bare:.2f}")


if __name__ == "__main__":
    main()
