"""Pipelines as Ray jobs: submit, list, follow, stop, through the Ray Jobs API with the user's auth token.

An open Jobs API runs any command it is sent (ShadowRay, CVE-2023-48022), so every request carries the cluster's
token and nothing here works without one. The token comes from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
names, or Ray's default file ``~/.ray/auth_token`` (``ray get-auth-token`` on the head prints it), never from the
pipeline file.

A submitted job runs ``python -m curate.cli run PIPELINE --address auto`` on the head node, with an allow-list of
the working directory (curate's code and package data, ``pipelines/``, ``pyproject.toml``, the pipeline named, and
what ``--include`` names) uploaded as the job's runtime env; workers on every node import the same code. Nothing
else of the checkout travels (keys, tokens, kubeconfigs, outputs), and a symlink that leaves it is refused. Inputs
and outputs must be paths every node sees (a shared filesystem or an fsspec URL such as s3://), since the job reads
and writes them from the cluster.

Plain-http requests to the dashboard never go through a proxy (``HTTP_PROXY``, ``ALL_PROXY``): the proxy would read
the token in clear text. https ones still may: a proxy tunnels them encrypted.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from curate.errors import CurateError

# Environment passed on to the job when set here (offline hubs, quiet imports); credentials are not: workers get
# theirs from the node (instance role, mounted secret), so they never travel with the job or the pipeline.
PASSED_ENV = ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "RAY_USAGE_STATS_ENABLED")
# What a job gets of the working directory: these folders' files with these endings (curate's code and package
# data, the pipelines) and these files; the pipeline named and --include add to it. An allow-list, since a checkout
# or a home folder holds keys, tokens and kubeconfigs that a deny-list misses.
UPLOAD_FOLDERS = {"curate": (".py", ".json"), "pipelines": (".yaml", ".yml")}
UPLOAD_FILES = ("pyproject.toml",)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_token() -> str:
    """The cluster's token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
        raise CurateError(f"Ray auth token file {path} is empty")
    raise CurateError(
        "no Ray auth token: set RAY_AUTH_TOKEN, or put the cluster's token in ~/.ray/auth_token "
        "(`ray get-auth-token` on the head node prints it); curate never talks to a Ray cluster without one"
    )


def dashboard_address(address: str | None, insecure_http: bool = False) -> str:
    """The Jobs API's URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL (on a
    cluster node it is the GCS's HOST:6379, which must never receive the token)."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else ""))
    if not address:
        raise CurateError("no cluster address: pass --address http://HEAD:8265 (through an SSH tunnel or "
                          "port-forward; see cluster/README.md) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CurateError(f"--address {address}: expected the dashboard's http(s)://HOST:PORT (the Jobs API), "
                          "not a ray:// client address")
    if parts.scheme == "http" and not _is_loopback(parts.hostname) and not insecure_http:
        raise CurateError(f"--address {address}: the auth token would cross the network in clear text; reach the "
                          "dashboard through an SSH tunnel or kubectl port-forward (http://127.0.0.1:8265), use "
                          "https, or pass --insecure-http inside a private network")
    return address.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def job_client(address: str | None, insecure_http: bool = False):
    """(a JobSubmissionClient that sends the token, its URL); a missing or refused token is one clear line."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address, insecure_http)
    headers = {"Authorization": f"Bearer {auth_token()}"}
    client_class = _direct_client(JobSubmissionClient) if url.startswith("http://") else JobSubmissionClient
    try:
        return client_class(url, headers=headers), url
    except Exception as err:  # AuthenticationError, ConnectionError, and what the SDK wraps them in
        raise CurateError(_explain(url, err)) from None


def _direct_client(base: type) -> type:
    """Ray's client with every request sent straight to the dashboard. Its requests honour HTTP_PROXY and ALL_PROXY
    even for loopback, so a plain-http request would reach the proxy, token and all, in clear text. (Its log stream,
    aiohttp, reads no proxy variables.)"""

    class DirectJobSubmissionClient(base):
        def _do_request(self, method, endpoint, **kwargs):
            # None for every scheme a proxy variable names: requests drops those, so no proxy is used at all
            kwargs.setdefault("proxies", dict.fromkeys({"http", "https", "all", *urllib.request.getproxies()}))
            return super()._do_request(method, endpoint, **kwargs)

    return DirectJobSubmissionClient


