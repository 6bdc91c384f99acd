"""A pipeline file bound to the stage registry: stage names resolved to their config classes, each stage
validated with its own model and against the stages before it, stage order and column flow checked."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from curate.config import PipelineConfig, StageConfig, apply_overrides, first_error, fmt_loc, read_yaml, unknown_key_hint
from curate.core.schema import check_column_flow
from curate.core.stage import GlobalStage
from curate.errors import CurateError
from curate.stages import STAGES


def validate_pipeline(raw: Any, source: str) -> PipelineConfig:
    """Validate plain data (parsed YAML) into a PipelineConfig, or raise one CurateError line."""
    if not isinstance(raw, dict):
        raise CurateError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    raw_stages = raw.get("stages") or []
    if not isinstance(raw_stages, list):
        raise CurateError(f"{source}: stages: expected a list of stages; got {raw_stages!r}")
    stages: list[StageConfig] = []
    for i, item in enumerate(raw_stages):
        if not isinstance(item, dict) or "stage" not in item:
            raise CurateError(f"{source}: stages[{i}]: expected a mapping with a 'stage' key; got {item!r}")
        name = item["stage"]
        if not isinstance(name, str):
            raise CurateError(f"{source}: stages[{i}].stage: expected a stage name; got {name!r}")
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), list(STAGES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CurateError(
                f"{source}: stages[{i}].stage: unknown stage '{name}'{hint}; known stages: {', '.join(sorted(STAGES))}"
            )
        config_cls = STAGES[name].Config
        try:
            stage_config = config_cls.model_validate(item)
            stage_config.resolve_with(stages)  # settings taken from earlier stages (caption: the score stage's)
            stages.append(stage_config)
        except ValidationError as err:
            first = err.errors()[0]
            if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
                known = [k for k in config_cls.model_fields if k != "stage"]
                raise unknown_key_hint(source, f"stages[{i}] ({name})", str(first["loc"][0]), known) from None
            raise first_error(source, err, ("stages", i), raw_stages) from None
        except ValueError as err:  # from resolve_with: a setting that depends on the stages before it
            raise CurateError(f"{source}: stages[{i}] ({name}): {err}") from None
    try:
        config = PipelineConfig.model_validate({**raw, "stages": []})
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            loc = tuple(first["loc"])
            model: type[BaseModel] = PipelineConfig
            for part in loc[:-1]:
                model = model.model_fields[part].annotation  # type: ignore[assignment]
            known = list(model.model_fields)
            raise unknown_key_hint(source, fmt_loc(loc[:-1]) if len(loc) > 1 else "(top level)", str(loc[-1]), known) from None
        raise first_error(source, err) from None
    config.stages = stages
    check_stage_order(config, source)
    check_column_flow(config, source)
    check_output_format(config, source)
    return config


def check_output_format(config: PipelineConfig, source: str) -> None:
    from curate.sinks.sink import SINKS

    if config.output.format not in SINKS:
        close = difflib.get_close_matches(config.output.format, list(SINKS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CurateError(f"{source}: output.format: unknown format '{config.output.format}'{hint}; known: "
                          f"{', '.join(SINKS)}")


def check_stage_order(config: PipelineConfig, source: str) -> None:
    """Per-sample stages stream first; global stages decide over what they stored."""
    last_global = None
    for i, stage in enumerate(config.stages):
        if issubclass(STAGES[stage.stage], GlobalStage):
            last_global = stage.stage
        elif last_global:
            raise CurateError(
                f"{source}: stages[{i}] ({stage.stage}): a per-sample stage cannot follow the global stage "
                f"'{last_global}'; put per-sample stages first"
            )


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file."""
    path = Path(path)
    raw = read_yaml(path)
    if overrides:
        if not isinstance(raw, dict):
            raise CurateError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        raw = apply_overrides(raw, overrides)
    return validate_pipeline(raw, str(path))
