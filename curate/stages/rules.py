"""Rule filters over stored metadata, as in DataComp's basic filtering: caption length, image size and shape, caption
language, and captions that are no description at all (file names, URLs, placeholders, mostly non-letters); and two
that real pools need (measured on the development pool, benchmarks/efficacy.py): images that show next to nothing
(a transparent PNG flattened to white, one flat colour, a speck on a page: the hash stage's ``content_fraction``)
and boilerplate, the same caption on many different images ("Royalty free stock illustration").

Every rule that is set is evaluated on every row: a row is filtered with the reason of the first rule it fails (in
the order below), and the manifest counts, per rule, every row that rule would have rejected on its own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
from pydantic import Field

from curate.core.pool import Pool
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

# Captions that describe nothing; compared after lower-casing and stripping punctuation and digits.
PLACEHOLDERS = frozenset({
    "image", "images", "photo", "photos", "picture", "pictures", "img", "untitled", "no title", "no description",
    "description", "thumbnail", "thumb", "placeholder", "null", "none", "n a", "na", "undefined", "default",
    "image not found", "no image", "no image available", "click to enlarge", "click here", "stock photo",
    "alt", "alt text", "logo", "icon", "banner", "screenshot", "jpg", "jpeg", "png", "gif",
})
# Matched against the stripped caption only, with no two adjacent parts that can match the same characters
# (a leading \s* before a class holding spaces backtracked quadratically: 32k spaces took 1.5 s, 1 MB ~25 min).
FILE_NAME = re.compile(r"[\w\-. ()\[\]]*\.(jpe?g|png|gif|webp|bmp|tiff?|heic|svg)", re.IGNORECASE)
CAMERA_NAME = re.compile(r"(img|dsc|dscn|dcim|pxl|mvimg|photo|image|screenshot)[\s_\-]*\d[\w\-]*", re.IGNORECASE)
URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
LONGEST_NAME = 1024  # a file or camera name, or a bare URL worth calling junk, is shorter than this
NOT_LETTERS = re.compile(r"[^a-z ]+")


class RulesConfig(StageConfig):
    stage: Literal["rules"] = "rules"
    min_words: int | None = Field(None, ge=1, description="fewer words in the caption: rule:caption_too_short")
    max_words: int | None = Field(None, ge=1, description="more words: rule:caption_too_long")
    min_chars: int | None = Field(None, ge=1, description="fewer characters: rule:caption_too_short")
    max_chars: int | None = Field(None, ge=1, description="more characters: rule:caption_too_long")
    junk_captions: bool = Field(False, description="file names, camera names, bare URLs, placeholders "
                                "('image', 'untitled', ...): rule:caption_junk")
    min_letter_share: float | None = Field(None, gt=0, le=1, description="captions whose share of letters among "
                                           "non-space characters is lower: rule:caption_non_letters")
    min_image_side: int | None = Field(None, ge=1, description="original image's shorter side below this: "
                                       "rule:image_too_small")
    max_aspect_ratio: float | None = Field(None, ge=1, description="original image's longer/shorter side above "
                                           "this: rule:aspect_ratio")
    languages: list[str] | None = Field(None, min_length=1, description="ISO 639-1 codes; a caption detected as "
                                        "another language (langid, its model ships in the package): rule:language")
    language_min_chars: int = Field(12, ge=1, description="shorter captions are not judged by language (a "
                                    "detector guesses on a few words)")
    min_content_fraction: float | None = Field(None, gt=0, le=1, description="images whose share of pixels unlike "
                                               "their background is lower (the hash stage's content_fraction): "
                                               "rule:low_information. On the development pool every planted "
                                               "near-blank image is under 0.002 and every real picture, line art "
                                               "included, over 0.012")
    boilerplate_captions: bool = Field(False, description="a caption (compared lower-cased, without digits and "
                                       "punctuation) on more different images than boilerplate_min_images and "
                                       "boilerplate_share of the live rows: rule:boilerplate_caption")
    boilerplate_min_images: int = Field(10, ge=2, description="a caption is boilerplate only on more different "
                                        "images than this")
    boilerplate_share: float = Field(1e-4, gt=0, le=1, description="and this share of the live rows (100 at 1M "
                                     "rows, 100k at 1B)")


def _words(caption: str) -> int:
    return len(caption.split())


def is_junk(caption: str) -> bool:
    stripped = caption.strip()
    if len(stripped) <= LONGEST_NAME and any(p.fullmatch(stripped) for p in (FILE_NAME, CAMERA_NAME, URL)):
        return True
    return NOT_LETTERS.sub(" ", caption.lower()).split() == [] or \
        " ".join(NOT_LETTERS.sub(" ", caption.lower()).split()) in PLACEHOLDERS


PICTURE_COLUMNS = ("pixel_sha256", "sha256")
WORDS_ONLY = re.compile(r"[^\w\s]|\d|_")


def caption_key(caption: str) -> str:
    """A caption as boilerplate is compared: lower case, no digits or punctuation, single spaces ("Photo #12: Stock
    image!" and "photo 13 stock image" are one)."""
    return " ".join(WORDS_ONLY.sub(" ", caption.lower()).split())


def _pictures(metadata: pa.Table) -> pa.Array:
    """Each row's picture identity: the decoded-pixel digest, else the bytes' digest, else the row itself."""
    for name in PICTURE_COLUMNS:
        if name in metadata.column_names:
            column = metadata.column(name).combine_chunks()
            return pa.compute.coalesce(column, pa.array([f"row:{i}" for i in range(metadata.num_rows)]))
    return pa.array([f"row:{i}" for i in range(metadata.num_rows)])


def boilerplate(captions: list[str], pictures: pa.Array, config: RulesConfig) -> np.ndarray:
    """Rows whose caption is on more different pictures than the pool-relative threshold (copies of one picture
    count once: they are dedup's, not boilerplate). Counted by Arrow's group-by, not a set per caption."""
    import pyarrow.compute as pc

    threshold = max(config.boilerplate_min_images, config.boilerplate_share * len(captions))
    keys = pa.array([caption_key(c) for c in captions], pa.string())
    counts = pa.table({"key": keys, "picture": pictures}).group_by("key").aggregate([("picture", "count_distinct")])
    common = counts.filter(pc.and_(pc.greater(counts.column("picture_count_distinct"), threshold),
                                   pc.not_equal(counts.column("key"), "")))
    return pc.is_in(keys, value_set=common.column("key")).to_numpy(zero_copy_only=False)


def letter_share(caption: str) -> float:
    visible = [c for c in caption if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0


class RuleFilter(GlobalStage[RulesConfig]):
    name = "rules"
    Config = RulesConfig
    counts_would_reject: ClassVar[bool] = True
    fans_out: ClassVar[bool] = True  # language detection over a large pool is worth the cluster's CPUs

    def inputs(self) -> list[str]:
        config: RulesConfig = self.config
        image = config.min_image_side is not None or config.max_aspect_ratio is not None
        return ["caption"] + (["original_width", "original_height"] if image else []) + \
            (["content_fraction"] if config.min_content_fraction is not None else [])

    def optional_inputs(self) -> list[str]:
        """The picture a boilerplate caption is counted on: its decoded pixels, else its bytes."""
        return list(PICTURE_COLUMNS) if self.config.boilerplate_captions else []

    def rules(self, metadata: pa.Table) -> list[tuple[str, np.ndarray]]:
        """(reason, mask of rows the rule rejects) for every rule that is set, in order."""
        config: RulesConfig = self.config
        captions = [c or "" for c in metadata.column("caption").to_pylist()]

        def over(fn: Callable[[str], bool]) -> np.ndarray:
            return np.fromiter((fn(c) for c in captions), dtype=bool, count=len(captions))

        out: list[tuple[str, np.ndarray]] = []
        words = np.fromiter((_words(c) for c in captions), dtype=np.int64, count=len(captions))
        chars = np.fromiter((len(c.strip()) for c in captions), dtype=np.int64, count=len(captions))
        short = np.zeros(len(captions), bool)
        long = np.zeros(len(captions), bool)
        if config.min_words is not None:
            short |= words < config.min_words
        if config.min_chars is not None:
            short |= chars < config.min_chars
        if config.max_words is not None:
            long |= words > config.max_words
        if config.max_chars is not None:
            long |= chars > config.max_chars
        if config.min_words is not None or config.min_chars is not None:
            out.append(("rule:caption_too_short", short))
        if config.max_words is not None or config.max_chars is not None:
            out.append(("rule:caption_too_long", long))
        if config.junk_captions:
            out.append(("rule:caption_junk", over(is_junk)))
        if config.min_letter_share is not None:
            out.append(("rule:caption_non_letters", over(lambda c: letter_share(c) < config.min_letter_share)))
        if config.min_image_side is not None or config.max_aspect_ratio is not None:
            width = metadata.column("original_width").to_numpy(zero_copy_only=False).astype(np.float64)
            height = metadata.column("original_height").to_numpy(zero_copy_only=False).astype(np.float64)
            if config.min_image_side is not None:
                out.append(("rule:image_too_small", np.minimum(width, height) < config.min_image_side))
            if config.max_aspect_ratio is not None:
                ratio = np.maximum(width, height) / np.maximum(np.minimum(width, height), 1)
                out.append(("rule:aspect_ratio", ratio > config.max_aspect_ratio))
        if config.languages:
            out.append(("rule:language", self._other_language(captions, config)))
        if config.min_content_fraction is not None:
            fraction = metadata.column("content_fraction").to_numpy(zero_copy_only=False).astype(np.float64)
            out.append(("rule:low_information", np.nan_to_num(fraction, nan=1.0) < config.min_content_fraction))
        if config.boilerplate_captions:
            out.append(("rule:boilerplate_caption", boilerplate(captions, _pictures(metadata), config)))
        return out

    @staticmethod
    def _other_language(captions: list[str], config: RulesConfig) -> np.ndarray:
        import langid

        allowed = set(config.languages or [])
        return np.fromiter((len(c.strip()) >= config.language_min_chars and langid.classify(c)[0] not in allowed
                            for c in captions), dtype=bool, count=len(captions))

    def decide_pool(self, pool: Pool) -> Removals:
        """Each group of parts judged in its own task (the rules are about one row at a time): the driver receives
        the removed rows and the counts. Boilerplate captions are counted over the whole pool, so with that rule on
        the columns are gathered instead."""
        if self.config.boilerplate_captions:
            return super().decide_pool(pool)
        pieces = pool.map(_judge_group, self.config, sorted({"uid", *self.inputs()}))
        if not pieces:  # an empty pool: every rule that is set, counted zero
            return super().decide_pool(pool)
        would_reject: Counter[str] = Counter()
        for _, counts in pieces:
            would_reject.update(counts)
        removed = pa.concat_tables([table for table, _ in pieces])
        return Removals.of(removed.column("uid").to_pylist(), removed.column("reason").to_pylist(),
                           rows=removed.column("row").to_numpy(), would_reject=dict(would_reject))

    def judge(self, metadata: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
        """Each row's reason (None: it passes every rule; else the first rule it fails) and, per rule, the rows it
        rejects on its own."""
        reasons = np.full(metadata.num_rows, None, dtype=object)
        would_reject = {}
        for reason, rejected in self.rules(metadata):
            would_reject[reason] = int(rejected.sum())
            reasons[rejected & (reasons == None)] = reason  # noqa: E711 (elementwise): the first rule failed wins
        return reasons, would_reject

    def decide(self, metadata: pa.Table) -> Removals:
        reasons, would_reject = self.judge(metadata)
        removed = np.flatnonzero(reasons != None)  # noqa: E711
        uids = np.asarray(metadata.column("uid").to_pylist(), dtype=object)
        return Removals.of(uids[removed].tolist(), reasons[removed].tolist(), would_reject=would_reject)


def _judge_group(config: RulesConfig, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """A map task: the group's removed rows (uid, row, reason) and each rule's count of rows it rejects (the task
    gets the config, not the stage: nothing else of the driver's travels)."""
    reasons, would_reject = RuleFilter(config).judge(table)
    removed = reasons != None  # noqa: E711
    picked = table.select(["uid", "row"]).filter(pa.array(removed))
    return picked.append_column("reason", pa.array(reasons[removed].tolist(), pa.string())), would_reject
