"""open_clip's own trainer on curate's shards, as users run it: `curate open-clip-train ARGS` hands every argument to
open_clip_train.main, with webdataset's end-of-shard markers kept out of its sample grouping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_the_end_of_shard_markers_are_dropped_and_files_kept(curated_shards) -> None:
    import webdataset as wds

    from curate.train.open_clip_bridge import patch_open_clip_train

    patch_open_clip_train()
    import open_clip_train.data as data

    tars = sorted(str(p) for p in curated_shards.glob("*.tar"))
    samples = list(data.tarfile_to_samples_nothrow(iter([{"url": t} for t in tars])))
    assert samples and all({"__key__", "jpg", "txt", "json"} <= set(s) for s in samples)
    assert len(samples) == len({(s["__url__"], s["__key__"]) for s in samples})
    assert len(samples) == sum(1 for _ in wds.WebDataset(tars, shardshuffle=False))  # every sample, once


def test_open_clip_train_trains_a_tiny_model_on_curated_shards(curated_shards, tmp_path) -> None:
    tars = sorted(str(p) for p in curated_shards.glob("*.tar"))
    done = subprocess.run(
        [sys.executable, "-m", "curate.cli", "open-clip-train", "--", "--train-data", "::".join(tars),
         "--train-num-samples", "48", "--dataset-type", "webdataset", "--batch-size", "8", "--epochs", "1",
         "--workers", "0", "--model", "curate-tiny", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
         "--logs", str(tmp_path / "logs"), "--name", "tiny", "--save-frequency", "1", "--report-to", "",
         "--seed", "0"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    checkpoint = tmp_path / "logs" / "tiny" / "checkpoints" / "epoch_1.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and any(k.endswith("logit_scale") for k in state["state_dict"])
    log = (tmp_path / "logs" / "tiny" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Contrastive_loss" in log
