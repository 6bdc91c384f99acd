"""Data-parallel training on Ray Train: the same loop in every worker, DDP for the gradients.

``train(config)`` in curate.train.loop runs in each TorchTrainer worker with a ``Workers`` that knows its rank.
Each rank reads every ``world``-th sample of the same deterministic stream (any number of shards works, and a resumed
run continues where each rank stopped); contrastive losses gather features from all ranks, so the negatives are the
global batch's, as in open_clip. Rank 0 alone writes checkpoints and the log, to the output folder every worker
reaches (a shared filesystem on a multi-node cluster).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError


@dataclass
class Workers:
    """Where this training process sits: rank 0 of 1 when training alone."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # set by Ray Train for its workers

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: Any) -> Any:
        if self.world == 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False)

    def total(self, value: float) -> float:
        """The sum over ranks (samples in this step's global batch)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def all_agree(self, flag: bool) -> bool:
        """True only if every rank says True: ranks skip a step together or not at all (DDP would hang)."""
        return self.total(0.0 if flag else 1.0) == 0.0


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from curate.train.config import TrainConfig
    from curate.train.loop import train

    context = ray.train.get_context()
    workers = Workers(rank=context.get_world_rank(), world=context.get_world_size(),
                      device=str(ray.train.torch.get_device()))
    config = TrainConfig.model_validate(loop_config["config"])
    train(config, progress=loop_config["progress"] and workers.main, workers=workers)


def _result(out: Path, samples_before: int, seconds: float) -> Any:
    """What rank 0 left in the output folder: the newest checkpoint's state and the last logged losses."""
    import json

    from curate.train import checkpoint
    from curate.train.loop import TrainResult

    saved = checkpoint.latest(out)
    if saved is None:
        raise CurateError(f"{out}: the Ray Train run ended without a checkpoint")
    state = checkpoint.load_state(saved)
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return TrainResult(out=out, step=int(state["step"]), samples_seen=int(state["samples_seen"]),
                       skipped=int(state["skipped"]), checkpoint=saved,
                       losses={k: v for k, v in last.items() if k.endswith("_loss")},
                       samples_per_second=(int(state["samples_seen"]) - samples_before) / max(seconds, 1e-9))


def train_on_ray(config: Any, progress: bool = True) -> Any:
    """Run ``config`` on ``config.distributed.workers`` Ray Train workers; returns rank 0's TrainResult."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curate.config import RayConfig
    from curate.cluster.ray_env import ensure_ray
    from curate.train import checkpoint

    spec = config.distributed
    out = Path(config.output).expanduser().resolve()
    config = config.model_copy(update={"output": str(out)})  # every worker writes to the same absolute place
    ensure_ray(RayConfig(address=spec.address))
    gpus = ray.cluster_resources().get("GPU", 0.0)
    per_worker = spec.gpus_per_worker or (1.0 if config.device == "cuda" or (config.device == "auto" and gpus) else 0)
    if config.device == "cpu":
        per_worker = 0.0
    if per_worker and gpus < per_worker * spec.workers:
        raise CurateError(f"distributed: {spec.workers} workers × {per_worker:g} GPU need {spec.workers * per_worker:g}"
                          f" GPUs; the cluster has {gpus:g}")
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if not per_worker and cpus < spec.cpus_per_worker * spec.workers:
        raise CurateError(f"distributed: {spec.workers} workers × {spec.cpus_per_worker:g} CPU need "
                          f"{spec.workers * spec.cpus_per_worker:g} CPUs; the cluster has {cpus:g} "
                          "(lower distributed.cpus_per_worker)")
    if progress:
        print(f"[train] {spec.workers} Ray Train workers ({'GPU' if per_worker else 'CPU'}), output {out}",
              file=sys.stderr)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "progress": progress},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=bool(per_worker),
                                     resources_per_worker={"CPU": spec.cpus_per_worker,
                                                           **({"GPU": per_worker} if per_worker else {})}),
        run_config=RunConfig(name="train", storage_path=str(out / "ray_train")),
    )
    saved = checkpoint.latest(out)
    before = int(checkpoint.load_state(saved)["samples_seen"]) if saved else 0
    started = time.perf_counter()
    trainer.fit()
    return _result(out, before, time.perf_counter() - started)
