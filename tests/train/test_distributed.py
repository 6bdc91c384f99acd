"""Data-parallel training on Ray Train: two CPU workers (gloo DDP) train one model, rank 0 writes, resume works."""

from __future__ import annotations

import json
import math

import pytest

from curate.models.clip import ClipSpec, load_clip
from curate.train.config import TrainConfig
from curate.train.data import _every_nth
from curate.train.loop import train


def test_ranks_split_the_stream_into_disjoint_covering_parts() -> None:
    stream = [{"__key__": str(i)} for i in range(23)]
    parts = [[s["__key__"] for s in _every_nth(rank, 3)(iter(stream))] for rank in range(3)]
    assert sorted(sum(parts, [])) == sorted(s["__key__"] for s in stream)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])


@pytest.fixture
def two_workers(curated_shards, ray_session, tmp_path):
    def config(steps: int) -> TrainConfig:
        return TrainConfig(model="curate-tiny", data=str(curated_shards), output=str(tmp_path / "ddp"), steps=steps,
                           batch_size=8, warmup_steps=2, log_every=5, checkpoint_every=10, lr=1e-3, device="cpu",
                           shuffle_buffer=50, distributed={"workers": 2, "cpus_per_worker": 0.5})
    return config


def test_two_ray_train_workers_train_one_model_and_resume(two_workers, tmp_path) -> None:
    result = train(two_workers(12), progress=False)
    assert result.step == 12
    assert result.samples_seen == 12 * 8 * 2  # batch_size is per worker: the global batch is twice it
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 12]  # one writer: rank 0
    clip = load_clip(ClipSpec(str(result.checkpoint)), "cpu")  # a normal checkpoint, as a single process writes
    assert clip.model is not None

    resumed = train(two_workers(20), progress=False)
    assert resumed.step == 20 and resumed.samples_seen == 20 * 8 * 2
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 12, 15, 20]  # continued from step 12, not from 0
    # InfoNCE over the gathered global batch of 16 starts near ln 16; it must have learned below that
    assert log[-1]["clip_loss"] < math.log(16) - 0.1, log


def test_more_workers_than_the_cluster_holds_is_one_clear_error(two_workers) -> None:
    from curate.errors import CurateError

    config = two_workers(5)
    config.distributed.workers, config.distributed.cpus_per_worker = 8, 1.0
    with pytest.raises(CurateError, match="8 workers × 1 CPU need 8 CPUs; the cluster has 2"):
        train(config, progress=False)
