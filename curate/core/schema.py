"""Record columns, the column-flow check across stages, and the JSON schemas published under schemas/.

The files in schemas/ are generated from the code here (`curate schema --write schemas`), and a test keeps them in
sync, so the documented schemas are the enforced ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.errors import CurateError
from curate.core.stage import GlobalStage

# Columns every row has from the moment it is read.
BASE_COLUMNS: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "row": pa.int64(),
    "url": pa.string(),
    "caption": pa.string(),
    "status": pa.string(),
    "reason": pa.string(),
    "decided_by": pa.string(),
}
BASE_DESCRIPTIONS = {
    "uid": "stable id: blake2b-128 of (input file path relative to the inputs' common folder, row in file, url); the same on every rerun",
    "row": "position in the whole input (files in sorted order)",
    "url": "image URL from the input list",
    "caption": "caption from the input list (null for URL-only lists)",
    "status": "ok while alive; the ledger turns survivors into kept; filtered or failed otherwise",
    "reason": "machine-readable '<domain>:<what>' for filtered and failed rows",
    "decided_by": "the stage that stopped the row",
}
# Columns the reader adds beside them: what it changed or folded of a stranger's row.
READER_COLUMNS: dict[str, pa.DataType] = {"caption_truncated": pa.bool_(), "input_other_keys": pa.string()}
READER_DESCRIPTIONS = {
    "caption_truncated": "the input's caption was longer than input.max_caption_chars and was cut to it",
    "input_other_keys": "JSON object of the input's extra keys beyond input.max_extra_columns / input.keep_columns "
                        "(present only when some were folded)",
}

# Columns the writer needs: the image bytes and what goes into each sample's .txt.
WRITER_INPUTS = ["uid", "url", "caption", "image", "image_ext"]

# Columns kept out of each sample's .json (bytes, bookkeeping, timings).
# dedup evidence (thumbnails, colour grids) stays in the shard's parquet index: it would triple a sample's .json
NOT_IN_SAMPLE_JSON = {"image", "image_ext", "status", "reason", "decided_by", "row", "content_thumbnail",
                      "content_colors"}

LEDGER_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("decided_by", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("duplicate_of", pa.string()),
        ("caption_source", pa.string()),
        ("caption_model", pa.string()),
        ("caption_prompt", pa.string()),
        ("raw_clip_score", pa.float32()),
        ("synthetic_clip_score", pa.float32()),
    ]
)
LEDGER_DESCRIPTIONS = {
    "uid": "the input row's uid; one ledger row per input row",
    "url": "image URL",
    "caption": "caption from the input",
    "status": "kept | filtered | failed",
    "reason": "null for kept rows; '<domain>:<what>' otherwise (download:http_404, decode:truncated, ...)",
    "decided_by": "the stage that stopped the row (null for kept rows)",
    "shard": "shards/NNNNN.tar (or .parquet, by output.format) holding the sample (kept rows only)",
    "key": "the sample's WebDataset key inside that shard (kept rows only)",
    "duplicate_of": "for rows a dedup stage removed: the uid of the row kept in their place",
    "caption_source": "raw or synthetic: which caption the sample carries (null without a caption stage)",
    "caption_model": "the captioning model, for rows the caption stage captioned",
    "caption_prompt": "the prompt the synthetic caption started from",
    "raw_clip_score": "caption stage (best, rescue): CLIP score of the input's caption",
    "synthetic_clip_score": "caption stage (best, rescue): CLIP score of the synthetic caption",
}


@functools.cache
def reserved_column_names() -> frozenset[str]:
    """Every column name curate itself writes: the reader's, the ledger's and each registered stage's outputs."""
    from curate.stages import STAGES

    from curate.inputs.shards import SOURCE_COLUMNS

    # source_* point the downloader at local files: only the shard reader may set them, never an input list
    names = set(BASE_COLUMNS) | set(READER_COLUMNS) | set(LEDGER_SCHEMA.names) | set(SOURCE_COLUMNS)
    for name, cls in STAGES.items():  # defaults without validation: some stages require a choice (alignment)
        names |= set(cls(cls.Config.model_construct(stage=name)).outputs())
    return frozenset(names)


