"""The same pipeline on the embedded Ray: same ledger as in-process, and the promise holds."""

from __future__ import annotations

from curate.core.ledger import check_run, read_ledger, read_manifest
from curate.core.runner import run_pipeline


def test_ray_run_matches_local_run(ray_session, url_list, make_pipeline, tmp_path, fault_server):
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    run_pipeline(make_pipeline(), input_path=str(url_list), output=ray_out, progress=False)
    run_pipeline(make_pipeline(), input_path=str(url_list), output=local_out, local=True, progress=False)
    assert check_run(ray_out) == []
    ray_ledger = read_ledger(ray_out).sort_by("uid")
    local_ledger = read_ledger(local_out).sort_by("uid")
    # statuses and reasons agree row for row; shard keys may differ only if part order differs
    for column in ("uid", "url", "caption", "status", "reason"):
        assert ray_ledger.column(column).equals(local_ledger.column(column)), column
    manifest = read_manifest(ray_out)
    assert manifest.stages[0].wall_seconds > 0
    assert manifest.versions["ray"]


def test_ray_actor_pool_made_progress_with_stages_in_parallel(ray_session, url_list, make_pipeline, tmp_path,
                                                             fault_server):
    """A pool sized from the cluster must leave room for the read and part-writing tasks (no starvation)."""
    from curate.cluster.ray_env import pool_size

    config = make_pipeline("download.resources.cpus=0.5")
    assert pool_size(config.stages[0].resources) >= 1
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, progress=False)
    parts = list((out / "parts").glob("*.parquet"))
    assert len(parts) >= 2  # several batches flowed through the sink, not one
    assert check_run(out) == []


def test_a_stage_asking_for_every_cpu_still_leaves_room_to_read_and_write(ray_session, url_list, make_pipeline,
                                                                       tmp_path, fault_server):
    """cpus: 2 on a 2-CPU Ray would let one actor hold every CPU and starve the read tasks: it is clamped."""
    out = tmp_path / "run"
    run_pipeline(make_pipeline("download.resources.cpus=2", "download.resources.concurrency=null"),
                 input_path=str(url_list), output=out, progress=False)
    assert check_run(out) == []


def test_stages_in_one_worker_or_in_two_store_what_one_process_stores(ray_session, url_list, make_pipeline,
                                                                       tmp_path, fault_server):
    """download and hash with the same resources run as one segment (rows passed in memory); with different ones,
    as two actor pools with the rows in between in Ray's object store. Both store what a local run stores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core.parts import part_files
    from curate.core.runner import build_stages
    from curate.core.worker import segments
    from curate.stages.hash import HashConfig

    def with_hash(cpus: float):
        config = make_pipeline("download.resources.cpus=0.5")
        config.stages.append(HashConfig(resources={"cpus": cpus, "batch_size": 16}))
        return config

    def stored(out) -> pa.Table:
        table = pa.concat_tables([pq.read_table(p, columns=["uid", "status", "reason", "sha256", "phash"])
                                  for p in part_files(out)])
        return table.sort_by("uid")

    fused, split = with_hash(0.5), with_hash(0.25)
    assert [len(s) for s in segments(build_stages(fused)[0])] == [2]
    assert [len(s) for s in segments(build_stages(split)[0])] == [1, 1]
    run_pipeline(fused, input_path=str(url_list), output=tmp_path / "fused", progress=False)
    run_pipeline(split, input_path=str(url_list), output=tmp_path / "split", progress=False)
    run_pipeline(with_hash(0.5), input_path=str(url_list), output=tmp_path / "local", local=True, progress=False)
    for name in ("fused", "split"):
        assert check_run(tmp_path / name) == []
        assert stored(tmp_path / name).equals(stored(tmp_path / "local")), name
    assert stored(tmp_path / "local").column("phash").null_count < len(stored(tmp_path / "local"))