def _explain(url: str, err: Exception) -> str:
    text = str(err)
    if "Forbidden" in text or "invalid or incorrect" in text:
        return (f"{url}: the cluster refused the auth token (HTTP 403); check RAY_AUTH_TOKEN against "
                "`ray get-auth-token` on the head")
    if "Unauthorized" in text or "Authentication required" in text:
        return f"{url}: the cluster asked for an auth token and got none it accepts (HTTP 401)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if "does not exist" in text or "not found" in text.lower():
        return f"{url}: {first}"
    return f"{url}: cannot reach the Ray Jobs API ({first})"


def _call(url: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CurateError:
        raise
    except Exception as err:
        raise CurateError(_explain(url, err)) from None


def submit(pipeline: str, *, address: str | None, sets: list[str], input_path: str | None, output: str | None,
           working_dir: str = ".", pip: list[str] | None = None, env: list[str] | None = None,
           include: list[str] | None = None, wait: bool = False, insecure_http: bool = False,
           out=sys.stdout) -> int:
    """Submit PIPELINE as a Ray job; print its id; with ``wait``, stream its logs and return its exit status."""
    from curate.core.pipeline import load_pipeline

    config = load_pipeline(pipeline, sets)  # a bad pipeline is refused here, not minutes later on the cluster
    for flag, value in (("--input", input_path or config.input.path), ("--output", output or config.output.path)):
        if not value:
            raise CurateError(f"{flag}: not given here or in {pipeline}; the job needs one every node can reach")
        if "://" not in value and (value.startswith("~") or not Path(value).is_absolute()):
            raise CurateError(f"{flag} {value}: a relative or ~ path would point into the job's temporary "
                              "directory or a node's home; give an absolute path on a filesystem every node mounts, "
                              "or a URL (s3://, gs://)")
    root = Path(working_dir).resolve()
    if not (root / "curate" / "__init__.py").is_file() and not pip:
        raise CurateError(f"--working-dir {root}: holds no curate package; run from a curate checkout, or pass "
                          "--pip with the packages the cluster should install")
    path = Path(pipeline).resolve()
    if not path.is_relative_to(root):
        raise CurateError(f"{pipeline}: lies outside the working directory {root}, which is what the job gets; "
                          "move it there or pass --working-dir")
    command = ["python", "-m", "curate.cli", "run", path.relative_to(root).as_posix(), "--address", "auto"]
    for flag, value in (("--input", input_path), ("--output", output)):
        if value:
            command += [flag, value]
    for item in sets:
        command += ["--set", item]
    env_vars = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CurateError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    files = upload_files(root, path, include or [])  # a symlink out of the checkout is refused before any request
    client, url = job_client(address, insecure_http)
    size = sum(file.stat().st_size for file in files.values())
    print(f"curate: uploading {len(files)} files ({size / 1024:.1f} KiB) from {root} as the job's working "
          f"directory: {_upload_summary(files)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="curate-upload-") as scratch:
        package = Path(scratch) / "working_dir.zip"
        _write_package(files, package)
        runtime_env: dict = {"working_dir": str(package), "env_vars": env_vars}
        if pip:
            runtime_env["pip"] = list(pip)
        job_id = _submit_when_ready(url, client, entrypoint=shlex.join(command), runtime_env=runtime_env,
                                    metadata={"curate_pipeline": path.name})
    print(job_id, file=out, flush=True)
    if not wait:
        return 0
    return follow(client, url, job_id, out=out)


def upload_files(root: Path, pipeline: Path, include: list[str]) -> dict[str, Path]:
    """What the job gets of ``root``: name in the package -> the file whose bytes it holds. Hidden files and
    __pycache__ are left out of folders; a symlink is followed only while it stays inside ``root``."""
    files: dict[str, Path] = {}
    for folder, endings in UPLOAD_FOLDERS.items():
        _collect(root, root / folder, endings, files)
    for name in (*UPLOAD_FILES, pipeline.relative_to(root).as_posix()):
        _collect(root, root / name, None, files)
    for item in include:
        given = Path(os.path.abspath(item))  # not resolved: a symlink on the way is named when refused
        if not given.is_relative_to(root):
            raise CurateError(f"--include {item}: lies outside the working directory {root}, which is what the job "
                              "gets; copy it there or put it on a filesystem every node mounts")
        if not given.exists():
            raise CurateError(f"--include {item}: no such file or folder")
        _collect(root, given, None, files)
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_file:
        files = {name: file for name, file in files.items() if file.resolve() != Path(token_file).resolve()}
    return files


def _collect(root: Path, path: Path, endings: tuple[str, ...] | None, files: dict[str, Path],
             ancestors: frozenset[Path] = frozenset()) -> None:
    name = path.relative_to(root).as_posix()
    real = path.resolve()
    if not real.is_relative_to(root):
        how = "a symlink to" if path.is_symlink() else "reached through a symlink, it is"
        raise CurateError(f"{name}: {how} {real}, outside the working directory {root}; curate submit uploads "
                          "nothing from outside it: remove the link or copy in what the job needs")
    if path.is_dir():
        if real in ancestors:  # a link back up the tree: its files are uploaded once, under their first name
            return
        for child in sorted(path.iterdir()):
            if not child.name.startswith(".") and child.name != "__pycache__":
                _collect(root, child, endings, files, ancestors | {real})
    elif path.is_file() and (endings is None or path.suffix in endings):
        files[name] = path


def _upload_summary(files: dict[str, Path]) -> str:
    counts: dict[str, int] = {}
    for name in files:
        top = name.split("/", 1)[0] + ("/" if "/" in name else "")
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({count})" if top.endswith("/") else top for top, count in sorted(counts.items()))


def _write_package(files: dict[str, Path], package: Path) -> None:
    """The working directory as Ray's runtime env takes it: a zip, entries relative to the root. Fixed timestamps
    and order, so the same files make the same package and Ray skips uploading it again."""
    with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name].read_bytes())


