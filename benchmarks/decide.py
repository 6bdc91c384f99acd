"""Benchmark: what the decide phase costs the driver, on a synthetic stored run.

A run's stored parts are generated (not timed): uids, 64-bit pHashes with 10% near copies, sha256 and pixel digests
with 5% exact copies, CLIP scores and 64-d float16 image embeddings with 5% near-identical vectors, in parts of
``--part-rows`` rows. The global stages a LAION-style pipeline runs (dedup_exact, dedup_phash on whole-image hashes,
dedup_semantic, alignment top 70%) then decide over them through ``run_global_stages``, the code a pipeline runs.

Each mode runs in its own subprocess, so its peak memory is its own:
- ``in_process``: every read happens in this process, so the script counts them: reads of each part's columns
  (``pq.read_table``) per part is the number of passes the decide phase makes over the stored parts;
- ``ray``: the tiers as tasks on an embedded Ray; the figure is the driver's own peak RSS (tasks run in workers).

Prints rows, seconds, the driver's peak RSS, and passes over the parts (in_process) per size. Figures only.

``--from-run OUT --pipeline P`` decides a finished run's stored parts (the demo's, say) with P's global stages
instead. ``--reference TREE`` runs the same measurement with the curate of another checkout too (a git worktree of
an earlier commit, in the layout before or after the folders moved) and prints the ratios against it.

    .venv/bin/python benchmarks/decide.py                      # 10k and 100k rows, both modes
    .venv/bin/python benchmarks/decide.py --sizes 100000 --modes ray
    git worktree add /tmp/before 20955b2 && .venv/bin/python benchmarks/decide.py --reference /tmp/before
    .venv/bin/python benchmarks/decide.py --from-run curate-demo/run --pipeline pipelines/demo_curate.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: a --reference run imports the other checkout's curate


def _module(new: str, old: str):
    """A module of the curate on the path: ``new`` in the layout with curate/core/, else ``old`` (before the
    folders moved). Chosen by layout, not by trying: the editable install would serve the new names from this
    checkout to a reference run."""
    import importlib

    import curate

    return importlib.import_module(new if (Path(curate.__file__).parent / "core").is_dir() else old)


def write_run(folder: Path, n: int, part_rows: int, dim: int = 512, seed: int = 0) -> list[Path]:
    """A stored run of ``n`` rows, written part by part (memory: the pool's codes and digests, one part's rows):
    64-bit pHashes with 10% near copies and digests with 5% exact copies across the pool; captions of 1-40 words;
    CLIP scores; ``dim``-d float16 image embeddings, 5% of them near-identical to another row's of the same part; a
    one-byte image per row so that the real sinks write real shards."""
    import numpy as np
    import pyarrow as pa

    from benchmarks.dedup import planted_codes

    part_files, write_part = (getattr(_module("curate.core.parts", "curate.parts"), name)
                              for name in ("part_files", "write_part"))
    done = folder / "stored.json"
    if done.exists() and json.loads(done.read_text()) == {"rows": n, "part_rows": part_rows, "dim": dim}:
        return part_files(folder)
    rng = np.random.default_rng(seed)
    codes = planted_codes(n, seed)
    digests = rng.integers(0, 2**62, size=n)
    copies = rng.choice(n, size=n // 20, replace=False)
    digests[copies] = digests[rng.integers(0, n, size=len(copies))]
    words = np.array("a photo of the red dog cat house tree car on in with small large blue green old new".split())
    for start in range(0, n, part_rows):
        rows = np.arange(start, min(n, start + part_rows))
        k = len(rows)
        vectors = rng.standard_normal((k, dim)).astype(np.float32)
        near = rng.choice(k, size=k // 20, replace=False)
        vectors[near] = vectors[rng.integers(0, k, size=len(near))] + 0.01 * rng.standard_normal((len(near), dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
        lengths = rng.integers(1, 41, size=k)
        captions = [" ".join(words[rng.integers(0, len(words), size=m)]) for m in lengths]
        embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, k * dim + 1, dim, dtype=np.int32)),
                                             pa.array(vectors.reshape(-1)))
        write_part(pa.table({
            "uid": [f"{i:032x}" for i in rows], "row": pa.array(rows, pa.int64()),
            "status": ["ok"] * k, "reason": pa.nulls(k, pa.string()), "decided_by": pa.nulls(k, pa.string()),
            "caption": captions, "image": [b"\xff"] * k, "image_ext": ["jpg"] * k,
            "phash": pa.array(codes[rows]), "color_signature": [bytes(48)] * k, "sha256": [f"{d:064x}" for d in digests[rows]],
            "pixel_sha256": [f"{d:064x}" for d in digests[rows]],
            "original_width": pa.array(rng.integers(64, 1024, k), pa.int32()),
            "original_height": pa.array(rng.integers(64, 1024, k), pa.int32()),
            "clip_score": pa.array(rng.random(k).astype(np.float32)), "clip_model": ["bench-model"] * k,
            "image_embedding": embedding,
        }), str(folder / "parts"))
    done.write_text(json.dumps({"rows": n, "part_rows": part_rows, "dim": dim}))
    return part_files(folder)


def synthetic_stages() -> list:
    from curate.stages.alignment import AlignmentConfig, AlignmentFilter
    from curate.stages.dedup_exact import DedupExact, DedupExactConfig
    from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig
    from curate.stages.dedup_semantic import DedupSemantic, DedupSemanticConfig
    from curate.stages.rules import RuleFilter, RulesConfig

    return [DedupExact(DedupExactConfig()), DedupPhash(DedupPhashConfig(content=False)),
            DedupSemantic(DedupSemanticConfig(threshold=0.99)), RuleFilter(RulesConfig(min_words=2, max_words=35, junk_captions=True)),
            AlignmentFilter(AlignmentConfig(keep_top=0.7))]


def pipeline_stages(pipeline: str) -> tuple[list, list]:
    """The pipeline's per-sample and global stages, built by this curate."""
    load_pipeline = _module("curate.core.pipeline", "curate.config").load_pipeline
    build_stages = _module("curate.core.runner", "curate.runner").build_stages
    return build_stages(load_pipeline(pipeline))


