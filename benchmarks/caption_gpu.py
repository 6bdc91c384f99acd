"""Benchmark for a machine with a GPU: captions/s of a BLIP-base-sized captioner, through the caption stage's own
model wrapper (bf16 on a GPU), at the batch size that fills the card.

No weights can be downloaded, so the captioner is built here from a config the size of BLIP base (ViT-B/16 at
384 px, a 12-layer BERT-base decoder, random weights) with a word-list tokenizer, and saved as a transformers
checkpoint that the caption stage loads the way it loads any. Random weights would stop at any token, so every
caption is generated to exactly --tokens new tokens (greedy): the cost of a caption that long.

    .venv/bin/python benchmarks/caption_gpu.py                        # batch sizes tried: 64 ... 1024
    .venv/bin/python benchmarks/caption_gpu.py --device cpu --size tiny --batch-size 4 8 --tokens 8   # dry run
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

SIZES = {
    # BLIP base (Salesforce/blip-image-captioning-base): ViT-B/16 at 384 px, BERT-base text decoder
    "base": {"vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 384, "patch_size": 16},
             "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "vocab_size": 30524}},
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "vocab_size": 512}},
}


def build_captioner(folder: Path, size: str) -> Path:
    """A random-init BLIP captioner of ``size`` with a tokenizer of placeholder words, saved under ``folder``."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    shape = SIZES[size]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab += [f"word{i}" for i in range(shape["text"]["vocab_size"] - len(vocab))]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(vision_config=shape["vision"],
                        text_config={**shape["text"], "max_position_embeddings": 512, "bos_token_id": 5,
                                     "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
                        projection_dim=shape["text"]["hidden_size"])
    BlipForConditionalGeneration(config).save_pretrained(folder)
    side = shape["vision"]["image_size"]
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def captions_per_second(model: Path, batch_size: int, tokens: int, device: str, seconds: float) -> float:
    """Captions/s of the caption stage's transformers wrapper over batches of 256 px pictures, after a warm-up."""
    import numpy as np
    from PIL import Image

    from curate.stages.caption import CaptionConfig, _TransformersCaptioner

    config = CaptionConfig(stage="caption", model=str(model),
                           generation={"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": 1,
                                       "do_sample": False})
    captioner = _TransformersCaptioner(config, device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(batch_size)]
    captioner(images)  # warm-up: kernels chosen, memory pooled
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        captioner(images)
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="batch sizes tried in turn until one runs out of memory or gains less than 5%%")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    from fill_card import fill_the_card

    with tempfile.TemporaryDirectory(prefix="bench-caption-gpu-") as work:
        model = build_captioner(Path(work) / "blip", args.size)
        seconds = 15.0 if args.device == "cuda" else 1.0
        best_size, best_rate = fill_the_card(args.batch_size, lambda size: captions_per_second(
            model, size, args.tokens, args.device, seconds), "captions", args.device)
    print(f"\nBLIP-{args.size}-sized captioner (random weights) on {args.device}, {args.tokens} tokens a caption: "
          f"{best_rate:.1f} captions/s at batch {best_size}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "device": args.device, "tokens": args.tokens,
                                         "batch_size": best_size, "captions_per_second": round(best_rate, 1)}))


if __name__ == "__main__":
    main()
