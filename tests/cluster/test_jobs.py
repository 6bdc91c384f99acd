"""`curate submit / jobs / logs / stop` against a two-node loopback cluster with token auth, and resuming a job
whose driver was killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.pipeline import load_pipeline
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline

SETS = ["download.timeout=1.5", "download.retries=1", "download.backoff=0.05", "output.samples_per_shard=40",
        "input.rows_per_chunk=50"]
REPO_PIPELINE = "pipelines/demo.yaml"


def _sets(*extra: str) -> list[str]:
    return [arg for item in [*SETS, *extra] for arg in ("--set", item)]


def _kept(out) -> set[str]:
    ledger = read_ledger(out)
    return set(pc.filter(ledger.column("uid"), pc.equal(ledger.column("status"), "kept")).to_pylist())


def _task_nodes(cluster, submission_id: str) -> tuple[dict[str, set[str]], str]:
    """(task name -> the node ids that ran it, the node id of the job's driver), for one job, from Ray's state API
    and the Jobs API (a client with the token, as a user's shell)."""
    script = ("import json, os, sys\nfrom ray.job_submission import JobSubmissionClient\n"
              "from ray.util.state import list_tasks\n"
              "auth = {'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']}\n"
              "info = JobSubmissionClient(sys.argv[1], headers=auth).get_job_info(sys.argv[2])\n"
              "tasks = list_tasks(address=sys.argv[1], filters=[('job_id', '=', info.job_id)], limit=10000,\n"
              "                   raise_on_missing_output=False, detail=True)\n"
              "print(json.dumps([info.driver_node_id, [[t.name, t.node_id] for t in tasks if t.node_id]]))")
    done = subprocess.run([sys.executable, "-c", script, cluster.dashboard, submission_id], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    driver, tasks = json.loads(done.stdout.strip().splitlines()[-1])
    nodes: dict[str, set[str]] = {}
    for name, node in tasks:
        nodes.setdefault(name, set()).add(node)
    return nodes, driver


def test_submit_runs_the_demo_across_both_nodes(loopback_cluster, url_list, tmp_path):
    out = tmp_path / "run"
    done = loopback_cluster.curate("submit", REPO_PIPELINE, "--address", loopback_cluster.dashboard, "--wait",
                                   "--input", str(url_list), "--output", str(out),
                                   *_sets("download.resources.custom={download_node: 1}"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert check_run(out, 120) == []
    assert read_ledger(out).num_rows == 120

    nodes, driver = _task_nodes(loopback_cluster, job_id)
    downloads = set().union(*(ids for name, ids in nodes.items() if "DownloadStageWorker" in name))
    assert len(downloads) == 1  # pinned to the node with download_node
    # Ray runs a job's driver on the head (a job without entrypoint resources): work ran on both nodes. Where the
    # unpinned tasks (reads, writes) ran is Ray's choice, so it is not asserted.
    assert driver and driver not in downloads

    listed = loopback_cluster.curate("jobs", "--address", loopback_cluster.dashboard)
    assert listed.returncode == 0 and any(job_id in line and "SUCCEEDED" in line for line in listed.stdout.splitlines())
    logs = loopback_cluster.curate("logs", job_id, "--address", loopback_cluster.dashboard)
    assert logs.returncode == 0 and "120 in ->" in logs.stdout


def test_run_joins_the_cluster_with_the_users_token(loopback_cluster, url_list, tmp_path):
    out = tmp_path / "run"
    done = loopback_cluster.curate("run", REPO_PIPELINE, "--address", loopback_cluster.gcs, "--quiet",
                                   "--input", str(url_list), "--output", str(out), *_sets())
    assert done.returncode == 0, done.stderr[-3000:]
    assert check_run(out, 120) == []

    no_token = {k: v for k, v in loopback_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(tmp_path)
    refused = loopback_cluster.curate("run", REPO_PIPELINE, "--address", loopback_cluster.gcs,
                                      "--input", str(url_list), "--output", str(tmp_path / "other"), env=no_token)
    assert refused.returncode == 2 and "no Ray auth token" in refused.stderr
    client = loopback_cluster.curate("run", REPO_PIPELINE, "--address", "ray://127.0.0.1:10001",
                                     "--input", str(url_list), "--output", str(tmp_path / "client"))
    assert client.returncode == 2 and "curate submit" in client.stderr
    assert not (tmp_path / "other" / "manifest.json").exists() and not (tmp_path / "client").exists()


def test_missing_or_wrong_token_is_one_clear_line(loopback_cluster, tmp_path):
    no_token = {k: v for k, v in loopback_cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    missing = loopback_cluster.curate("jobs", "--address", loopback_cluster.dashboard, env=no_token)
    assert missing.returncode == 2 and "no Ray auth token" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    wrong = loopback_cluster.curate("submit", REPO_PIPELINE, "--address", loopback_cluster.dashboard,
                                    "--input", str(tmp_path / "urls.parquet"), "--output", str(tmp_path / "out"),
                                    env={**loopback_cluster.env, "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode == 2 and "refused the auth token" in wrong.stderr
    assert wrong.stdout == ""  # nothing was submitted

    token_file = tmp_path / "token"
    token_file.write_text(loopback_cluster.env["RAY_AUTH_TOKEN"] + "\n")
    from_file = loopback_cluster.curate("jobs", "--address", loopback_cluster.dashboard,
                                        env={**no_token, "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert from_file.returncode == 0, from_file.stderr


def _driver(out):
    """The job's driver: the `curate.cli run` process writing to ``out``."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "curate.cli" in cmdline and "run" in cmdline and str(out) in cmdline:
            return proc
    return None


def test_a_killed_driver_resumes_on_resubmit_and_redoes_only_unfinished_rows(loopback_cluster, url_list,
                                                                             fault_server, tmp_path):
    out = tmp_path / "run"
    slow = _sets("download.per_host_rate=4")  # ~30 s for 120 rows: the driver is killed mid-run
    args = [REPO_PIPELINE, "--address", loopback_cluster.dashboard, "--input", str(url_list), "--output", str(out),
            *slow]
    submitted = loopback_cluster.curate("submit", *args)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    driver = _driver(out)
    assert driver is not None, "no driver process found for the job"
    driver.send_signal(signal.SIGKILL)
    followed = loopback_cluster.curate("logs", job_id, "--follow", "--address", loopback_cluster.dashboard)
    assert followed.returncode != 0 and "FAILED" in followed.stderr  # it did not finish
    stopped = loopback_cluster.curate("stop", job_id, "--address", loopback_cluster.dashboard)
    assert stopped.returncode == 0 and "already finished" in stopped.stdout
    assert not (out / "manifest.json").exists()
    stored = set(pq.read_table(out / "parts", columns=["url"]).column("url").to_pylist())
    assert 0 < len(stored) < 120

    fault_server.reset_counts()
    resumed = loopback_cluster.curate("submit", *args, "--wait")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert check_run(out, 120) == []
    fetched_again = {url for url in stored if fault_server.requests.get("/" + url.split("/", 3)[3].split("?")[0])}
    assert not fetched_again

    reference = tmp_path / "uninterrupted"
    run_pipeline(load_pipeline(REPO_PIPELINE, SETS), input_path=str(url_list), output=reference, local=True,
                 progress=False)
    assert _kept(out) == _kept(reference)
