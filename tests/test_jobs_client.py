"""curate submit's checks that need no cluster: where the token comes from, what an address must look like,
refusing before anything is sent, and what goes over the wire (against a loopback stand-in for the Jobs API): the
token never through a proxy in clear text, an upload of the allow-list only."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.cluster.jobs import auth_token, dashboard_address, list_jobs, stop_job, submit

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


class _Recorder(ThreadingHTTPServer):
    """A loopback HTTP server that records every request (method, path, headers, body) and answers with ``answer``."""

    daemon_threads = True

    def __init__(self, answer):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.answer = answer
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = recorder.answer(self.command, self.path)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _jobs_api(method: str, path: str):
    """A stand-in for the Ray Jobs API: enough of it for submit, jobs and stop."""
    if path == "/api/version":
        return 200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}
    if path.startswith("/api/packages/"):
        return (404, {}) if method == "GET" else (200, {})
    if path == "/api/jobs/" and method == "POST":
        return 200, {"submission_id": "raysubmit_standin", "job_id": None}
    if path == "/api/jobs/":
        return 200, []
    if path.endswith("/stop"):
        return 200, {"stopped": True}
    return 404, {}


@pytest.fixture
def jobs_api():
    server = _Recorder(_jobs_api)
    yield server
    server.shutdown()
    server.server_close()


def _uploaded(server) -> set[str]:
    """The file names in the working-dir package the stand-in Jobs API received."""
    bodies = [body for method, path, _, body in server.requests if method == "PUT" and "/api/packages/" in path]
    assert len(bodies) == 1, [r[:2] for r in server.requests]
    with zipfile.ZipFile(io.BytesIO(bodies[0])) as package:
        return {name for name in package.namelist() if not name.endswith("/")}


def test_the_token_never_goes_through_a_proxy_in_clear_text(no_token, tmp_path, monkeypatch, jobs_api):
    proxy = _Recorder(lambda method, path: (502, {"error": "stand-in proxy"}))
    try:
        token = "s3cr3t-" + "ab" * 16
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        for key in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(key, raising=False)
        for key in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(key, proxy.url)
        monkeypatch.chdir(REPO)
        out = io.StringIO()
        try:
            submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
                   output="/data/out", out=out)
            list_jobs(jobs_api.url, out=io.StringIO())
            stop_job(jobs_api.url, "raysubmit_standin", out=io.StringIO())
        finally:
            carried = [(method, path) for method, path, headers, _ in proxy.requests
                       if token in " ".join(headers.values())]
            assert not carried, f"the stand-in proxy received the token in {len(carried)} request(s): {carried[:3]}"
        assert out.getvalue().strip() == "raysubmit_standin"
        authorised = [h.get("Authorization") for _, _, h, _ in jobs_api.requests]
        assert authorised and set(authorised) == {f"Bearer {token}"}  # every request went straight to the API
        assert {(m, p) for m, p, _, _ in jobs_api.requests} >= {("POST", "/api/jobs/"), ("GET", "/api/jobs/")}
    finally:
        proxy.shutdown()
        proxy.server_close()


def _checkout_with_secrets(tmp_path) -> tuple[Path, Path]:
    """A working directory that is a curate checkout plus what a user's home or checkout often holds: credentials,
    keys, a kubeconfig, a token, a symlink to ~/.ssh; and a home outside it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (home / "token").write_text("cluster-token")
    root = tmp_path / "checkout"
    files = {
        "curate/__init__.py": "", "curate/cli.py": "# cli", "curate/stages/download/stage.py": "# download",
        "curate/models/configs/curate-tiny.json": "{}", "curate/__pycache__/cli.cpython-311.pyc": "pyc",
        "curate/notes.txt": "not code", "pipelines/demo.yaml": (REPO / "pipelines" / "demo.yaml").read_text(),
        "pyproject.toml": "[project]\nname = 'curate'\n", "README.md": "readme",
        ".netrc": "machine example.org password hunter2", ".aws/credentials": "[default]\naws_secret_access_key=x",
        "kubeconfig": "apiVersion: v1", "id_rsa": "PRIVATE KEY", ".env": "HF_TOKEN=hf_x", "auth_token": "tok",
        ".git/config": "[core]", "data/urls.parquet": "PAR1", "extra/concepts.txt": "cat\ndog\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "ssh").symlink_to(home / ".ssh")  # outside every allow-listed folder: simply not uploaded
    (root / "pipelines" / "alias.yaml").symlink_to(root / "pipelines" / "demo.yaml")  # stays inside: uploaded
    (root / "curate" / "stages" / "up").symlink_to(root / "curate")  # a loop inside the checkout: walked once
    return root, home


def test_submit_uploads_only_the_allow_list_and_says_what(no_token, tmp_path, monkeypatch, capsys, jobs_api):
    root, _ = _checkout_with_secrets(tmp_path)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    monkeypatch.chdir(root)
    assert submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
                  output="/data/out", out=io.StringIO()) == 0
    assert _uploaded(jobs_api) == {"curate/__init__.py", "curate/cli.py", "curate/stages/download/stage.py",
                                   "curate/models/configs/curate-tiny.json", "pipelines/demo.yaml",
                                   "pipelines/alias.yaml", "pyproject.toml"}
    said = capsys.readouterr().err
    assert "7 files" in said and "KiB" in said and str(root) in said, said


def test_include_adds_files_inside_the_working_dir_only(no_token, tmp_path, monkeypatch, jobs_api):
    root, _ = _checkout_with_secrets(tmp_path)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    monkeypatch.chdir(root)
    with pytest.raises(CurateError, match="--include ../home/token: lies outside the working directory"):
        submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
               output="/data/out", include=["../home/token"])
    with pytest.raises(CurateError, match="ssh/id_ed25519: reached through a symlink, it is .*/home/.ssh/id_ed25519"):
        submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
               output="/data/out", include=["ssh/id_ed25519"])
    with pytest.raises(CurateError, match="--include extra/missing.txt: no such file or folder"):
        submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
               output="/data/out", include=["extra/missing.txt"])
    assert jobs_api.requests == []
    submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
           output="/data/out", include=["extra"], out=io.StringIO())
    assert "extra/concepts.txt" in _uploaded(jobs_api)


@pytest.mark.parametrize("link, target", [("curate/leak.py", "home/token"), ("pipelines/keys", "home/.ssh"),
                                          ("pipelines/up", ".")])
def test_submit_refuses_a_symlink_that_leaves_the_working_dir(no_token, tmp_path, monkeypatch, jobs_api, link,
                                                              target):
    root, _ = _checkout_with_secrets(tmp_path)
    (root / link).symlink_to(tmp_path / target)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    monkeypatch.chdir(root)
    with pytest.raises(CurateError, match=f"{link}: a symlink to {tmp_path / target}, outside the working dir"):
        submit("pipelines/demo.yaml", address=jobs_api.url, sets=[], input_path="/data/urls.parquet",
               output="/data/out")
    assert jobs_api.requests == []  # refused before anything was sent
