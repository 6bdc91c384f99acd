"""Does curation work on real images? Figures of a pipeline on the real development pool (benchmarks/realpool.py).

The pool is served from a FaultServer on 127.0.0.1 and curated by a pipeline (default pipelines/no_weights.yaml);
the ledger is then compared with the pool's truth.

Cheap figures (no training):
- ROC AUC of the alignment score, aligned captions against shuffled ones (the raw cosine pooled over the scoring
  models, and each row's rank within its model, which is what ``keep_top`` cuts on; and the score the alignment
  stage ranked by, when it stores one);
- the share of shuffled (and of any bad) captions among the kept rows, and what was kept of each planted kind;
- duplicate groups (a picture with several rows that reached dedup) left with exactly one survivor, and which
  near-copy variants survive; removals that point at a different picture; rows removed from pictures that have one
  row only.

The real test (``--train``): the bundled trainer at equal samples seen on raw (every row that downloaded), curated
(the kept rows) and oracle (the truth's noise removed: one row per picture, true captions only), retrieval R@1/5/10
both ways on the pool's held-out eval set, for each seed; then the curated gain over raw in mean R@5 and the share
of the oracle's gain that curation recovers.

    .venv/bin/python benchmarks/efficacy.py --pool /tmp/realpool --out /tmp/efficacy
    .venv/bin/python benchmarks/efficacy.py --pool /tmp/realpool --out /tmp/efficacy --train --seeds 0 1
    .venv/bin/python benchmarks/efficacy.py --pool /tmp/realpool --out /tmp/efficacy --redecide \\
        --set alignment.keep_top=0.6          # decide the stored run again (nothing fetched or scored)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEDUP_STAGES = ("dedup_exact", "dedup_phash", "dedup_semantic")
R5 = ("image_to_text_R@5", "text_to_image_R@5")


def run_pool(pool: Path, run: Path, pipeline: Path, overrides: list[str], local: bool) -> Path:
    """Serves the pool on loopback and curates it into ``run`` (replaced: the server's port changes every time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core.pipeline import load_pipeline
    from curate.demo.server import FaultServer
    from curate.core.runner import run_pipeline

    config = load_pipeline(pipeline, ["download.allow_private_networks=true", *overrides])
    shutil.rmtree(run, ignore_errors=True)
    listing = pq.read_table(pool / "pool.parquet")
    with FaultServer(pool / "files", slow_seconds=30) as server:
        urls = [f"{server.base_url}/{route}/{name}" for route, name in
                zip(listing.column("route").to_pylist(), listing.column("name").to_pylist())]
        url_list = run.parent / f"{run.name}-urls.parquet"
        run.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": urls, "caption": listing.column("caption")}), url_list)
        run_pipeline(config, input_path=str(url_list), output=run, local=local)
    return run


def redecide_run(source: Path, run: Path, pipeline: Path, overrides: list[str]) -> Path:
    from curate.core.pipeline import load_pipeline
    from curate.core.redecide import redecide

    config = load_pipeline(pipeline, ["download.allow_private_networks=true", *overrides])
    shutil.rmtree(run, ignore_errors=True)
    redecide(config, source, run, local=True)
    return run


def rows_with_truth(pool: Path, run: Path) -> dict[str, np.ndarray]:
    """Every ledger row joined with its truth (by the served file name) and its stored scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core import parts as part_store
    from curate.core.ledger import read_ledger

    ledger = read_ledger(run)
    truth = pq.read_table(pool / "truth.parquet")
    by_name = {name: i for i, name in enumerate(truth.column("name").to_pylist())}
    order = np.array([by_name[url.rsplit("/", 1)[1]] for url in ledger.column("url").to_pylist()])
    wanted = ["uid", "clip_score", "clip_model", "image", *CAPTION_COLUMNS]
    stored = []
    for part in part_store.part_files(run):
        names = pq.ParquetFile(part).schema_arrow.names
        table = pq.read_table(part, columns=[c for c in wanted if c in names])
        image = table.column("image") if "image" in table.column_names else pa.nulls(table.num_rows, pa.binary())
        table = table.drop_columns([c for c in ("image",) if c in table.column_names]).append_column(
            "has_image", pa.compute.is_valid(image))
        stored.append(table)
    scores = pa.concat_tables(stored, promote_options="permissive")
    at = {uid: i for i, uid in enumerate(scores.column("uid").to_pylist())}
    index = np.array([at[uid] for uid in ledger.column("uid").to_pylist()])

    def column(table, name, rows, fill=None):
        if name not in table.column_names:
            return np.full(len(rows), fill, dtype=object)
        return np.asarray(table.column(name).to_pylist(), dtype=object)[rows]

    rows = {name: np.asarray(ledger.column(name).to_pylist(), dtype=object)
            for name in ("uid", "status", "reason", "decided_by", "duplicate_of")}
    for name in ("kind", "picture", "source", "caption_ok", "variant"):
        rows[name] = column(truth, name, order)
    for name in ("clip_score", "clip_model", "has_image", *CAPTION_COLUMNS):
        rows[name] = column(scores, name, index)
    rows["true_caption"] = column(truth, "true_caption", order)
    rows["relative_score"] = np.full(len(index), None, dtype=object)
    if any(s is not None for s in rows["clip_score"]) and "image_embedding" in pq.ParquetFile(
            part_store.part_files(run)[0]).schema_arrow.names:
        from curate.core.pool import Pool
        from curate.stages.alignment import AlignmentConfig, relative_scores

        defaults = AlignmentConfig(keep_top=1.0)
        table = relative_scores(Pool.from_parts(part_store.part_files(run)), defaults.reference_rows,
                                defaults.neighbours)
        score_of = dict(zip(table.column("uid").to_pylist(), table.column("score").to_pylist()))
        rows["relative_score"] = np.array([score_of.get(u) for u in rows["uid"]], dtype=object)
    return rows


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    from scipy.stats import rankdata

    positive, negative = positive[~np.isnan(positive)], negative[~np.isnan(negative)]
    if not len(positive) or not len(negative):
        return float("nan")
    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def rank_in_model(scores: np.ndarray, models: np.ndarray) -> np.ndarray:
    """Each score's quantile among the rows of its scoring model (what keep_top ranks on)."""
    from scipy.stats import rankdata

    out = np.full(len(scores), np.nan)
    for model in set(models[~np.isnan(scores)].tolist()):
        rows = np.flatnonzero((models == model) & ~np.isnan(scores))
        out[rows] = rankdata(scores[rows]) / len(rows)
    return out


def stage_order(run: Path) -> list[str]:
    from curate.core.ledger import read_manifest

    return [stage.name for stage in read_manifest(run).stages]  # type: ignore[union-attr]


def cheap_figures(rows: dict[str, np.ndarray], order: list[str]) -> dict:
    kind, status, reason = rows["kind"], rows["status"], rows["reason"]
    ok = rows["caption_ok"].astype(bool)
    kept = status == "kept"
    figures: dict = {"rows": len(kind), "kept": int(kept.sum()), "failed": int((status == "failed").sum())}

    # alignment: aligned (a true caption on a real picture) against shuffled captions
    score = np.array([np.nan if s is None else s for s in rows["clip_score"]], dtype=float)
    models = np.array([str(m) for m in rows["clip_model"]], dtype=object)
    aligned = ok & (kind != "near_blank")
    shuffled = (kind == "shuffled") & ~ok
    figures["auc_clip_score"] = roc_auc(score[aligned], score[shuffled])
    ranked = rank_in_model(score, models)
    figures["auc_rank_in_model"] = roc_auc(ranked[aligned], ranked[shuffled])
    if any(s is not None for s in rows["relative_score"]):
        relative = rank_in_model(np.array([np.nan if s is None else s for s in rows["relative_score"]], dtype=float),
                                 models)
        figures["auc_relative"] = roc_auc(relative[aligned], relative[shuffled])
        boiler = kind == "boilerplate"
        figures["boilerplate_mean_rank"] = {"clip_score": float(np.nanmean(ranked[boiler])),
                                            "relative": float(np.nanmean(relative[boiler])),
                                            "aligned_rows": float(np.nanmean(ranked[aligned]))}
    figures["kept_shuffled_share"] = float((kept & shuffled).sum() / max(1, kept.sum()))
    figures["kept_bad_caption_share"] = float((kept & ~ok).sum() / max(1, kept.sum()))
    figures["kept_by_kind"] = {k: f"{int((kept & (kind == k)).sum())}/{int((kind == k).sum())}"
                               for k in sorted(set(kind.tolist()))}

    # dedup: rows that reached the first dedup stage, grouped by the picture they show
    first = min((order.index(s) for s in DEDUP_STAGES if s in order), default=None)
    if first is not None:
        position = {name: i for i, name in enumerate(order)}
        removed_by_dedup = np.array([d in DEDUP_STAGES for d in rows["decided_by"]])
        reached = (status != "failed") & np.array([d is None or position.get(d, 0) >= first
                                                   for d in rows["decided_by"]])
        survived = reached & ~removed_by_dedup
        real = reached & (kind != "near_blank")
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(real):
            groups.setdefault(rows["picture"][i], []).append(int(i))
        multi = {p: members for p, members in groups.items() if len(members) > 1}
        single = [members[0] for members in groups.values() if len(members) == 1]
        one = sum(int(survived[m].sum()) == 1 for m in multi.values())
        figures["dup_groups"] = len(multi)
        figures["dup_groups_one_survivor"] = float(one / max(1, len(multi)))
        figures["dup_groups_none_survive"] = int(sum(int(survived[m].sum()) == 0 for m in multi.values()))
        uid_at = {u: i for i, u in enumerate(rows["uid"])}
        root = _survivors(rows["uid"], rows["duplicate_of"], removed_by_dedup)
        original = {rows["picture"][i]: i for i in np.flatnonzero(real)
                    if kind[i] not in ("exact_duplicate", "near_duplicate")}
        variants: Counter[str] = Counter()
        merged: Counter[str] = Counter()
        for members in multi.values():
            for i in members:
                v = rows["variant"][i] or ("exact" if kind[i] == "exact_duplicate" else None)
                source = original.get(rows["picture"][i])
                if v and source is not None:
                    variants[v] += 1
                    merged[v] += int(root[i] == root[source])
        figures["copies_merged_with_original"] = {v: f"{merged[v]}/{variants[v]}" for v in sorted(variants)}
        removals = [i for i in np.flatnonzero(removed_by_dedup & (kind != "near_blank"))]
        wrong = [i for i in removals if rows["picture"][uid_at[rows["duplicate_of"][i]]] != rows["picture"][i]]
        figures["dedup_removals"] = len(removals)
        figures["removals_pointing_at_other_picture"] = float(len(wrong) / max(1, len(removals)))
        figures["wrong_removals_by_source"] = dict(Counter(rows["source"][i] for i in wrong))
        figures["wrong_removals_by_stage"] = dict(Counter(rows["decided_by"][i] for i in wrong))
        figures["singletons"] = len(single)
        figures["singletons_removed_by_dedup"] = int(removed_by_dedup[single].sum())
        figures["near_blank_removed_by_dedup"] = int((removed_by_dedup & (kind == "near_blank")).sum())
    if any(c is not None for c in rows["caption_source"]):
        figures["captions"] = caption_figures(rows, kept, shuffled)
    figures["reasons"] = dict(Counter(r for r in reason if r).most_common())
    return figures


CAPTION_COLUMNS = ("original_caption", "synthetic_caption", "caption_source")


def _words(text: str | None) -> set[str]:
    from curate.stages.metadata_entries import FUNCTION_WORDS

    return {w for w in re.findall(r"[^\W_]+", (text or "").lower()) if len(w) > 2 and w not in FUNCTION_WORDS}


def _overlap(text: str | None, truth: str | None) -> float:
    """Share of the true caption's content words that ``text`` holds: a caption that describes the picture names
    what its own description names (a crude judge, but one that needs no model)."""
    want = _words(truth)
    return len(_words(text) & want) / len(want) if want else 0.0


def caption_figures(rows: dict[str, np.ndarray], kept: np.ndarray, shuffled: np.ndarray) -> dict:
    """What re-captioning did: rows given a synthetic caption, rows that took it, and whether it describes the
    picture better than the raw caption (by content words shared with the picture's true description)."""
    synthetic = np.array([c is not None for c in rows["synthetic_caption"]])
    took = rows["caption_source"] == "synthetic"
    better = np.array([_overlap(rows["synthetic_caption"][i], rows["true_caption"][i])
                       > _overlap(rows["original_caption"][i], rows["true_caption"][i]) if synthetic[i] else False
                       for i in range(len(synthetic))])
    words = np.array([_overlap(rows["synthetic_caption"][i], rows["true_caption"][i]) if synthetic[i] else np.nan
                      for i in range(len(synthetic))])

    def share(mask: np.ndarray, of: np.ndarray) -> float:
        return float((mask & of).sum() / max(1, of.sum()))

    return {"captioned": int(synthetic.sum()), "took_synthetic": int(took.sum()),
            "captioned_shuffled": int((synthetic & shuffled).sum()),
            "took_synthetic_shuffled": int((took & shuffled).sum()),
            "better_than_raw_among_captioned": share(better, synthetic),
            "better_than_raw_among_captioned_shuffled": share(better, synthetic & shuffled),
            "better_than_raw_among_taken": share(better, took),
            "true_words_named_by_synthetic_mean": float(np.nanmean(words)) if synthetic.any() else float("nan"),
            "kept_taking_synthetic": int((kept & took).sum()),
            "kept_shuffled_still_raw_share": float((kept & shuffled & ~took).sum() / max(1, kept.sum())),
            "examples": [(rows["original_caption"][i], rows["synthetic_caption"][i], rows["true_caption"][i])
                         for i in np.flatnonzero(took)[:8]]}


def _survivors(uids: np.ndarray, duplicate_of: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Each row's survivor: the row its chain of duplicate_of pointers (dedup removals only) ends at."""
    at = {u: i for i, u in enumerate(uids)}
    parent = np.array([at[duplicate_of[i]] if removed[i] and duplicate_of[i] in at else i for i in range(len(uids))])
    for _ in range(32):  # chains are short: a tier points at a row live when it decided, a later tier may move it
        parent = parent[parent]
    return parent


def oracle_arm(rows: dict[str, np.ndarray]) -> set[str]:
    """The truth's noise removed: one downloaded row per picture (its own row where it downloaded), true captions
    only, no near-blank images."""
    chosen: dict[str, int] = {}
    for i in range(len(rows["uid"])):
        if not rows["has_image"][i] or not rows["caption_ok"][i] or rows["kind"][i] == "near_blank":
            continue
        picture = rows["picture"][i]
        copy = rows["kind"][i] in ("exact_duplicate", "near_duplicate")
        if picture not in chosen or (not copy and rows["kind"][chosen[picture]] in ("exact_duplicate",
                                                                                      "near_duplicate")):
            chosen[picture] = i
    return {rows["uid"][i] for i in chosen.values()}


def pair_auc(model_dir: Path, eval_parquet: Path) -> float:
    """Held-out alignment of an arm's last checkpoint: the chance that an eval image's own caption scores above
    another eval caption, and a caption's own image above another image (averaged). R@K on a few hundred pairs is
    near chance for models this small and moves by a few hits; this uses every pair."""
    from curate.models.clip import ClipSpec
    from curate.models.scorer import load_scorer
    from curate.train.eval import decodable, embed, load_pairs

    checkpoint = sorted((model_dir / "checkpoints").glob("step_*"))[-1]
    scorer = load_scorer(ClipSpec(str(checkpoint)), "cpu")
    pairs, _ = decodable(load_pairs(str(eval_parquet)))
    image, text = embed(scorer, [p["image"] for p in pairs], [p["caption"] for p in pairs])
    similarity = image @ text.T
    own = np.diag(similarity)
    n = len(own)
    below_rows = ((similarity < own[:, None]).sum(axis=1)) / (n - 1)
    below_cols = ((similarity < own[None, :]).sum(axis=0)) / (n - 1)
    return float((below_rows.mean() + below_cols.mean()) / 2)


def train_figures(run: Path, rows: dict[str, np.ndarray], pool: Path, args: argparse.Namespace) -> dict:
    """Each seed's final retrieval per arm, their means over seeds, the curated gain over raw in mean R@5 and the
    share of the oracle's gain that curation recovers. With ``--arms curated --reference F``, only the curated arm is
    trained and raw and oracle come from an earlier figures.json of the same pool and settings."""
    from curate.train.experiment import ExperimentConfig, run_experiment

    oracle = oracle_arm(rows)
    reference = json.loads(Path(args.reference).read_text())["train"]["per_seed"] if args.reference else {}
    per_seed: dict = {}
    for seed in args.seeds:
        config = ExperimentConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  eval_every=args.steps, eval_data=str(pool / "eval" / "eval.parquet"), seed=seed,
                                  device="cpu")
        results = run_experiment(run, config, progress=True, extra_arms={"oracle": oracle},
                                 folder=args.out / f"train-{run.name}" / f"seed_{seed}", only=set(args.arms))
        folder = args.out / f"train-{run.name}" / f"seed_{seed}"
        per_seed[str(seed)] = {**reference.get(str(seed), {}),
                               **{arm: {"rows": data["rows"], **data["final"],
                                        "pair_auc": pair_auc(folder / arm, pool / "eval" / "eval.parquet")}
                                  for arm, data in results["arms"].items()}}
    arms = [a for a in ("raw", "curated", "oracle") if all(a in per_seed[s] for s in per_seed)]
    mean = {arm: {key: float(np.mean([per_seed[s][arm][key] for s in per_seed]))
                  for key in per_seed[str(args.seeds[0])][arm] if key != "step"} for arm in arms}

    def r5(arm: str) -> float:
        return float(np.mean([mean[arm][k] for k in R5]))

    out = {"per_seed": per_seed, "mean": mean, "mean_R@5": {a: r5(a) for a in mean},
           "pair_auc": {a: mean[a]["pair_auc"] for a in mean},
           "steps": args.steps, "batch_size": args.batch_size, "model": args.model}
    if {"raw", "curated", "oracle"} <= set(mean):
        gain, oracle_gain = r5("curated") / r5("raw") - 1, r5("oracle") / r5("raw") - 1
        out.update(curated_gain=gain, oracle_gain=oracle_gain,
                   recovered=gain / oracle_gain if oracle_gain else float("nan"))
    return out


ISSUE_VARIANTS = ("jpeg_q40", "half_size", "crop_5", "brightness", "png_to_jpeg")


def _issue_variant(image, variant: str) -> bytes:
    """The five copies of the issue's protocol: JPEG q40, half size, 5% off each side, 8% brighter, PNG to JPEG q90."""
    import io

    from PIL import ImageEnhance

    import realpool

    if variant == "crop_5":
        w, h = image.size
        return realpool._encode(image.crop((round(0.05 * w), round(0.05 * h), w - round(0.05 * w),
                                            h - round(0.05 * h))), "PNG")
    if variant == "brightness":
        return realpool._encode(ImageEnhance.Brightness(realpool.flatten(image)).enhance(1.08), "JPEG", 90)
    return realpool.near_copy(image, variant, np.random.default_rng(0))[0]


def variant_protocol(pool: Path, pipeline: Path, overrides: list[str], pictures: int, seed: int) -> dict:
    """The issue's measurement: ``pictures`` pool pictures each with five planted copies, among every other clean
    picture of the pool as distractors, stored as the pipeline's download stage stores them (its resize spec), then
    the pipeline's hash and dedup stages (decided in this process). Groups left with exactly one survivor, removals
    pointing at a different picture, distractors removed."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from curate.core.pipeline import load_pipeline
    from curate.stages.download.imaging import ImageRejected, decode_and_resize
    from curate.stages import STAGES
    from curate.stages.hash import HashConfig, HashStage

    config = load_pipeline(pipeline, ["download.allow_private_networks=true", *overrides])
    download = next(s for s in config.stages if s.stage == "download")
    spec = download.resize_spec()  # type: ignore[attr-defined]
    tiers = [STAGES[s.stage](s) for s in config.stages if s.stage in ("dedup_exact", "dedup_phash")]
    hash_config = next((s for s in config.stages if s.stage == "hash"), HashConfig())
    truth = pq.read_table(pool / "truth.parquet").to_pylist()
    own = [r for r in truth if r["kind"] in ("clean", "shuffled", "translated", "junk", "boilerplate")]
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(own), size=min(pictures, len(own)), replace=False).tolist())
    names, data, picture = [], [], []
    for k, row in enumerate(own):
        raw = (pool / "files" / row["name"]).read_bytes()
        copies = [("original", raw)]
        if k in chosen:
            with Image.open(io.BytesIO(raw)) as opened:
                image = opened.convert("RGBA")
            copies += [(v, _issue_variant(image, v)) for v in ISSUE_VARIANTS]
        for variant, blob in copies:
            try:
                stored = decode_and_resize(blob, spec)
            except ImageRejected:
                continue
            names.append(f"{k:05d}-{variant}")
            data.append(stored.data)
            picture.append((row["picture"], k in chosen, variant, stored.original_width * stored.original_height))
    n = len(names)
    batch = pa.table({"uid": names, "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()), "image": data})
    hashed = HashStage(hash_config).process(batch)  # type: ignore[arg-type]
    pixels = [p[3] for p in picture]
    table = hashed.drop_columns(["image"]).append_column(
        "sha256", pa.array([hashlib.sha256(d).hexdigest() for d in data])).append_column(
        "original_width", pa.array(pixels, pa.int64())).append_column("original_height", pa.array([1] * n, pa.int64()))
    removed: dict[str, str] = {}
    for tier in tiers:
        live = table.filter(pa.compute.invert(pa.compute.is_in(table.column("uid"),
                                                               value_set=pa.array(sorted(removed), pa.string()))))
        columns = ["uid", *tier.inputs(), *[c for c in tier.optional_inputs() if c in live.column_names]]
        out = tier.decide(live.select(list(dict.fromkeys(columns)))).table
        removed.update(zip(out.column("uid").to_pylist(), out.column("duplicate_of").to_pylist()))
    survivor = {}
    for uid in names:
        target = uid
        while target in removed:
            target = removed[target]
        survivor[uid] = target
    info = dict(zip(names, picture))
    groups: dict[str, list[str]] = {}
    for uid in names:
        if info[uid][1]:
            groups.setdefault(info[uid][0], []).append(uid)
    one = sum(sum(u not in removed for u in members) == 1 for members in groups.values())
    wrong = [u for u in removed if info[survivor[u]][0] != info[u][0]]
    by_variant = Counter(info[u][2] for members in groups.values() for u in members if u not in removed)
    return {"pictures": len(groups), "rows": n, "groups_one_survivor": one / max(1, len(groups)),
            "removals": len(removed), "removals_pointing_at_other_picture": len(wrong) / max(1, len(removed)),
            "distractors_removed": sum(1 for u in removed if not info[u][1]),
            "survivors_by_variant": dict(by_variant)}


def print_figures(figures: dict) -> None:
    cheap = figures["cheap"]
    print(f"\nrows {cheap['rows']}, kept {cheap['kept']}, failed {cheap['failed']}")
    for key in ("auc_clip_score", "auc_rank_in_model", "auc_relative"):
        if key in cheap:
            print(f"  {key:<38}{cheap[key]:.3f}")
    for key in ("kept_shuffled_share", "kept_bad_caption_share", "dup_groups_one_survivor",
                "removals_pointing_at_other_picture"):
        if key in cheap:
            print(f"  {key:<38}{cheap[key]:.3f}")
    for key in ("dup_groups", "dup_groups_none_survive", "dedup_removals", "singletons", "singletons_removed_by_dedup",
                "near_blank_removed_by_dedup"):
        if key in cheap:
            print(f"  {key:<38}{cheap[key]}")
    if "boilerplate_mean_rank" in cheap:
        print(f"  boilerplate rows' mean rank in their model (0-1): {cheap['boilerplate_mean_rank']}")
    print(f"  copies merged with their original, by variant: {cheap.get('copies_merged_with_original')}")
    print(f"  removals pointing at another picture, by source: {cheap.get('wrong_removals_by_source')}, "
          f"by stage: {cheap.get('wrong_removals_by_stage')}")
    print(f"  kept by planted kind: {cheap['kept_by_kind']}")
    if "captions" in cheap:
        print(f"  captions: {json.dumps({k: v for k, v in cheap['captions'].items() if k != 'examples'})}")
        for raw, synthetic, true in cheap["captions"]["examples"]:
            print(f"    raw {raw!r} -> synthetic {synthetic!r} (true {true!r})")
    if "variants" in figures:
        v = figures["variants"]
        print(f"\nissue protocol: {v['pictures']} pictures × 5 copies among {v['rows']} stored images: "
              f"{v['groups_one_survivor']:.1%} of groups keep one survivor, "
              f"{v['removals_pointing_at_other_picture']:.1%} of {v['removals']} removals point at another picture, "
              f"{v['distractors_removed']} distractors removed; survivors by copy: {v['survivors_by_variant']}")
    if "train" in figures:
        train = figures["train"]
        first = next(iter(train["mean"].values()))
        print(f"\n{'arm':<10}{'rows':>7}" + "".join(f"{k.replace('image_to_text_', 'i->t ').replace('text_to_image_', 't->i '):>11}"
                                                 for k in first if "R@" in k) + f"{'mean R@5':>10}{'pair AUC':>10}")
        for arm, metrics in train["mean"].items():
            print(f"{arm:<10}{metrics['rows']:>7.0f}" + "".join(f"{metrics[k]:>11.3f}" for k in metrics if "R@" in k)
                  + f"{train['mean_R@5'][arm]:>10.3f}{metrics['pair_auc']:>10.3f}")
        if "curated_gain" in train:
            print(f"curated gain over raw (mean R@5): {train['curated_gain']:+.1%}; oracle's: "
                  f"{train['oracle_gain']:+.1%}; recovered: {train['recovered']:.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="a pool made by benchmarks/realpool.py")
    parser.add_argument("--out", type=Path, required=True, help="runs, trained arms and figures.json")
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "no_weights.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local", action="store_true", help="curate in this one process (no Ray)")
    parser.add_argument("--redecide", action="store_true", help="decide OUT/run again with this pipeline's global "
                        "stages into OUT/redecided (nothing fetched or scored)")
    parser.add_argument("--reuse", action="store_true", help="figures of the run already in OUT/run")
    parser.add_argument("--train", action="store_true", help="also train raw, curated and oracle arms")
    parser.add_argument("--variants", type=int, default=0, metavar="N", help="also the issue's dedup protocol: N "
                        "pictures with five copies each among the pool's other pictures (no download)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["raw", "curated", "oracle"], choices=["raw", "curated", "oracle"],
                        help="arms to train (the others from --reference)")
    parser.add_argument("--reference", type=Path, help="an earlier figures.json whose raw and oracle arms to reuse")
    parser.add_argument("--name", default=None, help="name of this figures file (default: figures, or "
                        "figures-redecided)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--model", default="curate-tiny")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    run = args.out / "run"
    if args.redecide:
        run = redecide_run(run, args.out / (args.name or "redecided"), args.pipeline, args.overrides)
    elif not args.reuse:
        run_pool(args.pool.resolve(), run, args.pipeline, args.overrides, args.local)
    rows = rows_with_truth(args.pool, run)
    figures: dict = {"run": str(run), "cheap": cheap_figures(rows, stage_order(run))}
    if args.variants:
        figures["variants"] = variant_protocol(args.pool.resolve(), args.pipeline, args.overrides, args.variants,
                                               args.seeds[0])
    if args.train:
        figures["train"] = train_figures(run, rows, args.pool.resolve(), args)
    name = args.name or f"figures{'-redecided' if args.redecide else ''}"
    (args.out / f"{name}.json").write_text(
        json.dumps(figures, indent=1, default=str) + "\n")
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
