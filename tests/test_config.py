"""Pipeline configs: every shipped pipeline validates; every mistake is one CurateError line naming file and key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from curate.cli import main
from curate.config import PipelineConfig, apply_overrides, parse_override, read_yaml
from curate.core.pipeline import load_pipeline
from curate.errors import CurateError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.yaml"
CURATE = REPO / ".venv" / "bin" / "curate"

GOOD = """\
name: t
stages:
  - stage: download
    timeout: 3
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(CurateError) as info:
        load_pipeline(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path: Path) -> None:
    config = load_pipeline(path)
    assert isinstance(config, PipelineConfig)
    assert config.name == path.stem
    assert "download" in [stage.stage for stage in config.stages]
    assert config.resolved()["stages"][0]["stage"] == "download"


def test_shipped_pipelines_exist() -> None:
    assert {p.name for p in (REPO / "pipelines").glob("*.yaml")} >= {"demo.yaml", "laion_style.yaml"}


def test_demo_values_are_read() -> None:
    config = load_pipeline(DEMO)
    download = config.stages[0]
    assert (download.timeout, download.retries, download.image_size) == (3, 1, 128)
    assert download.resources.cpus == 0.5 and download.resources.batch_size == 64
    assert config.input.rows_per_chunk == 250 and config.output.samples_per_shard == 250


def test_resolved_fills_stage_defaults(tmp_path: Path) -> None:
    resolved = load_pipeline(write(tmp_path, GOOD)).resolved()
    stage = resolved["stages"][0]
    assert stage["timeout"] == 3 and stage["retries"] == 2 and stage["resize_mode"] == "border"
    assert resolved["output"]["samples_per_shard"] == 10_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\nstagez: []\n", ["(top level)", "'stagez'", "did you mean 'stages'"]),
        ("name: t\nstages:\n  - stage: download\n    timeoutt: 3\n",
         ["stages[0] (download)", "'timeoutt'", "did you mean 'timeout'"]),
        ("name: t\nstages:\n  - stage: donwload\n", ["stages[0].stage", "'donwload'", "did you mean 'download'"]),
        ("name: t\nstages:\n  - stage: download\n    timeout: fast\n", ["stages[0] (download).timeout", "'fast'"]),
        ("name: t\nstages:\n  - stage: download\n    resize_mode: squash\n", ["resize_mode", "'squash'", "border"]),
        ("name: t\nstages:\n  - timeout: 3\n", ["stages[0]", "'stage' key"]),
        ("name: t\nstages:\n  - download\n", ["stages[0]", "'stage' key"]),
        ("name: t\nstages: 5\n", ["stages", "list"]),
        ("name: t\ninput:\n  url_coll: u\nstages:\n  - stage: download\n", ["input", "'url_coll'", "'url_col'"]),
        ("name: t\nstages:\n  - stage: download\n    resources:\n      cpuz: 1\n", ["resources.cpuz", "unknown key"]),
        ("name: t\nstages:\n  - stage: download\n    resources:\n      cpus: 0\n", ["resources.cpus", "0"]),
        ("description: d\nstages:\n  - stage: download\n", ["name", "missing"]),
        ("- just\n- a list\n", ["mapping"]),
        ("", ["mapping"]),
        ("name: t\nstages: []\n", ["stages", "column 'image'", "download"]),
        ("name: t\nstages:\n  - stage: download\n    image_size: 20000\n    max_image_pixels: 1000000\n",
         ["stages[0] (download)", "image_size 20000", "max_image_pixels 1000000", "every border row"]),
    ],
    ids=["top_level", "stage_key", "stage_name", "wrong_type", "bad_literal", "no_stage_key", "stage_not_mapping",
         "stages_not_list", "input_key", "nested_key", "out_of_range", "missing_name", "not_mapping", "empty",
         "no_download", "output_over_pixel_limit"],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, (part, message)


