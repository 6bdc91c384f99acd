"""`curate inspect OUT --html report.html`: one self-contained page for deciding by looking.

Everything is inside the file — charts as PNGs drawn by matplotlib, thumbnails as small JPEGs, a ledger sample as
JSON with a few lines of script to search it — so it opens from disk, offline, with no server. Thumbnails are sampled
(a fixed number per section), so a run of 100,000 rows makes a report of a few MB in seconds.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import parts as part_store
from curate.core.atomic import write_text_atomic
from curate.errors import CurateError
from curate.core.ledger import DECISION_TABLES, Manifest, read_ledger, read_manifest

PER_GALLERY = 16  # thumbnails per reason
NEAR = 8  # rows each side of a threshold
GROUPS = 12  # duplicate groups shown
LEDGER_ROWS = 20_000  # rows of the searchable table (a sample beyond that)
THUMB = 96


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img class="chart" alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _thumb(data: bytes | None) -> str:
    from PIL import Image

    if not data:
        return '<div class="nothumb">no image</div>'
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=70)
    except Exception:  # a stored image that does not decode shows as text, never breaks the report
        return '<div class="nothumb">undecodable</div>'
    return f'<img alt="thumbnail" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _card(row: dict[str, Any], image: bytes | None, note: str = "") -> str:
    caption = html.escape((row.get("caption") or "")[:120])
    return (f'<figure class="card">{_thumb(image)}<figcaption><b>{html.escape(row["uid"][:10])}</b> {note}'
            f'<br>{caption}</figcaption></figure>')


def _images(out: Path, uids: set[str]) -> dict[str, bytes]:
    """The stored images of these rows (the only image bytes the report reads)."""
    found: dict[str, bytes] = {}
    if not uids:
        return found
    wanted = pa.array(sorted(uids), pa.string())
    for part in part_store.part_files(out):
        names = pq.ParquetFile(part).schema_arrow.names
        if "image" not in names:
            continue
        keys = pq.read_table(part, columns=["uid"]).column("uid")
        if not pc.any(pc.is_in(keys, value_set=wanted)).as_py():
            continue
        table = pq.read_table(part, columns=["uid", "image"])
        table = table.filter(pc.is_in(table.column("uid"), value_set=wanted))
        found.update(zip(table.column("uid").to_pylist(), table.column("image").to_pylist()))
    return found


def _stored(out: Path, columns: list[str]) -> pa.Table:
    tables = []
    for part in part_store.part_files(out):
        names = pq.ParquetFile(part).schema_arrow.names
        tables.append(pq.read_table(part, columns=[c for c in columns if c in names]))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _funnel_chart(manifest: Manifest) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["input"] + [s.name for s in manifest.stages]
    values = [manifest.input_rows] + [s.rows_out for s in manifest.stages]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 0.8))
    ax.barh(names[::-1], values[::-1], color="#4a7bb7")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title("rows left after each stage")
    return _png(fig)


def _thresholds(manifest: Manifest) -> dict[str, float]:
    """Score column → the alignment filter's absolute threshold, when the run has one."""
    out = {}
    for stage in manifest.config.get("stages", []):
        if stage.get("stage") == "alignment" and stage.get("min_score") is not None:
            out[stage.get("column", "clip_score")] = float(stage["min_score"])
    return out


def _histograms(stored: pa.Table, ledger_status: dict[str, str], cuts: dict[str, float]) -> tuple[str, dict]:
    import matplotlib.pyplot as plt

    charts, effective = [], {}
    for column in ("clip_score", "itm_score", "synthetic_clip_score"):
        if column not in stored.column_names:
            continue
        values = np.asarray(stored.column(column).to_pylist(), dtype=object)
        uids = stored.column("uid").to_pylist()
        present = np.asarray([v is not None for v in values])
        if not present.any():
            continue
        scores = values[present].astype(np.float64)
        kept = np.asarray([ledger_status.get(u) == "kept" for u, p in zip(uids, present) if p])
        cut = cuts.get(column)
        if cut is None and column == "clip_score" and kept.any() and (~kept).any():
            cut = float(scores[kept].min())  # keep_top: the lowest kept score marks the cut
        fig, ax = plt.subplots(figsize=(7, 2.6))
        ax.hist([scores[kept], scores[~kept]], bins=40, stacked=True, label=["kept", "not kept"],
                color=["#4a7bb7", "#d98b5f"])
        if cut is not None:
            ax.axvline(cut, color="black", linestyle="--", label=f"threshold {cut:.3f}")
            effective[column] = cut
        ax.set_xlabel(column)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
        charts.append(_png(fig))
    return "".join(charts), effective


