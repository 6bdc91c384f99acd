"""A two-node Ray cluster on loopback with token authentication, started with `ray start` like a real one.

The head has 1 CPU; the second node has 1 CPU and a custom resource `download_node`, so a pipeline that pins its
downloads there proves work ran on both nodes. Only the processes of this cluster are stopped afterwards (never
`ray stop`, which would also take down the test session's embedded Ray).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# The GCS declares a node dead after this many failed health checks this far apart: 3 × 1 s instead of Ray's 5 × 3 s,
# so test_node_loss.py's killed raylet is noticed ~12 s sooner. A killed raylet refuses at once; a live one counts as
# failed only when it has not answered in 10 s (Ray's timeout, kept), so a loaded machine needs 30 s of silence from
# a raylet before it is wrongly declared dead.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                 "RAY_health_check_timeout_ms": "10000"}


@dataclass
class LoopbackCluster:
    dashboard: str  # the Jobs API, http://127.0.0.1:PORT
    gcs: str
    env: dict  # what a user's shell holds: the token, the venv on PATH
    temp_dir: Path

    def curate(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "curate"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=Path(__file__).resolve().parents[2])

    def processes(self):
        """This cluster's processes: those that name its temp dir, and their descendants (dashboard modules)."""
        import psutil

        mine: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.temp_dir) in part for part in proc.info["cmdline"] or []):
                    mine[proc.pid] = proc
                    mine.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.Error:
                continue
        return list(mine.values())


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _ray(env: dict, *args: str) -> None:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="package")  # one cluster for tests/cluster; test_node_loss.py (killing a node) runs last
def loopback_cluster():
    import psutil

    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs_port, dashboard_port, client_port = _free_ports(3)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               NO_ALBUMENTATIONS_UPDATE="1", **HEALTH_CHECKS)
    env.pop("RAY_ADDRESS", None)
    cluster = LoopbackCluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", env, temp_dir)
    try:
        _ray(env, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={client_port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
             "--disable-usage-stats")
        _ray(env, "start", f"--address={cluster.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             '--resources={"download_node": 1}', "--disable-usage-stats")
        yield cluster
    finally:
        for proc in cluster.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + 30
        while cluster.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = []
        for proc in cluster.processes():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except psutil.Error:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"