def test_malformed_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nstages:\n  - stage: download\n   timeout: [1,\n")
    message = config_error(path)
    assert message.startswith(f"{path}:4:4: malformed YAML"), message


def test_missing_pipeline_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


@pytest.mark.parametrize("kind", ["not_utf8", "folder"])
def test_unreadable_pipeline_file_is_one_line_error(tmp_path: Path, kind: str) -> None:
    """A non-UTF-8 file or a folder given as the pipeline is a user mistake too: one CurateError, no traceback."""
    path = tmp_path
    if kind == "not_utf8":
        path = tmp_path / "bin.yaml"
        path.write_bytes(b"name: t\xff\xfe\n")
    with pytest.raises(CurateError, match=str(path)):
        read_yaml(path)


# --- --set overrides ---


def test_parse_override_values_are_yaml() -> None:
    assert parse_override("download.timeout=3") == (["download", "timeout"], 3)
    assert parse_override("download.resize_mode=center_crop") == (["download", "resize_mode"], "center_crop")
    assert parse_override("input.caption_col=null") == (["input", "caption_col"], None)
    assert parse_override("name=a=b") == (["name"], "a=b")


def test_overrides_reach_stage_output_and_nested_keys() -> None:
    config = load_pipeline(DEMO, [
        "download.timeout=1.5", "output.samples_per_shard=40", "stages.0.retries=4",
        "download.resources.cpus=2", "stages.0.resources.gpus=0.5", "input.rows_per_chunk=7", "name=renamed",
    ])
    download = config.stages[0]
    assert download.timeout == 1.5 and download.retries == 4
    assert download.resources.cpus == 2 and download.resources.gpus == 0.5
    assert download.resources.batch_size == 64  # siblings of an overridden nested key survive
    assert config.output.samples_per_shard == 40 and config.input.rows_per_chunk == 7
    assert config.name == "renamed"


def test_override_creates_missing_section(tmp_path: Path) -> None:
    config = load_pipeline(write(tmp_path, GOOD), ["ray.num_cpus=2", "download.resources.batch_size=8"])
    assert config.ray.num_cpus == 2 and config.stages[0].resources.batch_size == 8


def test_apply_overrides_edits_plain_data() -> None:
    raw = {"name": "t", "stages": [{"stage": "download"}]}
    assert apply_overrides(raw, ["download.timeout=2"])["stages"][0]["timeout"] == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("nosuch.timeout=1", "'nosuch'"),
        ("foo", "KEY=VALUE"),
        ("=3", "KEY=VALUE"),
        ("download.=3", "KEY=VALUE"),
        ("download=3", "name a key"),
        ("stages.3.timeout=1", "no stages.3"),
        ("download.timeout.x=1", "not a section"),
    ],
)
def test_bad_overrides(override: str, expected: str) -> None:
    message = config_error(DEMO, [override])
    assert message.startswith(f"--set {override}:") and expected in message, message


def test_override_with_wrong_type_names_file_and_key() -> None:
    message = config_error(DEMO, ["download.timeout=fast"])
    assert message.startswith(str(DEMO)) and "timeout" in message and "'fast'" in message


def test_override_unknown_stage_key_gets_hint() -> None:
    assert "did you mean 'timeout'" in config_error(DEMO, ["download.timeoutt=3"])


# --- the CLI ---


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "download" in out


def test_cli_validate_bad_file_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "name: t\nstages:\n  - stage: download\n    timeoutt: 3\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curate: error: ") and "timeoutt" in err


def test_cli_subprocess_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([str(CURATE), "validate", str(DEMO)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([str(CURATE), "validate", str(DEMO), "--set", "download.timeout=fast"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("curate: error:") and "timeout" in lines[0], bad.stderr


def test_resize_mode_no_survives_yaml(tmp_path) -> None:
    """YAML 1.1 reads a bare `no` as false; `resize_mode: no` must still mean img2dataset's "no"."""
    from curate.core.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  - stage: download\n    resize_mode: no\n")
    assert load_pipeline(path, []).stages[0].resize_mode == "no"
    assert load_pipeline(path, ["download.resize_mode=no"]).stages[0].resize_mode == "no"
