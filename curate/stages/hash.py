"""The hash stage: per-sample fingerprints that the dedup tiers decide over later.

``pixel_sha256`` is the digest of the decoded pixels (with their size), so the same picture re-wrapped in another
container or re-saved losslessly matches even when the bytes (``sha256``, from the download stage) differ.
``phash`` is imagehash's 64-bit DCT perceptual hash, stored as a signed int64 (the same 64 bits): re-encodes,
resizes and small edits land within a few bits of each other. pHash sees only luminance, so a red star and a green
star of the same brightness hash alike: ``color_signature`` (the mean RGB of a 4 × 4 grid, 48 bytes) lets the pHash
tier tell them apart.

The ``content_*`` columns fingerprint what is drawn rather than the whole canvas (curate.dedup.fingerprints): hashes of
the content box and of its centre and mirror views, a thumbnail and a colour grid for the second check the pHash
tier makes before it links two rows, and ``content_fraction`` for the rules stage's low-information rule.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa

from pydantic import Field

from curate.dedup.fingerprints import content_print
from curate.config import Resources, StageConfig
from curate.core.stage import RowOutcomes, Stage
from curate.core.decoded import stored_rgb


class HashConfig(StageConfig):
    stage: Literal["hash"] = "hash"
    resources: Resources = Field(default_factory=lambda: Resources(cpus=0.5, batch_size=256))


def phash_bits(image: object) -> int:
    """imagehash.phash as a signed 64-bit int (row-major bits, first bit most significant)."""
    import imagehash

    bits = np.packbits(imagehash.phash(image).hash.flatten())  # 8 bytes, big-endian bit order
    return int(np.frombuffer(bits.tobytes(), dtype=">i8")[0])


def pixel_digest(rgb: object) -> str:
    width, height = rgb.size  # type: ignore[attr-defined]
    return hashlib.sha256(f"{width}x{height}:".encode() + rgb.tobytes()).hexdigest()  # type: ignore[attr-defined]


def color_signature(rgb: object) -> bytes:
    from PIL import Image

    return rgb.resize((4, 4), Image.Resampling.BOX).tobytes()  # type: ignore[attr-defined]


class HashStage(Stage[HashConfig]):
    name = "hash"
    Config = HashConfig
    funnel = (("hash", "hashed"),)

    def inputs(self) -> list[str]:
        return ["image"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {"phash": pa.int64(), "pixel_sha256": pa.string(), "color_signature": pa.binary(),
                "content_phash": pa.list_(pa.int64()), "content_thumbnail": pa.binary(),
                "content_colors": pa.binary(), "content_fraction": pa.float32()}

    def process(self, batch: pa.Table) -> pa.Table:
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        for i, data in enumerate(batch.column("image").to_pylist()):
            try:
                rgb = stored_rgb(data)
            except Exception:  # the stored image was written by the download stage: this is rare, never fatal
                outcomes.fail(i, "hash:undecodable")
                continue
            outcomes.set(i, "phash", phash_bits(rgb))
            outcomes.set(i, "pixel_sha256", pixel_digest(rgb))
            outcomes.set(i, "color_signature", color_signature(rgb))
            content = content_print(rgb)
            outcomes.set(i, "content_phash", content.phashes)
            outcomes.set(i, "content_thumbnail", content.thumbnail)
            outcomes.set(i, "content_colors", content.colors)
            outcomes.set(i, "content_fraction", content.fraction)
        return outcomes.apply(batch)
