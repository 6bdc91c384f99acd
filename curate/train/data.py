"""Shards as training batches, with open_clip's conventions: image + caption per sample, the model's own train
transform and tokenizer, shards shuffled per epoch, a shuffle buffer, loader workers.

Works on curate's shards in either output format — WebDataset tars, or parquet shards holding the image bytes —
on img2dataset / DataComp tars (``{key}.jpg|png|webp`` + ``{key}.txt``) and on parquet files with an image column
(bytes, or Hugging Face's ``{bytes, path}``) and a caption (``caption``, ``txt`` or ``text``). A run folder is read
through its manifest. A sample that does not decode is skipped and counted, never a crash. The stream is deterministic given (seed, epoch), so a
resumed run skips the batches its epoch already consumed and continues with the same data.
"""

from __future__ import annotations

import glob
import io
import random
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "txt", "text")
PARQUET_ROWS = 256  # rows read at a time from a parquet shard (images are bytes: bounded memory)
BAD = "bad sample"  # what a sample that does not decode becomes (webdataset's map drops a None silently)


def shard_list(spec: str | list[str] | None) -> list[str]:
    """Shard paths (all .tar or all .parquet) from a folder, a glob, one path, or a list of any of these; sorted,
    at least one. A curate run folder gives the shards its manifest lists."""
    if not spec:
        raise CurateError("data: no shards given (set data: in the config or pass --data)")
    paths: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _shards_in(path)
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(str(path), recursive=True))
        else:
            found = [str(path)] if path.is_file() else []
        if not found:
            raise CurateError(f"data: no .tar shards (nor .parquet shards) at {item}")
        paths += found
    kinds = {Path(p).suffix for p in paths}
    if len(kinds) > 1 or not kinds <= {".tar", ".parquet"}:
        raise CurateError(f"data: shards are .tar or .parquet, one format per run; got {', '.join(sorted(kinds))}")
    return paths


def _shards_in(folder: Path) -> list[str]:
    """A run folder's shards (its manifest), else the tars under the folder, else its parquet files with images."""
    from curate.core.ledger import read_manifest

    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        return [str(folder / shard.path) for shard in manifest.shards] if manifest else []
    tars = sorted(str(p) for p in folder.rglob("*.tar"))
    if tars:
        return tars
    import pyarrow.parquet as pq

    return [str(p) for p in sorted(folder.rglob("*.parquet"))
            if _image_column(pq.read_schema(p).names) is not None]


def _image_column(names: list[str]) -> str | None:
    return next((c for c in ("image", *IMAGE_KEYS) if c in names), None)


def parquet_samples(url: str) -> Iterator[dict[str, Any]]:
    """A parquet shard's rows as WebDataset-style samples (__key__, __url__, an image extension, txt), a few hundred
    rows in memory at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(url)
    names = parquet.schema_arrow.names
    image, caption = _image_column(names), next((c for c in CAPTION_COLUMNS if c in names), None)
    if image is None or caption is None:
        raise CurateError(f"{url}: a parquet shard needs an image column (image, jpg, png, ...) and a caption "
                          f"({', '.join(CAPTION_COLUMNS)}); it has {', '.join(names[:12])}")
    key = next((c for c in ("key", "uid") if c in names), None)
    columns = [c for c in {image, caption, key, "image_ext" if "image_ext" in names else None} if c]
    position = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=columns):
        rows = batch.to_pydict()
        for i in range(batch.num_rows):
            data = rows[image][i]
            data = data.get("bytes") if isinstance(data, dict) else data  # datasets' Image(): {bytes, path}
            ext = (rows.get("image_ext") or [None] * batch.num_rows)[i]
            yield {"__key__": str(rows[key][i]) if key else f"{position:09d}", "__url__": url,
                   ext if ext in IMAGE_KEYS else "jpg": data or b"",
                   "txt": (rows[caption][i] or "").encode("utf-8")}
            position += 1


def _parquet_to_samples(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The pipeline stage that turns shard URLs into samples; an unreadable parquet costs its samples, not the run
    (as webdataset's warn_and_continue does for tars)."""
    import pyarrow as pa

    for shard in src:
        try:
            yield from parquet_samples(shard["url"])
        except (OSError, pa.ArrowException, CurateError) as err:
            warnings.warn(f"skipping {shard['url']}: {err}", stacklevel=2)


@dataclass
class Batch:
    images: Any  # float tensor (n, 3, H, W)
    texts: Any  # long tensor (n, context_length)
    skipped: int  # samples of this stretch of the stream that did not decode


def _decode(sample: dict[str, Any], preprocess: Callable, tokenize: Callable, stream_seed: str) -> tuple | str:
    import torch
    from PIL import Image

    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "txt" not in sample:
        return BAD
    # The random crop of a sample is a function of (seed, epoch, shard, key) alone, and drawing it leaves the
    # training RNG untouched: a resumed run, or one with another number of loader workers, sees the same pixels.
    shard = str(sample.get("__url__") or "").rsplit("/", 1)[-1]  # the name, not the folder: runs elsewhere agree
    sample_seed = zlib.crc32(f"{stream_seed}:{shard}:{sample.get('__key__')}".encode())
    try:
        with Image.open(io.BytesIO(sample[key])) as img, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            pixels = preprocess(img.convert("RGB"))
        caption = sample["txt"].decode("utf-8", "replace")
    except Exception:  # a bad sample is skipped and counted, whatever Pillow raised
        return BAD
    return pixels, tokenize([caption])[0]


def _collate(samples: list[tuple | str]) -> Batch | None:
    import torch

    good = [s for s in samples if s is not BAD]
    if len(good) < 2:  # a contrastive batch needs negatives
        return Batch(None, None, len(samples) - len(good)) if samples else None
    return Batch(torch.stack([s[0] for s in good]), torch.stack([s[1] for s in good]), len(samples) - len(good))


def _every_nth(rank: int, world: int) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Rank r of w keeps samples r, r+w, ...: every rank reads the same deterministic stream, so the ranks' parts
    are disjoint and together cover it, whatever the number of shards."""
    def select(samples: Iterator[dict]) -> Iterator[dict]:
        for index, sample in enumerate(samples):
            if index % world == rank:
                yield sample

    return select


def epoch_batches(urls: list[str], preprocess: Callable, tokenize: Callable, *, batch_size: int, shuffle_buffer: int,
                  seed: int, epoch: int, workers: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """One pass over the shards: shard order shuffled by (seed, epoch), samples through a seeded buffer; with
    several training ranks, this rank's share of the samples."""
    import torch
    import webdataset as wds

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=len(urls), seed=seed, epoch=epoch),
        wds.split_by_worker,
        _parquet_to_samples if urls[0].endswith(".parquet")
        else wds.tarfile_to_samples(handler=wds.warn_and_continue),  # an unreadable tar costs its samples
        *([_every_nth(rank, world)] if world > 1 else []),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed * 1_000_003 + epoch)),
        wds.map(lambda sample: _decode(sample, preprocess, tokenize, f"{seed}:{epoch}")),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    # its own generator: starting an epoch's loader must not draw from the training RNG
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=min(workers, len(urls)),
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    for batch in loader:
        if batch is not None:
            yield batch