def stored_run(store: Path, n: int, part_rows: int, dim: int) -> Path:
    return store / f"rows-{n}-parts-{part_rows}-dim-{dim}"


def decide(n: int, mode: str, args: argparse.Namespace) -> dict:
    """One measurement: the global stages over the stored parts (each stage timed, its part reads counted when in
    process), then, with ``--write``, the pass that publishes (ledger, embeddings, shards) as a run makes it."""
    import pyarrow.parquet as pq

    decide_module = _module("curate.core.decide", "curate.decide")
    in_process = _module("curate.core.fan_out", "curate.fan_out").in_process
    part_files = _module("curate.core.parts", "curate.parts").part_files

    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        if args.from_run:
            parts = part_files(Path(args.from_run))
            per_sample, stages = pipeline_stages(args.pipeline)
            n = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        else:
            parts = part_files(stored_run(Path(args.store), n, args.part_rows, args.dim))
            per_sample, stages = [], synthetic_stages()
        reads: Counter[str] = Counter()
        embedding_reads: Counter[str] = Counter()
        real_read = pq.read_table

        def counted(source, *args, **kwargs):
            reads[str(source)] += 1
            embedding_reads[str(source)] += "image_embedding" in (kwargs.get("columns") or [])
            return real_read(source, *args, **kwargs)

        by_stage: Counter[str] = Counter()
        stage_seconds: Counter[str] = Counter()
        rss = RssByPhase()
        for stage in stages:  # each stage's reads, for the passes it makes, its time and the driver's RSS meanwhile
            def counted_stage(pool, decide_pool=stage.decide_pool, name=stage.name):
                start_reads, start = sum(reads.values()), time.perf_counter()
                rss.phase = name
                result = decide_pool(pool)
                rss.phase = "between stages"
                by_stage[name] += sum(reads.values()) - start_reads
                stage_seconds[name] += time.perf_counter() - start
                return result
            stage.decide_pool = counted_stage
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if mode == "ray":
            from curate.config import RayConfig

            _module("curate.cluster.ray_env", "curate.ray_env").ensure_ray(RayConfig())
            start = time.perf_counter()
            decisions, _ = decide_module.run_global_stages(parts, stages, per_sample)
        else:
            pq.read_table = counted
            start = time.perf_counter()
            with in_process():
                decisions, _ = decide_module.run_global_stages(parts, stages, per_sample)
            pq.read_table = real_read
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_seconds = write_peak = None
        if args.write:
            rss.phase = "publish"
            write_seconds, write_peak = publish(Path(tmp) / "out", parts, decisions, stages, mode == "ray")
        rss.stop()
        passes = sum(reads[str(p)] for p in parts) / len(parts) if mode != "ray" else None
        import curate

        removed_by = (decisions.count_by("decided_by") if hasattr(decisions, "count_by")  # a reference tree's: a dict
                      else Counter(d[2] for d in decisions.values()))
        return {"rows": n, "mode": mode, "parts": len(parts), "seconds": round(seconds, 2),
                "curate": str(Path(curate.__file__).parents[1]),
                "driver_peak_rss_mib": round(peak, 1), "rss_before_decide_mib": round(before, 1),
                "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
                "rss_mib_by_phase": {k: round(v) for k, v in rss.peaks.items()},
                "write_seconds": write_seconds, "write_peak_rss_mib": write_peak,
                "passes_over_parts": passes, "removed": len(decisions),
                "embedding_passes": sum(embedding_reads.values()) / len(parts) if mode != "ray" else None,
                "passes_by_stage": {k: v / len(parts) for k, v in by_stage.items()} if mode != "ray" else None,
                "removed_by": dict(removed_by)}