def is_timing_column(name: str) -> bool:
    return name.endswith("_seconds")


def is_embedding_column(name: str) -> bool:
    """Vectors (``image_embedding``, ``text_embedding``): published under embeddings/, not in shards or ledger."""
    return name.endswith("_embedding")


def check_column_flow(config: Any, source: str) -> None:
    """Every stage's input columns must be produced by the reader or an earlier stage; the writer's too."""
    from curate.stages import STAGES

    available = dict(BASE_COLUMNS)
    producers = {name: "the reader" for name in BASE_COLUMNS}
    for i, stage_config in enumerate(config.stages):
        stage = STAGES[stage_config.stage](stage_config)
        for column in stage.inputs():
            if column not in available:
                raise CurateError(
                    f"{source}: stages[{i}] ({stage_config.stage}): needs column '{column}' but no earlier stage "
                    f"produces it (available: {', '.join(sorted(available))})"
                )
        for column, dtype in stage.outputs().items():
            available[column] = dtype
            producers[column] = stage_config.stage
    for column in WRITER_INPUTS:
        if column not in available:
            raise CurateError(
                f"{source}: stages: the shard writer needs column '{column}' but no stage produces it "
                f"(add a download stage)"
            )


def _columns_doc(columns: dict[str, pa.DataType], descriptions: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "type": str(t), "description": descriptions.get(n, "")} for n, t in columns.items()]


def generated_schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON content of every published schema."""
    from curate.config import PipelineConfig
    from curate.core.ledger import Manifest
    from curate.stages import STAGES

    pipeline = PipelineConfig.model_json_schema()
    stage_schemas = {name: cls.Config.model_json_schema() for name, cls in sorted(STAGES.items())}
    pipeline["properties"]["stages"] = {
        "type": "array",
        "description": "ordered stages; each item's 'stage' key selects its schema",
        "items": {"oneOf": [{"$ref": f"#/$defs/stage_{name}"} for name in stage_schemas]},
    }
    for name, schema in stage_schemas.items():
        defs = schema.pop("$defs", {})
        pipeline.setdefault("$defs", {}).update(defs)
        pipeline["$defs"][f"stage_{name}"] = schema
    pipeline["$defs"].pop("StageConfig", None)

    record_columns: list[dict[str, str]] = _columns_doc(BASE_COLUMNS, BASE_DESCRIPTIONS)
    record_columns += _columns_doc(READER_COLUMNS, READER_DESCRIPTIONS)
    for name, cls in sorted(STAGES.items()):
        if issubclass(cls, GlobalStage):  # decisions land in the ledger, not in the stored records
            continue
        config = cls.Config.model_construct(stage=name)
        for column, dtype in cls(config).outputs().items():
            if any(c["name"] == column for c in record_columns):
                continue  # a later stage that rewrites a column (caption rewrites caption, clip_score)
            record_columns.append({"name": column, "type": str(dtype), "description": f"set by the {name} stage"})
        record_columns.append({"name": f"{name}_seconds", "type": "double", "description": f"{name} wall time per row"})
    return {
        "pipeline.schema.json": pipeline,
        "record.schema.json": {
            "title": "record",
            "description": "columns of the stored per-sample results (parts/*.parquet) and the shard index parquet",
            "columns": record_columns,
        },
        "ledger.schema.json": {
            "title": "ledger",
            "description": "ledger.parquet: exactly one row per input row; after these columns, any other decision "
                           "column the pipeline's global stages declare (decontaminate: eval_match; balance: "
                           "balance_entries)",
            "columns": _columns_doc(dict(zip(LEDGER_SCHEMA.names, LEDGER_SCHEMA.types)), LEDGER_DESCRIPTIONS),
        },
        "manifest.schema.json": Manifest.model_json_schema(),
    }


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in generated_schemas().items():
        path = folder / name
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
