"""Stored images decoded once per worker process: the per-sample stages that run one after another in a process
(every stage of an in-process run, or stages Ray Data fuses into one task) share a row's RGB image instead of each
decoding the stored bytes again (hash, score and caption all read them).

Keyed by the stored bytes themselves (equal bytes decode to equal pixels, so sharing changes no result); bounded by
the pixels held, least recently used out first. A stage must not modify the image it gets: PIL's ``convert``,
``resize`` and ``crop`` return new images.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

# ~100 MB of RGB: a batch of 256 images of 256 x 256 pixels, or 64 of 512 x 512, per process
MAX_PIXELS = 32 * 2**20


class DecodedImages:
    def __init__(self, max_pixels: int = MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self._images: OrderedDict[bytes, Image.Image] = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()  # the score stage decodes in a thread pool
        self.decoded = self.reused = 0

    def rgb(self, data: bytes) -> Image.Image:
        """The RGB image the stored bytes hold (raises what PIL raises for bytes that do not decode)."""
        with self._lock:
            image = self._images.get(data)
            if image is not None:
                self._images.move_to_end(data)
                self.reused += 1
                return image
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
        size = image.width * image.height
        with self._lock:
            self.decoded += 1
            if size <= self.max_pixels and data not in self._images:
                self._images[data] = image
                self._pixels += size
                while self._pixels > self.max_pixels:
                    _, old = self._images.popitem(last=False)
                    self._pixels -= old.width * old.height
        return image

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._pixels = 0
            self.decoded = self.reused = 0


STORED = DecodedImages()


def stored_rgb(data: bytes) -> Image.Image:
    """A stored image as RGB, decoded once per process while it stays among the recently used."""
    return STORED.rgb(data)