def _submit_when_ready(url: str, client, ready_seconds: float = 60.0, **job) -> str:
    """Submit; a head that has just started answers "no available agent" until its job agent is up: wait for it."""
    deadline = time.monotonic() + ready_seconds
    while True:
        try:
            return client.submit_job(**job)
        except Exception as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise CurateError(_explain(url, err)) from None
            time.sleep(1.0)


def follow(client, url: str, job_id: str, out=sys.stdout) -> int:
    """Stream the job's log until the job ends (Ray's log websocket, so a long job's log is sent once, not on every
    poll); its driver's exit status (1 if it failed without one)."""
    import asyncio

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    _call(url, client.get_job_status, job_id)  # an unknown job is one clear line, before the stream opens
    _call(url, asyncio.run, stream())
    deadline = time.monotonic() + 120  # the stream closes as the driver exits; the status follows shortly
    while (status := str(_call(url, client.get_job_status, job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            raise CurateError(f"job {job_id}: its log stream ended but the job is still {status}; "
                              f"follow it again with curate logs {job_id} --follow")
        time.sleep(0.5)
    info = _call(url, client.get_job_info, job_id)
    print(f"curate: job {job_id} {status}" + (f": {info.message}" if info.message and status != "SUCCEEDED" else ""),
          file=sys.stderr)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def list_jobs(address: str | None, out=sys.stdout, insecure_http: bool = False) -> int:
    client, url = job_client(address, insecure_http)
    jobs = sorted(_call(url, client.list_jobs), key=lambda j: j.start_time or 0)
    print(f"{'job':<28}{'status':<11}{'started (UTC)':<21}entrypoint", file=out)
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)) if job.start_time else "-"
        print(f"{job.submission_id or job.job_id or '-':<28}{str(job.status.value):<11}{started:<21}"
              f"{job.entrypoint[:100]}", file=out)
    return 0


def job_logs(address: str | None, job_id: str, follow_logs: bool = False, out=sys.stdout,
             insecure_http: bool = False) -> int:
    client, url = job_client(address, insecure_http)
    if follow_logs:
        return follow(client, url, job_id, out=out)
    out.write(_call(url, client.get_job_logs, job_id))
    return 0


def stop_job(address: str | None, job_id: str, out=sys.stdout, insecure_http: bool = False) -> int:
    client, url = job_client(address, insecure_http)
    stopped = _call(url, client.stop_job, job_id)
    print(f"{job_id}: {'stopping' if stopped else 'already finished'}", file=out)
    return 0
