"""The GPU suite's dry run: every script it calls runs end to end on CPU with tiny models, and the table it prints
is filled, so that the first session lent a GPU gets every figure from one command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_suite_runs_dry_on_cpu_and_fills_its_table():
    env = {**os.environ, "CURATE_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("figure"):]
    rows = [line for line in table.splitlines()[2:] if line.strip() and not line.startswith("(")]
    assert len(rows) == 6, table  # scoring end to end, forward, utilisation; train rate, data wait; captions
    assert not [row for row in rows if "missing" in row and "utilisation" not in row], table  # no nvidia-smi on CPU
    assert "curate-tiny scoring, end to end, pairs/s" in table and "BLIP-tiny captions/s" in table
