"""Dedup over stored parts on the two-node cluster: its tasks run on both nodes, the driver reads no part, and the
decisions equal those made in one process."""

from __future__ import annotations

import json
import subprocess
import sys

DRIVER = r'''
import json, sys, time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.state import list_tasks

from curate.decide import run_global_stages
from curate.fan_out import in_process
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

reads = []
real_read = pq.read_table
pq.read_table = lambda *a, **k: reads.append(a) or real_read(*a, **k)
ray.init(address=gcs, log_to_driver=False)
on_cluster, _ = run_global_stages(parts, stages)
pq.read_table = real_read
job = ray.get_runtime_context().get_job_id()
nodes, seen = {}, -1
for _ in range(60):  # task events reach the state API a little after the tasks end: wait until they stop coming
    tasks = [t for t in list_tasks(filters=[("job_id", "=", job)], limit=10000, raise_on_missing_output=False,
                                   detail=True) if t.node_id]
    if len(tasks) == seen and seen > 0:
        break
    seen = len(tasks)
    nodes = {}
    for task in tasks:
        nodes.setdefault(task.name, set()).add(task.node_id)
    time.sleep(1)
print(json.dumps({"same": on_cluster == here, "driver_reads": len(reads),
                  "reasons": Counter(d[1] for d in on_cluster.values()),
                  "nodes": {name: sorted(ids) for name, ids in nodes.items()}}))
'''


def test_dedup_runs_as_tasks_on_both_nodes_and_decides_as_in_one_process(loopback_cluster, tmp_path):
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), loopback_cluster.gcs], env=loopback_cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same"] and result["driver_reads"] == 0
    assert result["reasons"]["dedup:exact"] == 80 and result["reasons"]["dedup:phash"] >= 145
    nodes = result["nodes"]
    assert len(set(nodes["_map_task"]) | set(nodes["_reduce"])) == 2  # the pool was read and paired on both nodes