def _balance_section(out: Path, manifest: Manifest) -> str:
    """Concept balancing: every entry's live rows before and rows kept after, by rank (log-log), the cap t drawn
    in; and the head entries' counts. Empty when the run has no balance stage."""
    path = out / DECISION_TABLES / "balance_entries.parquet"
    config = next((s for s in manifest.config.get("stages", []) if s.get("stage") == "balance"), None)
    if config is None or not path.exists():
        return ""
    import matplotlib.pyplot as plt

    table = pq.read_table(path)
    before = np.sort(table.column("rows").to_numpy())[::-1]
    after = np.sort(table.column("kept").to_numpy())[::-1]
    t = config.get("max_per_entry")
    fig, ax = plt.subplots(figsize=(7, 3))
    ranks = np.arange(1, len(before) + 1)
    ax.loglog(ranks, before, label="live rows before", color="#d98b5f")
    ax.loglog(ranks, np.maximum(after, 0.8), label="rows kept after", color="#4a7bb7")  # 0 kept drawn at the axis
    if t:
        ax.axhline(t, color="black", linestyle="--", linewidth=1, label=f"t = {t}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("rows holding the entry")
    ax.set_title(f"{len(before)} entries held by some caption")
    ax.legend(fontsize=8)
    head = table.take(pc.sort_indices(table, [("rows", "descending"), ("entry", "ascending")])).slice(0, 15)
    lines = "".join(f"<tr><td>{html.escape(r['entry'])}</td><td>{r['rows']}</td><td>{r['kept']}</td></tr>"
                    for r in head.to_pylist())
    return (f"<h2 id='balance'>Concept balance</h2>{_png(fig)}<table class='counts'><tr><th>entry</th>"
            f"<th>rows before</th><th>kept</th></tr>{lines}</table>")


def write_report(out: Path, path: Path) -> Path:
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise CurateError(f"{out}: no manifest.json; the run has not finished (run it again to resume)")
    ledger = read_ledger(out)
    rows = ledger.to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    status = {r["uid"]: r["status"] for r in rows}
    stored = _stored(out, ["uid", "clip_score", "itm_score", "synthetic_clip_score", "raw_clip_score",
                           "original_caption", "synthetic_caption", "caption_source"])
    rng = np.random.default_rng(0)

    # which rows get a thumbnail: a sample per reason, both sides of each threshold, duplicate groups, captions
    by_reason: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_reason[r["reason"] or r["status"]].append(r["uid"])
    gallery = {reason: sorted(rng.choice(uids, size=min(PER_GALLERY, len(uids)), replace=False).tolist())
               for reason, uids in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))}
    histograms, cuts = _histograms(stored, status, _thresholds(manifest))
    near: dict[str, tuple[list[str], list[str]]] = {}
    for column, cut in cuts.items():
        table = stored.filter(pc.is_valid(stored.column(column)))
        order = np.argsort(np.asarray(table.column(column).to_pylist()))
        uids = np.asarray(table.column("uid").to_pylist(), dtype=object)[order]
        values = np.sort(np.asarray(table.column(column).to_pylist()))
        split = int(np.searchsorted(values, cut))
        near[column] = (uids[max(0, split - NEAR):split].tolist(), uids[split:split + NEAR].tolist())
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("duplicate_of"):
            groups[r["duplicate_of"]].append(r["uid"])
    shown_groups = dict(sorted(groups.items(), key=lambda kv: -len(kv[1]))[:GROUPS])
    recaptioned = []
    if "synthetic_caption" in stored.column_names:
        table = stored.filter(pc.is_valid(stored.column("synthetic_caption")))
        recaptioned = table.slice(0, PER_GALLERY).to_pylist()
    wanted = {u for uids in gallery.values() for u in uids} | {u for a, b in near.values() for u in a + b} | \
        {u for k, v in shown_groups.items() for u in [k, *v]} | {r["uid"] for r in recaptioned}
    images = _images(out, wanted)

    sections = [f"<h2 id='funnel'>Funnel</h2>{_funnel_chart(manifest)}", _counts(manifest)]
    if histograms:
        sections.append(f"<h2 id='scores'>Scores</h2>{histograms}")
    balance = _balance_section(out, manifest)
    if balance:
        sections.append(balance)
    sections.append("<h2 id='reasons'>By reason</h2>")
    for reason, uids in gallery.items():
        cards = "".join(_card(by_uid[u], images.get(u), html.escape((by_uid[u].get("url") or "")[-48:]))
                        for u in uids)
        sections.append(f"<h3>{html.escape(reason)} ({len(by_reason[reason])} rows)</h3><div class='grid'>{cards}</div>")
    for column, (below, above) in near.items():
        score = dict(zip(stored.column("uid").to_pylist(), stored.column(column).to_pylist()))
        sections.append(f"<h2 id='near'>Around the {html.escape(column)} threshold ({cuts[column]:.3f})</h2>"
                        "<div class='pair'><div><h3>just below</h3><div class='grid'>"
                        + "".join(_card(by_uid[u], images.get(u), f"{score[u]:.3f}") for u in below)
                        + "</div></div><div><h3>just above</h3><div class='grid'>"
                        + "".join(_card(by_uid[u], images.get(u), f"{score[u]:.3f}") for u in above)
                        + "</div></div></div>")
    if shown_groups:
        sections.append("<h2 id='duplicates'>Duplicate groups</h2>")
        for survivor, members in shown_groups.items():
            cards = _card(by_uid[survivor], images.get(survivor), "<span class='keep'>kept</span>") + "".join(
                _card(by_uid[u], images.get(u), html.escape(by_uid[u]["reason"] or "")) for u in members)
            sections.append(f"<div class='grid group'>{cards}</div>")
    if recaptioned:
        lines = "".join(
            f"<tr><td>{_thumb(images.get(r['uid']))}</td><td>{html.escape(r.get('original_caption') or '')}</td>"
            f"<td>{html.escape(r.get('synthetic_caption') or '')}</td><td>{_fmt(r.get('raw_clip_score'))}</td>"
            f"<td>{_fmt(r.get('synthetic_clip_score'))}</td><td>{html.escape(r.get('caption_source') or '')}</td></tr>"
            for r in recaptioned)
        sections.append("<h2 id='captions'>Original and synthetic captions</h2><table class='captions'><tr>"
                        "<th></th><th>original</th><th>synthetic</th><th>raw score</th><th>synthetic score</th>"
                        f"<th>used</th></tr>{lines}</table>")
    sample = rows if len(rows) <= LEDGER_ROWS else [rows[i] for i in sorted(
        rng.choice(len(rows), size=LEDGER_ROWS, replace=False).tolist())]
    table_rows = [[r["uid"], r["status"], r["reason"] or "", r["url"] or "", (r["caption"] or "")[:200],
                   r.get("shard") or ""] for r in sample]
    sections.append(f"<h2 id='ledger'>Ledger ({len(sample)} of {len(rows)} rows)</h2>"
                    "<input id='search' type='search' placeholder='search uid, url or caption' size='60'>"
                    " <span id='matches'></span><table id='ledger-table'><thead><tr><th>uid</th><th>status</th>"
                    "<th>reason</th><th>url</th><th>caption</th><th>shard</th></tr></thead><tbody></tbody></table>"
                    f"<script id='ledger-data' type='application/json'>{_json_for_html(table_rows)}</script>")
    page = PAGE.format(title=html.escape(f"{manifest.pipeline}: {out}"), body="\n".join(sections), script=SCRIPT)
    path = Path(path)
    write_text_atomic(path, page)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ""


