"""Pipeline configs as data: the models of a pipeline file (input, stages, output, ray), the base of every
stage's config, `--set` overrides and YAML reading. Binding stage names to stage classes is
curate.core.pipeline's job; this module imports nothing of the pipeline machinery.

Every error names the file, the key, what was given and what was expected, on one line.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.errors import CurateError

class Resources(BaseModel):
    """What one worker of a stage needs; the runner turns this into Ray resources and pool sizes."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed)")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved per worker (fractions allowed)")
    batch_size: int = Field(128, ge=1, description="rows per batch handed to process()")
    concurrency: int | None = Field(
        None, ge=1, description="workers (actor pool size); default: as many as the cluster's CPUs allow"
    )
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. download_node")


class StageConfig(BaseModel):
    """Base of every stage's config: the ``stage`` name plus its resources. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    resources: Resources = Field(default_factory=Resources)

    def resolve_with(self, earlier: list[StageConfig]) -> None:
        """Take settings from the stages before this one (caption scores with the pipeline's score stage); raise
        ValueError naming what is missing. Runs at validation and again for configs built in code."""


InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "webdataset"]


class InputConfig(BaseModel):
    """Where the URL list is and which columns hold what (img2dataset's names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] | None = Field(None, description="file, folder, glob or fsspec URL; `--input` overrides")
    format: InputFormat = Field("auto", description="auto: from the file extension")
    url_col: str = "url"
    caption_col: str | None = Field("caption", description="null for URL-only lists")
    rows_per_chunk: int = Field(10_000, ge=1, description="input rows per resumable unit of work")
    max_caption_chars: int = Field(
        4000, ge=1, description="a longer caption is cut to this many characters and its row's caption_truncated set")
    max_record_bytes: int = Field(
        1 << 20, ge=1024, description="longest JSON or text line (a longer one fails the file, naming the line); "
        "largest shard .json member (a larger one is dropped, like invalid JSON)")
    max_extra_columns: int = Field(
        64, ge=0, description="extra input columns (or JSON keys) kept as columns, the first names seen; a row's "
        "others go into its input_other_keys, one JSON object")
    keep_columns: list[str] | None = Field(
        None, description="the extra columns to keep, instead of the first max_extra_columns; the others go into "
        "input_other_keys")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="output folder; `--output` overrides")
    samples_per_shard: int = Field(10_000, ge=1)
    format: str = Field("webdataset", description="shard format (curate.sinks.sink.SINKS): webdataset (tars with a "
                        "parquet index beside each) or parquet (one parquet per shard holding the image bytes)")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="null: an embedded local Ray sized to this machine")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (default: all)")


class PipelineConfig(BaseModel):
    """A whole pipeline: input, the ordered stages, output and where it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    input: InputConfig = Field(default_factory=InputConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, every stage with all its defaults filled in."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [stage.model_dump(mode="json") for stage in self.stages]
        return data


def fmt_loc(loc: tuple[Any, ...], raw_stages: list[Any] | None = None) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            if i == 1 and loc[0] == "stages" and raw_stages and isinstance(raw_stages[item], dict):
                parts[-1] += f" ({raw_stages[item].get('stage')})"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def first_error(source: str, err: ValidationError, prefix: tuple[Any, ...] = (), raw_stages: list[Any] | None = None):
    e = err.errors()[0]
    loc = fmt_loc(prefix + tuple(e["loc"]), raw_stages)
    if e["type"] == "extra_forbidden":
        return CurateError(f"{source}: {loc}: unknown key")
    if e["type"] == "missing":
        return CurateError(f"{source}: {loc}: required key missing")
    if e["type"] == "value_error":  # our own validators: the message already says what was given and expected
        return CurateError(f"{source}: {loc}: {e['msg'].removeprefix('Value error, ')}")
    return CurateError(f"{source}: {loc}: {e['msg']}; got {e['input']!r}")


def unknown_key_hint(source: str, loc: str, key: str, known: list[str]) -> CurateError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return CurateError(f"{source}: {loc}: unknown key '{key}'{hint}; expected one of: {', '.join(known)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`download.timeout=3` → (["download", "timeout"], 3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise CurateError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. download.timeout=5")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides; a first key that names a stage addresses that stage (its first occurrence)."""
    for text in overrides:
        keys, value = parse_override(text)
        head, rest = keys[0], keys[1:]
        stages = raw.get("stages") or []
        if head == "stages" and rest and rest[0].isdigit():
            index = int(rest[0])
            if index >= len(stages):
                raise CurateError(f"--set {text}: the pipeline has {len(stages)} stages; no stages.{index}")
            target, rest = stages[index], rest[1:]
        elif head in ("input", "output", "ray", "name", "description"):
            target = raw
            rest = keys
        else:
            named = [s for s in stages if isinstance(s, dict) and s.get("stage") == head]
            if not named:
                known = ", ".join(["input", "output", "ray"] + [str(s.get("stage")) for s in stages if isinstance(s, dict)])
                raise CurateError(f"--set {text}: '{head}' is neither a section nor a stage of this pipeline ({known})")
            target = named[0]
        if not rest:
            raise CurateError(f"--set {text}: name a key inside '{head}', e.g. {head}.KEY=VALUE")
        for part in rest[:-1]:
            node = target.get(part)
            if node is None:
                node = target[part] = {}
            if not isinstance(node, dict):
                raise CurateError(f"--set {text}: '{part}' is not a section")
            target = node
        target[rest[-1]] = value
    return raw


def read_yaml(path: Path) -> Any:
    if not path.exists():
        raise CurateError(f"{path}: pipeline file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CurateError(f"{path}: cannot read pipeline file ({err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CurateError(f"{path}{where}: malformed YAML: {problem}") from None
