"""The `curate` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from curate.errors import CurateError

# img2dataset imports albumentations, whose import-time update check would reach for the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _cmd_validate(args: argparse.Namespace) -> int:
    from curate.core.pipeline import load_pipeline

    for path in args.pipelines:
        config = load_pipeline(path, args.set)
        print(f"{path}: ok ({config.name}: {', '.join(s.stage for s in config.stages)})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from curate.core.pipeline import load_pipeline
    from curate.report.inspect import print_funnel
    from curate.core.runner import run_pipeline

    config = load_pipeline(args.pipeline, args.set)
    if args.dry_run and not args.from_run:
        raise CurateError("--dry-run: give --from-run OUT, the finished run to decide again")
    if args.from_run:
        from curate.core.redecide import dry_run, redecide
        from curate.report.inspect import print_manifest

        if args.dry_run:
            print_manifest(dry_run(config, Path(args.from_run), local=args.local), None)
            return 0
        if not args.output:
            raise CurateError("--from-run: give --output, a new folder for the re-decided shards")
        redecide(config, Path(args.from_run), Path(args.output), local=args.local)
        print_funnel(Path(args.output).resolve())
        return 0
    result = run_pipeline(
        config, input_path=args.input, output=args.output, address=args.address, local=args.local,
        progress=not args.quiet, retry_failed=args.retry_failed,
    )
    print_funnel(result.out)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from curate.cluster.jobs import submit

    return submit(args.pipeline, address=args.address, sets=args.set, input_path=args.input, output=args.output,
                  working_dir=args.working_dir, pip=args.pip, env=args.env, include=args.include,
                  wait=args.wait, insecure_http=args.insecure_http)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from curate.cluster.jobs import list_jobs

    return list_jobs(args.address, insecure_http=args.insecure_http)


def _cmd_logs(args: argparse.Namespace) -> int:
    from curate.cluster.jobs import job_logs

    return job_logs(args.address, args.job, follow_logs=args.follow, insecure_http=args.insecure_http)


def _cmd_stop(args: argparse.Namespace) -> int:
    from curate.cluster.jobs import stop_job

    return stop_job(args.address, args.job, insecure_http=args.insecure_http)


def _cmd_demo(args: argparse.Namespace) -> int:
    from curate.demo.run import run_demo

    run_demo(n=args.n, output=Path(args.output), seed=args.seed, local=args.local, overrides=args.set,
             download_only=args.download_only, experiment_steps=args.experiment_steps)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from curate.report.inspect import inspect_run

    if args.html:
        from curate.report.html import write_report

        print(f"report: {write_report(Path(args.output), Path(args.html)).resolve()}")
        return 0
    return inspect_run(Path(args.output), sample=args.sample, reason=args.reason, verify=args.verify)


def _cmd_why(args: argparse.Namespace) -> int:
    from curate.report.why import print_why

    return print_why(Path(args.output), args.row)


def _cmd_diff(args: argparse.Namespace) -> int:
    from curate.report.diff import print_diff

    return print_diff(Path(args.a), Path(args.b), examples=args.examples)


def _cmd_train(args: argparse.Namespace) -> int:
    from curate.train.config import load_train_config
    from curate.train.loop import train

    sets = list(args.set) + ([f"data={args.data}"] if args.data else []) + (
        [f"output={args.output}"] if args.output else [])
    config = load_train_config(args.config, sets)
    result = train(config, progress=not args.quiet)
    terms = " ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
    print(f"trained to step {result.step}: {result.samples_seen} samples seen, {result.skipped} skipped, {terms}; "
          f"checkpoint {result.checkpoint}")
    return 0


def _cmd_open_clip_train(args: argparse.Namespace) -> int:
    from curate.train.open_clip_bridge import run_open_clip_train

    return run_open_clip_train(args.args[1:] if args.args[:1] == ["--"] else args.args)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from curate.models.clip import ClipSpec
    from curate.train.eval import evaluate, print_table

    if bool(args.data) == bool(args.suite):
        raise CurateError("eval: give --data (one eval set) or --suite (a folder of sets), not both or neither")
    if args.suite:
        from curate.train.eval_suite import evaluate_suite, print_suite

        results = evaluate_suite(ClipSpec(args.model, args.pretrained, args.architecture_file, args.family),
                                 args.suite)
        print_suite(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else []
    results = evaluate(ClipSpec(args.model, args.pretrained, args.architecture_file, args.family), args.data,
                       classnames=classes, templates=args.template or ["a photo of a {}."], label_key=args.label_key)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from curate.train.experiment import ExperimentConfig, print_comparison, run_experiment

    fields = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "seed": args.seed, "eval_every": args.eval_every, "eval_data": args.eval, "holdout": args.holdout,
              "device": args.device, "workers": args.workers}
    try:
        config = ExperimentConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise CurateError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if args.compare:
        from curate.train.experiment import compared_arms, print_table

        out = Path(args.output).resolve()
        results = run_experiment(out, config, progress=not args.quiet,
                                 extra_arms=compared_arms(out, [Path(p) for p in args.compare]))
        print_table(results)
    else:
        print_comparison(run_experiment(Path(args.output), config, progress=not args.quiet))
    print(f"curves: {Path(args.output).resolve() / 'experiment' / 'curves.png'}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from curate.core.schema import write_schemas

    for path in write_schemas(Path(args.write)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate web-scale image-text datasets on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a pipeline key, e.g. download.timeout=5 or output.samples_per_shard=1000")

    p = sub.add_parser("validate", help="check pipeline files without running them")
    p.add_argument("pipelines", nargs="+")
    add_set(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run (or resume) a pipeline")
    p.add_argument("pipeline")
    p.add_argument("--input", help="URL list: file, folder, glob or fsspec URL (overrides input.path)")
    p.add_argument("--output", help="output folder (overrides output.path)")
    p.add_argument("--address", help="an existing Ray cluster, joined from a node of it: auto or HEAD:6379, with the "
                   "token from RAY_AUTH_TOKEN or ~/.ray/auth_token (default: a Ray started for this run); from "
                   "elsewhere use curate submit")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small inputs, debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the rows whose failure was retryable (timeouts, 429, 5xx); keep the rest")
    p.add_argument("--from-run", metavar="OUT", help="decide again over this finished run's stored metadata (new "
                   "filters or dedup settings): no download, no scoring; the kept samples go to --output")
    p.add_argument("--dry-run", action="store_true", help="with --from-run: print the new funnel, write nothing")
    add_set(p)
    p.set_defaults(func=_cmd_run)

    def add_cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 through a tunnel (default: "
                       "RAY_API_SERVER_ADDRESS); the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token")
        p.add_argument("--insecure-http", action="store_true", help="allow plain http to a non-loopback address "
                       "(only inside a private network: the token crosses it in clear text)")

    p = sub.add_parser("submit", help="run a pipeline as a job on a Ray cluster (Ray Jobs API, token auth)")
    p.add_argument("pipeline")
    add_cluster(p)
    p.add_argument("--input", help="URL list every node can read (shared path or fsspec URL)")
    p.add_argument("--output", help="output folder every node can write (shared path or fsspec URL)")
    p.add_argument("--wait", action="store_true", help="stream the job's log and exit with its status")
    p.add_argument("--working-dir", default=".", help="the curate checkout the job gets (default: here); only "
                   "curate/ (.py, .json), pipelines/ (.yaml), pyproject.toml and the pipeline are uploaded, and a "
                   "symlink out of it is refused")
    p.add_argument("--include", action="append", metavar="PATH", help="also upload this file or folder of the "
                   "working directory, e.g. a file the pipeline names by a relative path (repeatable; hidden files "
                   "in a folder are left out)")
    p.add_argument("--pip", action="append", help="a package the job's runtime env installs (repeatable)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="an environment variable for the job "
                   "(repeatable; keep credentials on the nodes, not here)")
    add_set(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("jobs", help="list the cluster's jobs")
    add_cluster(p)
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("logs", help="print a job's log")
    p.add_argument("job")
    add_cluster(p)
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends; exit with its status")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("stop", help="stop a job (its driver is killed; submit the same pipeline again to resume)")
    p.add_argument("job")
    add_cluster(p)
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("demo", help="generate a synthetic pool, serve it on loopback, curate it, and train on raw vs "
                       "curated to show what curation buys")
    p.add_argument("--n", type=int, default=1000, help="pool size (default 1000)")
    p.add_argument("--output", default="curate-demo", help="folder for the pool and the run (default ./curate-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local", action="store_true", help="run without Ray")
    p.add_argument("--download-only", action="store_true",
                   help="only download (pipelines/demo.yaml): no scoring, filtering or experiment (seconds, not minutes)")
    p.add_argument("--experiment-steps", type=int, default=300, help="training steps per arm of the experiment")
    add_set(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("inspect", help="summarise a finished run")
    p.add_argument("output")
    p.add_argument("--sample", type=int, default=5, help="rows to print (default 5)")
    p.add_argument("--reason", help="print rows with this reason (or status: kept, filtered, failed)")
    p.add_argument("--verify", action="store_true", help="also check the ledger against the tars")
    p.add_argument("--html", metavar="FILE", help="write one self-contained HTML report (charts, thumbnails by "
                   "reason, rows near the threshold, duplicate groups, captions, a searchable ledger)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("why", help="the whole story of one row: each stage's columns, the decision, its duplicate")
    p.add_argument("output")
    p.add_argument("row", help="a uid (or its first characters) or a URL")
    p.set_defaults(func=_cmd_why)

    p = sub.add_parser("diff", help="compare two runs: counts by reason, rows kept in one and not the other")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--examples", type=int, default=5, help="rows shown per difference (default 5)")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("train", help="train a CLIP-style model on WebDataset shards (resumes from --output)")
    p.add_argument("config", nargs="?", help="train config YAML (default: the built-in defaults)")
    p.add_argument("--data", help="shards: folder, glob or file (overrides data)")
    p.add_argument("--output", help="folder for checkpoints and the log (overrides output)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. steps=2000 or objectives=[clip,siglip]")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("open-clip-train", help="open_clip's own trainer (open_clip_train.main) on curate's shards, "
                       "with its webdataset reading fixed and curate's architectures registered")
    p.add_argument("args", nargs=argparse.REMAINDER, help="open_clip_train's arguments, e.g. --train-data "
                   "'OUT/shards/{00000..00009}.tar' --train-num-samples 10000 --dataset-type webdataset --model "
                   "ViT-B-32")
    p.set_defaults(func=_cmd_open_clip_train)

    p = sub.add_parser("eval", help="retrieval recall@K and zero-shot accuracy of a model on an eval set")
    p.add_argument("--model", required=True, help="checkpoint folder, architecture name, hf-hub:org/repo, or a "
                   "transformers CLIP/SigLIP (its folder, or a hub id with --family transformers)")
    p.add_argument("--family", default="auto", help="model family: open_clip, transformers, or auto (default)")
    p.add_argument("--pretrained", help="tag or weights file, for an architecture name")
    p.add_argument("--architecture-file", help="model-config JSON of a custom architecture")
    p.add_argument("--data", help="eval shards (folder/glob) or a parquet of image_path, caption")
    p.add_argument("--suite", help="a folder of eval sets in clip_benchmark's WebDataset layout (<set>/test/*.tar, "
                   "classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt): each set and the mean")
    p.add_argument("--classes", help="comma-separated class names: adds zero-shot accuracy over the samples' labels")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    p.add_argument("--label-key", default="label", help="the label's key in each sample's .json or parquet column")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("experiment", help="train on raw vs curated at equal samples seen and compare on held-out data")
    p.add_argument("output", help="a finished run's output folder")
    p.add_argument("--model", help="architecture trained from scratch in both arms (default curate-tiny)")
    p.add_argument("--steps", type=int, help="training steps per arm (default 300)")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 50)")
    p.add_argument("--eval", help="held-out eval set: shards or a parquet (default: hold out part of the kept rows)")
    p.add_argument("--holdout", type=float, help="share of kept rows held out when --eval is not given (default 0.1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, help="data loader workers per arm")
    p.add_argument("--compare", nargs="+", metavar="OUT", help="other finished runs of the same input: one more arm "
                   "each (its kept rows), all at equal samples seen on the same eval set, in one table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("schema", help="write the JSON schemas of pipelines, records, ledger and manifest")
    p.add_argument("--write", default="schemas", metavar="DIR")
    p.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CurateError as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("curate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
