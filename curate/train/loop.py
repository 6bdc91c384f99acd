"""The training loop: one open_clip model, one optimizer, summed ``*_loss`` terms, checkpoints that resume.

Reads top to bottom: set up (model, data, optimizer, what to resume), then the loop (schedule, forward, losses,
step, log, checkpoint). One process on a CPU or one GPU (bf16 autocast there), or one rank of a Ray Train run
(curate.train.distributed): then the forward goes through DDP and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.models.clip import ClipSpec, _register_architecture
from curate.models.scorer import preflight_model
from curate.train import checkpoint
from curate.train.config import TrainConfig
from curate.train.data import Batch, epoch_batches, shard_list
from curate.train.distributed import Workers
from curate.train.losses import make_losses

SIGLIP_INIT_BIAS = -10.0  # SigLIP's initial logit bias: most pairs start as negatives
MAX_NONFINITE = 10  # non-finite losses in a row before the run stops


@dataclass
class TrainResult:
    out: Path
    step: int
    samples_seen: int
    skipped: int
    checkpoint: Path | None
    losses: dict[str, float] = field(default_factory=dict)
    samples_per_second: float = 0.0


def build_model(spec: ClipSpec, objectives: list[str], device: str) -> tuple[Any, Any, Any, dict]:
    """(model with output_dict, train transform, tokenizer, model config to save) through open_clip's factory."""
    import open_clip

    _register_architecture(spec)
    name = spec.open_clip_name()
    model_cfg = dict(open_clip.get_model_config(name))
    extra = {"init_logit_bias": SIGLIP_INIT_BIAS} if "siglip" in objectives and "init_logit_bias" not in model_cfg else {}
    pretrained = None if name.startswith(("hf-hub:", "local-dir:")) else spec.pretrained
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, output_dict=True, weights_only=True, **extra)
    fresh = pretrained is None and not name.startswith(("hf-hub:", "local-dir:"))
    projection = getattr(getattr(model, "text_decoder", None), "text_projection", None)
    if fresh and projection is not None:
        import torch

        # open_clip's MultimodalTransformer (CoCa's decoder) never initialises its text_projection (its
        # init_parameters() is not called, and would fail): torch.empty keeps whatever memory held, now and then
        # NaN. Drawn here as that method means to: normal with std width^-0.5.
        with torch.no_grad():
            projection.normal_(std=model.text_decoder.width ** -0.5)
    return model, preprocess_train, open_clip.get_tokenizer(name), {**model_cfg, **extra}


def make_optimizer(modules: list[Any], config: TrainConfig) -> Any:
    """AdamW; gains, biases, norms and the temperature are not decayed (open_clip's split)."""
    import torch

    def no_decay(name: str, param: Any) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for module in modules for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": config.weight_decay}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_stream(urls: list[str], preprocess: Any, tokenizer: Any, config: TrainConfig,
                 position: dict[str, int], rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """Batches forever, epoch after epoch, continuing from ``position`` (updated in place as batches are taken)."""
    skip = position["batch_in_epoch"]
    while True:
        produced = False
        for index, batch in enumerate(epoch_batches(
                urls, preprocess, tokenizer, batch_size=config.batch_size, shuffle_buffer=config.shuffle_buffer,
                seed=config.seed, epoch=position["epoch"], workers=config.workers, rank=rank, world=world)):
            produced = produced or batch.images is not None
            if index < skip:  # consumed before the checkpoint this run resumed from
                continue
            position["batch_in_epoch"] = index + 1
            yield batch
        if not produced:
            raise CurateError(f"data: {len(urls)} shard(s) hold fewer than batch_size={config.batch_size} "
                              "decodable samples")
        position["epoch"], position["batch_in_epoch"], skip = position["epoch"] + 1, 0, 0


def resolve_device(config: TrainConfig) -> str:
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise CurateError("device: cuda asked for, but torch sees no CUDA device")
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def autocast_dtype(precision: str, gpu: bool) -> Any:
    """The autocast dtype for ``precision`` (None: fp32); auto is bf16 on GPUs that have it, else fp16."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision == "auto" and gpu:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype


def restore(resume: Path, out: Path, config: TrainConfig, optimizer: Any, scaler: Any, cuda_device: str | None,
            position: dict[str, int]) -> int:
    """Optimizer, scaler, random state and data position of the checkpoint ``resume`` (``position`` updated in
    place); returns its step. A run of other objectives is one clear error."""
    import torch

    state = checkpoint.load_state(resume)
    saved_objectives = state.get("objectives", config.objectives)
    if sorted(saved_objectives) != sorted(config.objectives):
        raise CurateError(f"objectives: {out} holds a run trained with {saved_objectives}, not {config.objectives}; "
                          f"use another --output, or start a new run from the checkpoint with model: {resume}")
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:  # dropout and the ITM head's negative sampling continue as if never stopped
        torch.set_rng_state(state["rng"])
    if cuda_device is not None and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], torch.device(cuda_device))
    position.update({k: int(state.get(k, 0)) for k in position})
    return int(state["step"])


def apply_gradients(total: Any, optimizer: Any, scaler: Any, grad_clip: float | None) -> None:
    """Backward, optional clipping and the optimizer step (through the fp16 scaler when there is one)."""
    import torch

    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def log_step(log, step: int, last: dict[str, float], rate: float, position: dict[str, int], config: TrainConfig,
             progress: bool) -> None:
    """One line of log.jsonl (and of progress on stderr): the step's loss terms, rate and position."""
    record = {"step": step, **last, "loss": sum(last.values()), "lr": learning_rate(step - 1, config),
              "samples_per_second": round(rate, 1), "samples_seen": position["samples_seen"],
              "skipped": position["skipped"]}
    log.write(json.dumps(record) + "\n")
    log.flush()
    if progress:
        terms_text = " ".join(f"{k}={v:.4f}" for k, v in last.items())
        print(f"[train] step {step}/{config.steps} {terms_text} {rate:.0f} samples/s", file=sys.stderr)


