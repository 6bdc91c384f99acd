"""The JSON schemas published under schemas/ are the ones the code enforces (`curate schema --write schemas`)."""

from __future__ import annotations

import json
from pathlib import Path

from curate.core.schema import LEDGER_SCHEMA, generated_schemas, write_schemas

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_schema_files_match_code() -> None:
    generated = generated_schemas()
    on_disk = {path.name: json.loads(path.read_text()) for path in SCHEMAS.glob("*.json")}
    assert set(on_disk) == set(generated), "run: curate schema --write schemas"
    for name, content in generated.items():
        # compare as JSON would store it (tuples become lists, keys strings)
        assert on_disk[name] == json.loads(json.dumps(content)), f"schemas/{name} is stale: curate schema --write schemas"


def test_pipeline_schema_lists_every_stage_and_key() -> None:
    from curate.stages import STAGES

    pipeline = generated_schemas()["pipeline.schema.json"]
    refs = [item["$ref"] for item in pipeline["properties"]["stages"]["items"]["oneOf"]]
    assert refs == [f"#/$defs/stage_{name}" for name in sorted(STAGES)]
    download = pipeline["$defs"]["stage_download"]
    assert {"timeout", "retries", "resize_mode", "resources"} <= set(download["properties"])
    assert download.get("additionalProperties") is False  # unknown keys are rejected, and documented so


def test_ledger_and_record_columns() -> None:
    schemas = generated_schemas()
    assert [c["name"] for c in schemas["ledger.schema.json"]["columns"]] == LEDGER_SCHEMA.names
    record = [c["name"] for c in schemas["record.schema.json"]["columns"]]
    assert record[:7] == ["uid", "row", "url", "caption", "status", "reason", "decided_by"]
    assert {"image", "sha256", "width", "download_seconds"} <= set(record)
    assert len(record) == len(set(record))


def test_write_schemas_is_deterministic(tmp_path: Path) -> None:
    first = {p.name: p.read_bytes() for p in write_schemas(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in write_schemas(tmp_path / "b")}
    assert first == second
    assert first == {name: (SCHEMAS / name).read_bytes() for name in first}