class RssByPhase:
    """The driver's RSS sampled every 0.1 s by a thread, its highest value kept per phase (the stage deciding, or
    the publishing pass): which part of the decide phase holds the memory."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.phase, self.peaks = "before", {}
        self._process, self._done = psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            mib = self._process.memory_info().rss / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mib)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def publish(out: Path, parts: list[Path], decisions, stages: list, on_ray: bool) -> tuple[float, float]:
    """The publishing pass of a run over the stored parts (``write_outputs``: decisions applied, ledger, embeddings,
    shards planned and written by the webdataset sink), into ``out``; its seconds and the driver's peak RSS after."""
    decide_module = _module("curate.core.decide", "curate.decide")
    from curate.config import PipelineConfig

    out.mkdir(parents=True)
    (out / "parts").symlink_to(parts[0].parent)
    config = PipelineConfig.model_validate({"name": "decide-bench", "stages": [{"stage": "download"}],
                                            "output": {"path": str(out), "samples_per_shard": 10_000}})
    start = time.perf_counter()
    written = decide_module.write_outputs(out, parts, decisions, decide_module.decision_columns(stages), config,
                                          not on_ray)
    decide_module.write_json_atomic(out / "manifest.json", {"rows": written.ledger.rows,
                                                            "shards": len(written.entries)})
    return (round(time.perf_counter() - start, 2),
            round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def demo_run(n: int) -> dict:
    """The demo's curation (pipelines/demo_curate.yaml over a drawn pool of ``n`` rows served on loopback, bootstrap
    scoring included) on an embedded Ray, end to end. The driver's peak RSS over the whole run, and the reads of
    stored parts the driver itself made while bootstrapping and while deciding (a pass = one read per part)."""
    import pyarrow.parquet as pq

    from curate.demo.pool import make_pool, write_url_list
    from curate.demo.run import demo_pipeline_path
    from curate.demo.server import FaultServer

    runner = _module("curate.core.runner", "curate.runner")
    decide_module = _module("curate.core.decide", "curate.decide")
    bootstrap = _module("curate.train.bootstrap", "curate.bootstrap")
    load_pipeline = _module("curate.core.pipeline", "curate.config").load_pipeline
    reads: Counter[str] = Counter()
    phase = {"now": "per_sample"}
    real_read = pq.read_table

    def counted(source, *args, **kwargs):
        reads[phase["now"]] += 1
        return real_read(source, *args, **kwargs)

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase["now"] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase["now"] = "write"
        return wrapped

    decide_module.run_global_stages = in_phase("decide", decide_module.run_global_stages)
    bootstrap.bootstrap_scores = in_phase("bootstrap", bootstrap.bootstrap_scores)
    pq.read_table = counted
    with tempfile.TemporaryDirectory() as tmp:
        items = make_pool(Path(tmp) / "pool", n=n, seed=0)
        start = time.perf_counter()
        with FaultServer(Path(tmp) / "pool" / "files") as server:
            urls = write_url_list(items, server.base_url, Path(tmp) / "urls.parquet")
            result = runner.run_pipeline(load_pipeline(demo_pipeline_path()), input_path=str(urls),
                                         output=Path(tmp) / "run", progress=False)
        parts = len(list((Path(tmp) / "run" / "parts").glob("*.parquet")))
        import curate

        return {"rows": n, "mode": "demo on ray", "seconds": round(time.perf_counter() - start, 1),
                "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "parts": parts, "kept": result.manifest.totals_by_status["kept"],
                "driver_passes": {k: round(v / parts, 1) for k, v in reads.items() if k in ("bootstrap", "decide")},
                "curate": str(Path(curate.__file__).parents[1])}


def measure(n: int, mode: str, args: argparse.Namespace, tree: str | None) -> dict:
    """One measurement in its own process, importing curate (and Ray's workers) from ``tree`` when given; the
    synthetic run is generated (or reused from --store) by another process first, so that neither its time nor its
    memory counts."""
    import os

    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).resolve()), str(REPO), env.get("PYTHONPATH", "")])
    common = ["--part-rows", str(args.part_rows), "--dim", str(args.dim), "--store", str(args.store)]
    if mode == "demo":
        command = [sys.executable, __file__, "--demo-one", str(n)]
    else:
        if not args.from_run:
            made = subprocess.run([sys.executable, __file__, "--generate", str(n), *common], env=env, cwd=tree or REPO,
                                  capture_output=True, text=True)
            if made.returncode:
                raise SystemExit(f"generating {n} rows failed: {made.stderr[-2000:]}")
        command = [sys.executable, __file__, "--one", str(n), mode, *common] + (["--write"] if args.write else [])
    if args.from_run:
        command += ["--from-run", str(Path(args.from_run).resolve()), "--pipeline", str(Path(args.pipeline).resolve())]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree or REPO)
    if done.returncode:
        raise SystemExit(f"benchmark run failed ({tree or REPO}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--modes", nargs="+", default=["in_process", "ray"], choices=["in_process", "ray"])
    parser.add_argument("--part-rows", type=int, default=5_000)
    parser.add_argument("--from-run", help="decide this finished run's stored parts instead of a synthetic run")
    parser.add_argument("--pipeline", help="with --from-run: the pipeline whose global stages decide")
    parser.add_argument("--reference", help="a checkout of an earlier curate, measured the same way for ratios")
    parser.add_argument("--demo", type=int, metavar="ROWS",
                        help="instead: the demo's curation on Ray end to end (driver peak RSS, driver passes)")
    parser.add_argument("--dim", type=int, default=512, help="image embedding width of the synthetic run")
    parser.add_argument("--store", default=tempfile.gettempdir(),
                        help="folder for the synthetic runs (kept and reused by the next call with the same sizes) "
                             "and the published outputs (removed after each measurement)")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the publishing pass (ledger, embeddings, shards) after the decisions")
    parser.add_argument("--one", nargs=2, metavar=("ROWS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--demo-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_run and not args.pipeline:
        parser.error("--from-run needs --pipeline")
    if args.one:
        print(json.dumps(decide(int(args.one[0]), args.one[1], args)))
        return
    if args.generate:
        write_run(stored_run(Path(args.store), args.generate, args.part_rows, args.dim), args.generate,
                  args.part_rows, args.dim)
        return
    if args.demo_one:
        print(json.dumps(demo_run(args.demo_one)))
        return
    if args.demo:
        for label, tree in [("this", None)] + ([("reference", args.reference)] if args.reference else []):
            result = measure(args.demo, "demo", args, tree)
            print(f"{label:<9} demo {result['rows']} rows on Ray: {result['seconds']} s, driver peak RSS "
                  f"{result['driver_peak_rss_mib']} MiB, passes over the {result['parts']} parts in the driver "
                  f"{result['driver_passes']}, kept {result['kept']}  [{result['curate']}]")
        return
    by_mode: dict[str, list[dict]] = {}
    for n in [0] if args.from_run else args.sizes:
        for mode in args.modes:
            results = [("this", measure(n, mode, args, None))]
            if args.reference:
                results.append(("reference", measure(n, mode, args, args.reference)))
            for label, result in results:
                passes = result["passes_over_parts"]
                print(f"{label:<9} {result['rows']:>8} rows  {mode:<10}  {result['seconds']:7.2f} s  driver peak RSS "
                      f"{result['driver_peak_rss_mib']:7.1f} MiB (before deciding {result['rss_before_decide_mib']:.1f})"
                      + (f"  passes over the parts {passes:.1f} {result['passes_by_stage']}, of them reading the "
                         f"embeddings {result['embedding_passes']:.1f}" if passes is not None else "")
                      + f"  removed {result['removed']} {result['removed_by']}  [{result['curate']}]")
                print(f"{'':<9} driver RSS peak by phase (MiB) {result.get('rss_mib_by_phase')}")
                print(f"{'':<9} seconds by stage {result['stage_seconds']}" + (
                    f"; publish (ledger, embeddings, shards) {result['write_seconds']} s, driver peak after it "
                    f"{result['write_peak_rss_mib']} MiB" if result.get("write_seconds") is not None else ""))
                if label == "this":
                    by_mode.setdefault(mode, []).append(result)
            if args.reference:
                this, reference = results[0][1], results[1][1]
                ratios = [f"seconds {this['seconds'] / max(reference['seconds'], 1e-9):.2f}x",
                          f"driver peak {this['driver_peak_rss_mib'] / reference['driver_peak_rss_mib']:.2f}x"]
                if this["passes_over_parts"] is not None:
                    ratios.append(f"passes {this['passes_over_parts']:.1f} vs {reference['passes_over_parts']:.1f}")
                print(f"{'':<9} this / reference: {', '.join(ratios)}")
    for mode, results in by_mode.items():  # growth from the smallest size to each larger one (targets: issue 20)
        small = results[0]
        for large in results[1:]:
            factor = large["rows"] / small["rows"]
            total = lambda r: r["seconds"] + (r.get("write_seconds") or 0)  # noqa: E731
            peak = lambda r: max(r["driver_peak_rss_mib"], r.get("write_peak_rss_mib") or 0)  # noqa: E731
            print(f"{mode}: {factor:.0f}x rows ({small['rows']} -> {large['rows']}): decide + publish "
                  f"{total(large) / total(small):.1f}x the time, driver peak {peak(large) / peak(small):.2f}x")


if __name__ == "__main__":
    main()
