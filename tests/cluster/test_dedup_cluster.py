"""Dedup over stored parts on the two-node cluster: its tasks run on whichever node has the CPU (each node in turn),
the driver reads no part, and the decisions equal those made in one process."""

from __future__ import annotations

import json
import subprocess
import sys

DRIVER = r'''
import json, sys, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.util.scheduling_strategies as strategies
from ray.util.state import list_tasks

from curate.core.decide import run_global_stages
from curate.core.fan_out import in_process
from curate.stages.dedup_exact import DedupExact, DedupExactConfig
from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig

folder, gcs = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(3)
n, per_part = 8000, 1000
codes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
codes[n - 150:] = codes[:150] ^ (1 << rng.integers(0, 63, size=150))  # one bit away, in another part
digests = [f"{i}" for i in range(n)]
digests[1000:1080] = digests[2000:2080]  # exact copies across parts
parts = []
for start in range(0, n, per_part):
    rows = np.arange(start, start + per_part)
    parts.append(folder / f"{start:06d}.parquet")
    pq.write_table(pa.table({"uid": [f"u{i:05d}" for i in rows], "row": pa.array(rows), "status": ["ok"] * per_part,
                             "sha256": [digests[i] for i in rows], "phash": pa.array(codes[rows]),
                             "color_signature": [bytes(48)] * per_part,
                             "clip_score": pa.array(1 - rows / n, pa.float32())}), parts[-1])
stages = [DedupExact(DedupExactConfig(pixels=False)), DedupPhash(DedupPhashConfig())]
with in_process():
    here, _ = run_global_stages(parts, stages)

@ray.remote(num_cpus=1)
class Hold:
    """Holds its node's one CPU, so every dedup task (1 CPU each) must run on the other node."""

    def ready(self):
        return True


def settled_tasks(before):
    """task id -> (name, node id) of this job's tasks. Task events reach the state API a little after the tasks
    end: read until the run's last tasks (its reduces) are there and two more reads bring nothing new."""
    tasks, seen, steady = {}, -1, 0
    for _ in range(90):
        tasks = {t.task_id: (t.name, t.node_id) for t in list_tasks(
            filters=[("job_id", "=", job)], limit=10000, raise_on_missing_output=False, detail=True) if t.node_id}
        steady = steady + 1 if len(tasks) == seen else 0
        seen = len(tasks)
        if steady >= 2 and any(name == "_reduce" for task, (name, _) in tasks.items() if task not in before):
            break
        time.sleep(1)
    return tasks


ray.init(address=gcs, log_to_driver=False)
job = ray.get_runtime_context().get_job_id()
nodes = {("download" if "download_node" in n["Resources"] else "head"): n["NodeID"] for n in ray.nodes() if n["Alive"]}
runs, before = {}, {}
for held, free in (("head", "download"), ("download", "head")):
    hold = Hold.options(scheduling_strategy=strategies.NodeAffinitySchedulingStrategy(nodes[held], soft=False)).remote()
    ray.get(hold.ready.remote())
    reads = []
    real_read = pq.read_table
    pq.read_table = lambda *a, **k: reads.append(a) or real_read(*a, **k)
    on_cluster, _ = run_global_stages(parts, stages)
    pq.read_table = real_read
    ray.kill(hold)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    tasks = settled_tasks(before)
    ran = [(name, node) for task, (name, node) in tasks.items() if task not in before and not name.startswith("Hold")]
    before = tasks
    runs[free] = {"same": on_cluster == here, "driver_reads": len(reads),
                  "reasons": on_cluster.count_by("reason"),
                  "nodes": sorted({node for _, node in ran}), "names": sorted({name for name, _ in ran})}
print(json.dumps({"nodes": nodes, "runs": runs}))
'''


def test_dedup_runs_as_tasks_on_either_node_and_decides_as_in_one_process(loopback_cluster, tmp_path):
    """Run once with the head's CPU held (every task must go to the other node), once with the other node's held:
    where the tasks run is then up to the resources, not to Ray's choice, and each run decides as one process does."""
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), loopback_cluster.gcs], env=loopback_cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for free, run in result["runs"].items():
        assert run["same"] and run["driver_reads"] == 0, free
        assert run["reasons"]["dedup:exact"] == 80 and run["reasons"]["dedup:phash"] >= 145, free
        assert {"_map_task", "_reduce"} <= set(run["names"]), run["names"]  # read and paired as tasks
        assert run["nodes"] == [result["nodes"][free]], free  # all of them on the node with a free CPU