def resume_state(config: TrainConfig, cuda_device: str | None, scaler) -> dict:
    """What a checkpoint keeps beyond weights and optimizer so that a resumed run continues exactly: the
    objectives, torch's RNG (the ITM head samples negatives from it), CUDA's, and the fp16 loss scaler."""
    import torch

    return {"objectives": list(config.objectives), "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(torch.device(cuda_device))} if cuda_device else {}),
            **({"scaler": scaler.state_dict()} if scaler is not None else {})}


def train(config: TrainConfig, *, progress: bool = True, workers: Workers | None = None) -> TrainResult:
    """Train ``config`` here, or on Ray Train workers when ``config.distributed.workers`` is set."""
    import torch

    from curate.train.step import TrainStep

    if workers is None and config.distributed.workers:
        from curate.train.distributed import train_on_ray

        return train_on_ray(config, progress)
    workers = workers or Workers()

    if not config.output:
        raise CurateError("output: no folder for checkpoints (set output: in the config or pass --output)")
    out = Path(config.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    urls = shard_list(config.data)
    device = workers.device or resolve_device(config)
    device_type = torch.device(device).type
    resume = checkpoint.latest(out)
    spec = ClipSpec(str(resume), family="open_clip") if resume else config.spec()
    preflight_model(spec)
    torch.manual_seed(config.seed)
    model, preprocess, tokenizer, model_cfg = build_model(spec, config.objectives, device)
    head = None
    if "itm" in config.objectives:
        from curate.models.itm import head_for, load_head

        head = (load_head(resume, device) if resume else None) or head_for(model).to(device)
        head.train()
    optimizer = make_optimizer([model] + ([head] if head is not None else []), config)
    position = {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped": 0}
    step = 0
    gpu = device_type == "cuda"
    dtype = autocast_dtype(config.precision, gpu)
    scaler = torch.amp.GradScaler("cuda") if gpu and dtype == torch.float16 else None
    if resume:
        step = restore(resume, out, config, optimizer, scaler, device if gpu else None, position)
        if progress:
            print(f"[train] resuming from {resume} at step {step}", file=sys.stderr)
    if workers.main:
        (out / "train_config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    loss_terms = make_losses(config.objectives, head, workers.rank, workers.world)
    step_module = workers.wrap(TrainStep(model, head, loss_terms))
    batches = batch_stream(urls, preprocess, tokenizer, config, position, workers.rank, workers.world)
    saved = resume
    run_start, samples_before = time.perf_counter(), position["samples_seen"]

    model.train()
    last: dict[str, float] = {}
    nonfinite, window_start, window_samples = 0, time.perf_counter(), 0
    with open(out / "log.jsonl", "a") if workers.main else contextlib.nullcontext() as log:
        while step < config.steps:
            batch = next(batches)
            position["skipped"] += int(workers.total(batch.skipped))
            if not workers.all_agree(batch.images is not None):  # every rank steps, or none does
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            # ramped up over the first third of training: early on every loss is high, clean or not
            loss_terms.drop = config.drop_noisiest * min(1.0, step / max(1, config.steps // 3))
            images, texts = batch.images.to(device, non_blocking=True), batch.texts.to(device, non_blocking=True)
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                terms = step_module(images, texts)
                total = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            # one bad batch must not poison the weights: skip its update (on every rank)
            if not workers.all_agree(bool(torch.isfinite(total))):
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE:
                    raise CurateError(f"step {step}: the loss was not finite {nonfinite} times in a row; lower lr or "
                                      "use precision: fp32")
                continue
            nonfinite = 0
            apply_gradients(total, optimizer, scaler, config.grad_clip)
            with torch.no_grad():  # CLIP's temperature stays below 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            global_batch = int(workers.total(len(images)))
            position["samples_seen"] += global_batch
            window_samples += global_batch
            last = {name: float(value.detach()) for name, value in terms.items()}

            if workers.main and (step % config.log_every == 0 or step == config.steps):
                rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                log_step(log, step, last, rate, position, config, progress)
                window_start, window_samples = time.perf_counter(), 0
            if workers.main and (step % config.checkpoint_every == 0 or step == config.steps):
                saved = checkpoint.save(out, step, model, model_cfg, optimizer, position,
                                        config.model_dump(mode="json"), config.keep_checkpoints, head, tokenizer,
                                        resume_state(config, device if gpu else None, scaler))
    return TrainResult(out=out, step=step, samples_seen=position["samples_seen"], skipped=position["skipped"],
                       checkpoint=saved, losses=last,
                       samples_per_second=(position["samples_seen"] - samples_before) /
                       max(time.perf_counter() - run_start, 1e-9))
