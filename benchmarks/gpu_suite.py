"""Every GPU figure in one run, printed as one table against its target (issue 20).

Runs, each in its own process and each at the batch size that fills the card:
- benchmarks/score_gpu.py for ViT-B-32 and ViT-L-14 (random weights, bf16): pairs/s end to end from WebDataset
  shards (`curate run`), the model's forward alone, GPU utilisation while the run scores;
- benchmarks/train_gpu.py: `curate train` samples/s (ViT-B-32) and the share of step time spent waiting for data;
- benchmarks/caption_gpu.py: captions/s of a BLIP-base-sized captioner (random weights, built here).

    bash benchmarks/gpu_suite.sh                 # on a GPU machine: under 10 minutes on one H200
    bash benchmarks/gpu_suite.sh --dry-run       # on CPU, tiny models and sizes: the same scripts end to end

--dry-run measures nothing worth reading: it checks that every script runs and that the table is filled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
CPUS = os.cpu_count() or 2

# Issue 20's targets on an H200: pairs/s end to end, GPU utilisation (%), share of training steps waiting for data.
TARGETS = {
    "score_b32": 10_000, "score_l14": 1_000, "utilisation": 80.0, "data_wait": 0.10,
}


def runs(dry: bool) -> list[tuple[str, list[str]]]:
    """Each measurement's name and command line."""
    if dry:
        tiny_score = ["--device", "cpu", "--model", "curate-tiny", "--n", "256", "--chunk-size", "32", "64",
                      "--score-cpus", "1"]
        return [
            ("score_b32", ["score_gpu.py", *tiny_score]),
            ("train", ["train_gpu.py", "--device", "cpu", "--model", "curate-tiny", "--n", "128", "--steps", "4",
                       "--batch-size", "8", "16", "--workers", "1"]),
            ("caption", ["caption_gpu.py", "--device", "cpu", "--size", "tiny", "--batch-size", "2", "4",
                         "--tokens", "4"]),
        ]
    score_cpus = str(max(1, (CPUS - 2) // 2))  # two scoring actors (half a GPU each), each preprocessing on these
    return [
        ("score_b32", ["score_gpu.py", "--model", "ViT-B-32", "--n", "100000", "--score-cpus", score_cpus]),
        ("score_l14", ["score_gpu.py", "--model", "ViT-L-14", "--n", "30000", "--score-cpus", score_cpus,
                       "--chunk-size", "128", "256", "512", "1024"]),
        ("train", ["train_gpu.py", "--model", "ViT-B-32", "--n", "50000", "--steps", "200",
                   "--workers", str(max(1, CPUS - 2))]),
        ("caption", ["caption_gpu.py"]),
    ]


def table(results: dict[str, dict | None], dry: bool) -> list[str]:
    """One line per figure: what it is, the measured value, the target, and whether it is met."""
    lines = [f"{'figure':<58} {'measured':>12} {'target':>10}  ", "-" * 88]

    def row(label: str, value: float | None, target: float | None = None, below: bool = False, unit: str = "") -> None:
        shown = "missing" if value is None else f"{value:,.1f}{unit}"
        met = "" if value is None or target is None or dry else ("met" if (value <= target if below else
                                                                           value >= target) else "NOT met")
        goal = "" if target is None else (f"<= {target:g}{unit}" if below else f">= {target:,g}{unit}")
        lines.append(f"{label:<58} {shown:>12} {goal:>10}  {met}")

    for name, label in (("score_b32", "ViT-B-32"), ("score_l14", "ViT-L-14")):
        if name not in results:  # not run (--only, or a dry run: one tiny model stands in for both)
            continue
        figures = results.get(name)
        model = (figures or {}).get("model", label)
        chunk = (figures or {}).get("chunk_size")
        row(f"{model} scoring, end to end, pairs/s (chunk {chunk})",
            figures and figures["end_to_end_pairs_per_second"], TARGETS[name])
        row(f"{model} forward alone, pairs/s", figures and figures["forward_pairs_per_second"])
        row(f"{model} GPU utilisation while scoring, mean", figures and figures["gpu_utilisation_mean"],
            None if dry else TARGETS["utilisation"], unit="%")
    train = results.get("train")
    row(f"curate train {(train or {}).get('model', '')}, samples/s (batch {(train or {}).get('batch_size')})",
        train and train["samples_per_second"])
    row("curate train, share of step time waiting for data", train and 100 * train["data_wait_share"],
        100 * TARGETS["data_wait"], below=True, unit="%")
    caption = results.get("caption")
    row(f"BLIP-{(caption or {}).get('size', 'base')} captions/s, {(caption or {}).get('tokens')} tokens "
        f"(batch {(caption or {}).get('batch_size')})", caption and caption["captions_per_second"])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU with tiny models: check that it all runs")
    parser.add_argument("--only", nargs="+", help="run only these measurements (score_b32 score_l14 train caption)")
    args = parser.parse_args()

    results: dict[str, dict | None] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        for name, command in runs(args.dry_run):
            if args.only and name not in args.only:
                continue
            out = Path(work) / f"{name}.json"
            start = time.perf_counter()
            print(f"== {name}: {' '.join(command)}", flush=True)
            done = subprocess.run([sys.executable, str(BENCHMARKS / command[0]), *command[1:], "--json", str(out)])
            print(f"== {name}: {time.perf_counter() - start:.0f} s, exit {done.returncode}", flush=True)
            results[name] = json.loads(out.read_text()) if done.returncode == 0 and out.exists() else None
            if results[name] is None:
                failed.append(name)
    print()
    print("\n".join(table(results, args.dry_run)))
    if args.dry_run:
        print("(dry run on CPU with tiny models: these figures say nothing about a GPU)")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
