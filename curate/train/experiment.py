"""`curate experiment`: does the curation pay? DataComp's question, asked of one finished run.

The same model, seed and schedule is trained twice, at equal samples seen: on everything that downloaded (``raw``)
and on the rows the run kept (``curated``). Both are evaluated on a held-out set that neither trained on, at every
checkpoint, so the result is a table and a curve rather than one number. Training data comes from the images the run
stored (no download, no decode twice). Each step resumes: tars are written once, training continues from its
checkpoints, and a changed run or config starts the experiment over.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from curate.core import parts as part_store
from curate.errors import CurateError
from curate.core.ledger import read_ledger
from curate.sinks.pair_tars import write_pair_tars

FOLDER = "experiment"
ARMS = ("raw", "curated")
SAMPLES_PER_TAR = 1000
# the single number that decides who wins: mean of recall@1/5/10 in both directions
MEAN_RECALL = "mean_recall"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("curate-tiny", description="architecture both arms train from scratch")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(5e-4, gt=0)
    seed: int = 0
    eval_every: int = Field(50, ge=1, description="steps between evaluations on the held-out set")
    eval_data: str | None = Field(None, description="held-out eval set (shards or parquet); default: hold out "
                                  "`holdout` of the kept rows from both arms")
    holdout: float = Field(0.1, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(0, ge=0)


@dataclass
class Selection:
    """The uids each arm trains on (raw and curated first, then any others, e.g. an oracle), and the held-out rows."""

    arms: dict[str, set[str]]
    heldout: set[str]

    def sets(self) -> dict[str, set[str]]:
        return {**self.arms, "heldout": self.heldout}

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, uids in self.sets().items():
            h.update(name.encode() + b"\0" + "\n".join(sorted(uids)).encode() + b"\0")
        return h.hexdigest()[:16]


def held_out(uid: str, fraction: float) -> bool:
    return int(uid[12:20], 16) / 16**8 < fraction  # other digits than the bootstrap folds use: independent splits


def select(out: Path, config: ExperimentConfig, extra: dict[str, set[str]] | None = None) -> Selection:
    """raw: every row with a stored image; curated: the kept rows; ``extra`` arms as given (their rows must have a
    stored image); the held-out rows (when no eval set is given) are in no arm."""
    raw: set[str] = set()
    for part in part_store.part_files(out):
        table = pq.read_table(part, columns=["uid", "image"])
        raw.update(table.filter(pc.is_valid(table.column("image"))).column("uid").to_pylist())
    ledger = read_ledger(out).select(["uid", "status"])
    curated = set(ledger.filter(pc.equal(ledger.column("status"), "kept")).column("uid").to_pylist())
    heldout = set() if config.eval_data else {uid for uid in curated if held_out(uid, config.holdout)}
    arms = {"raw": raw - heldout, "curated": curated - heldout}
    for name, uids in (extra or {}).items():
        if name in (*arms, "heldout"):
            raise CurateError(f"experiment arm {name!r}: the name is taken; choose another")
        arms[name] = (uids & raw) - heldout
    return Selection(arms, heldout)


def write_sets(out: Path, folder: Path, selection: Selection) -> dict[str, list[Path]]:
    """Tars per arm (rows spread by uid over ceil(n / 1000) tars) and one for the held-out rows."""
    members = selection.sets()
    sets = {name: sorted(uids) for name, uids in members.items()}
    paths: dict[str, list[Path]] = {}
    for name, uids in sets.items():
        count = max(1, math.ceil(len(uids) / SAMPLES_PER_TAR)) if uids else 0
        paths[name] = [folder / "data" / name / f"{i:05d}.tar" for i in range(count)]
    flat = [p for name in sets for p in paths[name]]
    offset = {name: sum(len(paths[n]) for n in list(sets)[:i]) for i, name in enumerate(sets)}

    def route(uid: str) -> list[int]:
        spread = int(uid[:8], 16)
        return [offset[name] + spread % len(paths[name]) for name in sets if paths[name] and uid in members[name]]

    wanted = set().union(*members.values())
    write_pair_tars(out, flat, route, lambda table: pc.is_in(table.column("uid"), value_set=_array(wanted)))
    return paths


def _array(uids: set[str]) -> Any:
    import pyarrow as pa

    return pa.array(sorted(uids), pa.string())


def _prepare(out: Path, folder: Path, config: ExperimentConfig, selection: Selection, progress: bool) -> None:
    """A changed run (re-decided) or experiment config invalidates every tar and model: start over."""
    stamp = {"config": config.model_dump(mode="json"), "selection": selection.digest()}
    path = folder / "experiment.json"
    if path.exists() and json.loads(path.read_text()) != stamp:
        if progress:
            print(f"[experiment] the run or the settings changed since {folder} was made; starting over",
                  file=sys.stderr)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2) + "\n")


def train_arm(folder: Path, arm: str, data: list[Path], config: ExperimentConfig, progress: bool) -> Path:
    from curate.train.config import TrainConfig
    from curate.train.loop import train

    train_config = TrainConfig(
        model=config.model, objectives=["clip"], data=[str(p) for p in data], output=str(folder / arm),
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=min(50, config.steps // 10),
        seed=config.seed, workers=config.workers, device=config.device, log_every=max(1, min(20, config.eval_every)),
        checkpoint_every=config.eval_every, keep_checkpoints=config.steps // config.eval_every + 1)
    if progress:
        print(f"[experiment] training {arm}: {config.steps} steps × {config.batch_size}", file=sys.stderr)
    train(train_config, progress=progress)
    return folder / arm


def eval_curve(model_dir: Path, pairs: list[dict[str, Any]], device: str) -> list[dict[str, float]]:
    """Retrieval on the held-out pairs at every checkpoint of one arm, in step order."""
    from curate.models.clip import ClipSpec
    from curate.models.scorer import load_scorer
    from curate.train.eval import embed, retrieval

    curve = []
    for checkpoint in sorted((model_dir / "checkpoints").glob("step_*")):
        scorer = load_scorer(ClipSpec(str(checkpoint)), device)
        image, text = embed(scorer, [p["image"] for p in pairs], [p["caption"] for p in pairs])
        metrics = retrieval(image, text)
        step = int(checkpoint.name.split("_")[1])
        curve.append({"step": step, **metrics, MEAN_RECALL: sum(metrics.values()) / len(metrics)})
    return curve


def run_experiment(out: Path, config: ExperimentConfig, progress: bool = True,
                   extra_arms: dict[str, set[str]] | None = None, folder: Path | None = None,
                   only: set[str] | None = None) -> dict[str, Any]:
    """Trains and evaluates every arm; ``extra_arms`` adds arms of given uids (benchmarks/efficacy.py's oracle),
    ``folder`` (default OUT/experiment) keeps the tars, models and results apart per setting, ``only`` trains just
    those arms (a re-decided run compared with another run's raw arm)."""
    from curate.train.eval import decodable, load_pairs
    from curate.train.loop import resolve_device

    out = Path(out).resolve()
    if not (out / "manifest.json").exists():
        raise CurateError(f"{out}: not a finished run (no manifest.json); run the pipeline to the end first")
    folder = Path(folder) if folder else out / FOLDER
    selection = select(out, config, extra_arms)
    if only is not None and only - set(selection.arms):
        raise CurateError(f"experiment arms {sorted(only - set(selection.arms))}: not arms of this experiment "
                          f"(it has {sorted(selection.arms)})")
    for arm, uids in selection.arms.items():
        if len(uids) < config.batch_size:
            raise CurateError(f"{out}: the {arm} set has {len(uids)} rows, fewer than "
                              f"batch_size={config.batch_size}; lower --batch-size")
    _prepare(out, folder, config, selection, progress)
    paths = write_sets(out, folder, selection)
    eval_source = config.eval_data or [str(p) for p in paths["heldout"]]
    if not eval_source:
        raise CurateError(f"{out}: no kept row fell in the held-out {config.holdout:.0%}; raise --holdout or "
                          "pass --eval")
    pairs, undecodable = decodable(load_pairs(eval_source))
    device = resolve_device(config)  # type: ignore[arg-type]
    results: dict[str, Any] = {
        "run": str(out), "config": config.model_dump(mode="json"),
        "eval": {"source": config.eval_data or f"{config.holdout:.0%} of the kept rows, held out of both arms",
                 "pairs": len(pairs), "undecodable": undecodable},
        "samples_seen": config.steps * config.batch_size, "arms": {}}
    for arm, uids in selection.arms.items():
        if only is not None and arm not in only:
            continue
        model_dir = train_arm(folder, arm, paths[arm], config, progress)
        curve = eval_curve(model_dir, pairs, device)
        rows = len(uids)
        results["arms"][arm] = {"rows": rows, "epochs": round(results["samples_seen"] / rows, 2),
                                "final": curve[-1], "curve": curve, "log": _read_log(model_dir)}
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if only is None:
        plot_curves(results, folder / "curves.png")
    return results


def _read_log(model_dir: Path) -> list[dict[str, float]]:
    path = model_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (recall_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    batch = results["config"]["batch_size"]
    for arm, data in results["arms"].items():
        recall_ax.plot([p["step"] * batch for p in data["curve"]], [p[MEAN_RECALL] for p in data["curve"]],
                       marker="o", label=f"{arm} ({data['rows']} rows)")
        loss_ax.plot([r["step"] * batch for r in data["log"]], [r["loss"] for r in data["log"]], label=arm)
    recall_ax.set(xlabel="samples seen", ylabel="mean recall@1/5/10 (held out)", title="held-out retrieval")
    loss_ax.set(xlabel="samples seen", ylabel="training loss", title="training loss")
    for ax in (recall_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compared_arms(out: Path, others: list[Path]) -> dict[str, set[str]]:
    """One arm per other finished run of the same pool: the rows it kept, named by its pipeline (its folder's name
    when two share one). A run of another pool shares no row with ``out``: one clear error."""
    from curate.core.ledger import read_manifest

    ours = set(read_ledger(out).column("uid").to_pylist())
    arms: dict[str, set[str]] = {}
    for other in others:
        other = Path(other).resolve()
        manifest = read_manifest(other)
        if manifest is None:
            raise CurateError(f"--compare {other}: not a finished run (no manifest.json)")
        ledger = read_ledger(other).select(["uid", "status"])
        if not ours & set(ledger.column("uid").to_pylist()):
            raise CurateError(f"--compare {other}: shares no row with {out}; compare runs of the same input")
        name = manifest.pipeline if manifest.pipeline not in (*arms, *ARMS, "heldout") else other.name
        if name in (*arms, *ARMS, "heldout"):
            raise CurateError(f"--compare {other}: an arm is already named {name!r}; rename the folder")
        arms[name] = set(ledger.filter(pc.equal(ledger.column("status"), "kept")).column("uid").to_pylist())
    return arms


def print_table(results: dict[str, Any]) -> None:
    """Every arm side by side, DataComp-style: rows, epochs, each retrieval metric, and the gain over raw."""
    arms = results["arms"]
    names = list(arms)
    raw = arms["raw"]["final"][MEAN_RECALL]
    width = max(12, *(len(n) + 2 for n in names))
    print(f"\nexperiment: {results['samples_seen']} samples seen by each arm; eval on {results['eval']['pairs']} "
          f"held-out pairs ({results['eval']['source']})")
    print(f"{'':22}" + "".join(f"{n:>{width}}" for n in names))
    print(f"{'training rows':22}" + "".join(f"{arms[n]['rows']:>{width}}" for n in names))
    print(f"{'epochs':22}" + "".join(f"{arms[n]['epochs']:>{width}}" for n in names))
    for key in [k for k in arms["raw"]["final"] if "R@" in k] + [MEAN_RECALL]:
        label = key.replace("image_to_text_", "image->text ").replace("text_to_image_", "text->image ")
        print(f"{label:22}" + "".join(f"{arms[n]['final'][key]:>{width}.3f}" for n in names))
    print(f"{'gain over raw':22}" + "".join(
        f"{(arms[n]['final'][MEAN_RECALL] - raw) / max(raw, 1e-9):>+{width}.1%}" for n in names))


def print_comparison(results: dict[str, Any]) -> str:
    """Prints the side-by-side table; returns the winning arm."""
    raw, curated = (results["arms"][arm] for arm in ARMS)
    print(f"\nexperiment: {results['samples_seen']} samples seen by each arm; eval on {results['eval']['pairs']} "
          f"held-out pairs ({results['eval']['source']})")
    print(f"{'':22}{'raw':>10}{'curated':>10}{'delta':>10}")
    print(f"{'training rows':22}{raw['rows']:>10}{curated['rows']:>10}")
    print(f"{'epochs':22}{raw['epochs']:>10}{curated['epochs']:>10}")
    for key in [k for k in raw["final"] if "R@" in k] + [MEAN_RECALL]:
        label = key.replace("image_to_text_", "image->text ").replace("text_to_image_", "text->image ")
        a, b = raw["final"][key], curated["final"][key]
        print(f"{label:22}{a:>10.3f}{b:>10.3f}{b - a:>+10.3f}")
    winner = "curated" if curated["final"][MEAN_RECALL] > raw["final"][MEAN_RECALL] else "raw"
    print(f"{winner} wins on mean recall")
    return winner
