"""`curate open-clip-train ARGS...`: open_clip's own trainer (``open_clip_train.main``) on curate's shards.

Why a bridge: from webdataset 0.2.9x on, ``tar_file_expander`` yields an empty end-of-shard marker (``{}``, its
``eof_value``) after each tar, so that samples of two shards never merge. open_clip_train 3.3.0 feeds that stream
to its own ``group_by_keys_nothrow``, which reads ``filesample["fname"]`` from every item and fails on the marker
(``KeyError: 'fname'``) on any WebDataset tar, curate's or not. The bridge runs the same trainer with the markers
dropped before its grouping (it already starts a new sample when the key changes, so shards still never merge), and
registers curate's bundled architectures (``curate-tiny``, ``curate-small``, ``curate-tiny-coca``) with open_clip
so ``--model curate-tiny`` works. Every argument goes to open_clip_train unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def without_end_markers(expander: Callable[..., Iterator[dict]]) -> Callable[..., Iterator[dict]]:
    """``expander`` with the items that are not files (webdataset's end-of-shard markers) left out."""

    def expand(data: Any, *args: Any, **kwargs: Any) -> Iterator[dict]:
        for sample in expander(data, *args, **kwargs):
            if "fname" in sample:
                yield sample

    expand.__wrapped__ = expander  # type: ignore[attr-defined]
    return expand


def patch_open_clip_train() -> None:
    """Make open_clip_train read webdataset's streams of this version; register curate's architectures."""
    import open_clip
    import open_clip_train.data as data

    from curate.models.clip import BUNDLED_CONFIGS

    if not hasattr(data.tar_file_expander, "__wrapped__"):
        data.tar_file_expander = without_end_markers(data.tar_file_expander)
    open_clip.add_model_config(BUNDLED_CONFIGS)


def run_open_clip_train(argv: list[str]) -> int:
    from curate.errors import CurateError

    try:
        from open_clip_train.main import main
    except ImportError:
        raise CurateError("open-clip-train: open_clip's trainer is not installed (pip install 'open-clip-torch[training]' "
                          "or pip install open_clip_train)") from None
    patch_open_clip_train()
    main(argv)
    return 0