def _json_for_html(data: Any) -> str:
    # No '<', '>' or '&' reaches the page inside the script element: "</script" would close it early and "<!--<script"
    # would switch the HTML parser into a state that swallows the page's own script. JSON.parse reads them back.
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _counts(manifest: Manifest) -> str:
    items = "".join(f"<tr><td>{html.escape(reason)}</td><td>{count}</td>"
                    f"<td>{manifest.would_reject.get(reason, '')}</td></tr>"
                    for reason, count in manifest.totals_by_reason.items())
    status = ", ".join(f"{k} {v}" for k, v in manifest.totals_by_status.items())
    return (f"<p>{manifest.input_rows} rows in: {status}.</p><table class='counts'><tr><th>reason</th><th>rows</th>"
            f"<th>would reject on its own</th></tr>{items}</table>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ width: 150px; margin: 0; font-size: 11px; overflow-wrap: anywhere; }}
.card img, .nothumb {{ width: 96px; height: 96px; object-fit: contain; background: #eee; display: block; }}
.nothumb {{ line-height: 96px; text-align: center; color: #888; }}
.pair {{ display: flex; gap: 2em; }} .group {{ border-left: 3px solid #4a7bb7; padding-left: 8px; margin: 8px 0; }}
.keep {{ color: #fff; background: #2a8a3a; padding: 0 4px; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
.chart {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<nav><a href="#funnel">funnel</a> · <a href="#scores">scores</a> · <a href="#balance">balance</a> ·
<a href="#reasons">by reason</a> ·
<a href="#near">near the threshold</a> · <a href="#duplicates">duplicates</a> · <a href="#captions">captions</a> ·
<a href="#ledger">ledger</a></nav>
{body}
<script>{script}</script>
</body></html>
"""

SCRIPT = """
const rows = JSON.parse(document.getElementById('ledger-data').textContent);
const body = document.querySelector('#ledger-table tbody');
const matches = document.getElementById('matches');
function show(query) {
  const q = query.toLowerCase();
  const hits = q ? rows.filter(r => r[0].includes(q) || r[3].toLowerCase().includes(q) || r[4].toLowerCase().includes(q)) : rows;
  body.replaceChildren(...hits.slice(0, 200).map(r => {
    const tr = document.createElement('tr');
    for (const value of r) { const td = document.createElement('td'); td.textContent = value; tr.appendChild(td); }
    return tr;
  }));
  matches.textContent = hits.length + ' rows' + (hits.length > 200 ? ' (first 200 shown)' : '');
}
document.getElementById('search').addEventListener('input', e => show(e.target.value));
show('');
"""
