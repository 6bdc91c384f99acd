"""curate submit's checks that need no cluster: where the token comes from, what an address must look like, and
refusing before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.jobs import auth_token, dashboard_address, submit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_from_env_then_named_file_then_default_file(no_token, monkeypatch):
    with pytest.raises(CurateError, match="no Ray auth token"):
        auth_token()
    default = no_token / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-default\n")
    assert auth_token() == "from-default"
    named = no_token / "named"
    named.write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    with pytest.raises(CurateError, match="is empty"):
        auth_token()
    named.write_text("from-named")
    assert auth_token() == "from-named"
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-env ")
    assert auth_token() == "from-env"


def test_address_is_the_dashboard_url(no_token, monkeypatch):
    with pytest.raises(CurateError, match="no cluster address"):
        dashboard_address(None)
    assert dashboard_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    with pytest.raises(CurateError, match="not a ray:// client address"):
        dashboard_address("ray://127.0.0.1:10001")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a cluster node's GCS address: never the Jobs API
    with pytest.raises(CurateError, match="no cluster address"):
        dashboard_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://localhost:8265/")
    assert dashboard_address(None) == "http://localhost:8265"
    with pytest.raises(CurateError, match="clear text"):  # the token would cross the network unencrypted
        dashboard_address("http://10.1.2.3:8265")
    assert dashboard_address("http://10.1.2.3:8265", insecure_http=True) == "http://10.1.2.3:8265"
    assert dashboard_address("https://ray.example.org") == "https://ray.example.org"


def test_bad_pipelines_and_paths_are_refused_before_anything_is_sent(no_token, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(CurateError, match="unknown"):
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=["download.no_such_key=1"],
               input_path="/data/urls.parquet", output="/data/out")
    outside = tmp_path / "p.yaml"
    outside.write_text((REPO / "pipelines" / "demo.yaml").read_text())
    with pytest.raises(CurateError, match="outside the working directory"):
        submit(str(outside), address="http://127.0.0.1:9", sets=[], input_path="/u.parquet", output="/out")
    with pytest.raises(CurateError, match="holds no curate package"):
        submit(str(outside), address="http://127.0.0.1:9", sets=[], input_path="/u.parquet", output="/out",
               working_dir=str(tmp_path))
    with pytest.raises(CurateError, match="expected KEY=VALUE"):
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=[], input_path="/u.parquet", output="/out",
               env=["NOEQUALS"])
    with pytest.raises(CurateError, match="--output: not given"):
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=[], input_path="/data/urls.parquet",
               output=None)
    with pytest.raises(CurateError, match="--output ~/out: a relative or ~ path"):
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=[], input_path="s3://bucket/urls.parquet",
               output="~/out")
    with pytest.raises(CurateError, match="--output out: a relative or ~ path"):
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=[], input_path="s3://bucket/urls.parquet",
               output="out")
    with pytest.raises(CurateError, match="no Ray auth token"):  # every check passed: the token is the last gate
        submit("pipelines/demo.yaml", address="http://127.0.0.1:9", sets=[], input_path="/data/urls.parquet",
               output="/data/out")
