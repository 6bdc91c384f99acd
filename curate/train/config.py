"""The training config: what to train, on which shards, for how long. Validated before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from curate.config import first_error, parse_override, read_yaml
from curate.errors import CurateError
from curate.models.clip import ClipSpec, architecture_config, check_spec

Objective = Literal["clip", "siglip", "coca", "itm"]


class DistributedConfig(BaseModel):
    """Data-parallel training on Ray Train (TorchTrainer, DDP): one process per worker, gradients all-reduced."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="Ray Train workers; 0: train in this process")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (device: auto uses 1 when the cluster "
                                   "has GPUs)")
    address: str | None = Field(None, description="an existing Ray cluster (auto, ray://HOST:10001); null: embedded")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("curate-small", description="architecture name (curate-tiny, curate-small, ViT-B-32, ...), "
                                                   "or a checkpoint folder to continue from")
    architecture_file: str | None = Field(None, description="model-config JSON of a custom architecture")
    pretrained: str | None = Field(None, description="pretrained tag or weights file to start from (null: random)")
    objectives: list[Objective] = Field(["clip"], min_length=1, description="loss terms, summed: clip (InfoNCE, "
                                                                           "learnable temperature), siglip (sigmoid), "
                                                                           "coca (contrastive + captioning decoder), itm "
                                                                           "(a fusion matching head on hard negatives)")
    data: str | list[str] | None = Field(None, description="WebDataset shards: folder, glob or list; --data overrides")
    output: str | None = Field(None, description="folder for checkpoints and the log; --output overrides")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=2, description="contrastive losses need at least two pairs")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    drop_noisiest: float = Field(0.0, ge=0, lt=1, description="the share of each batch's pairs with the highest "
                                 "clip loss left out of the update, ramped up over the first third of the steps (noisy "
                                 "captions are learned last): for noisy pools, e.g. bootstrapped scorers; one process "
                                 "only")
    seed: int = 0
    shuffle_buffer: int = Field(1000, ge=1, description="samples in the shuffle buffer (per loader worker)")
    workers: int = Field(0, ge=0, description="DataLoader worker processes (0: decode in the training process)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on GPUs")
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (the last step always saves)")
    keep_checkpoints: int = Field(2, ge=1, description="newest step checkpoints kept")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="several GPUs or nodes: the output folder must be shared")

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"objectives repeat a term: {value}")
        return value

    @model_validator(mode="after")
    def _model_resolves(self) -> TrainConfig:
        check_spec(self.spec())
        if "itm" in self.objectives and not {"clip", "siglip"} & set(self.objectives):
            raise ValueError("objectives: itm mines its hard negatives from a contrastive term: add clip or siglip")
        if self.drop_noisiest and ("clip" not in self.objectives or self.distributed.workers):
            raise ValueError("drop_noisiest: needs the clip objective, trained in one process (distributed.workers: 0)")
        if "itm" in self.objectives and "coca" in self.objectives:
            raise ValueError("objectives: itm and coca each add a fusion model; pick one")
        if "coca" in self.objectives:
            if "clip" in self.objectives:
                raise ValueError("objectives: coca already has a contrastive term; use [coca] or [coca, siglip]")
            config = architecture_config(self.spec())
            if config is not None and "multimodal_cfg" not in config:
                raise ValueError(f"objectives: coca needs a CoCa architecture (a model config with multimodal_cfg, "
                                 f"e.g. curate-tiny-coca or coca_ViT-B-32); {self.model} has none")
        return self

    def spec(self) -> ClipSpec:
        return ClipSpec(self.model, self.pretrained, self.architecture_file, family="open_clip")  # trains open_clip


def _set(raw: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    target = raw
    for key in keys[:-1]:
        node = target.setdefault(key, {})
        if not isinstance(node, dict):
            raise CurateError(f"--set {text}: '{key}' is not a section")
        target = node
    target[keys[-1]] = value


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A train config from a YAML file (or the defaults when path is None) with `--set KEY=VALUE` overrides."""
    source = str(path) if path else "train config"
    raw = read_yaml(Path(path)) if path else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CurateError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    for text in overrides or []:
        _set(raw, text)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            known = ", ".join(TrainConfig.model_fields)
            raise CurateError(f"{source}: unknown key '{first['loc'][0]}'; expected one of: {known}") from None
        raise first_error(source, err) from None
