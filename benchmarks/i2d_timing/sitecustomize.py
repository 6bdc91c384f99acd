"""Put on PYTHONPATH by benchmarks/download.py for img2dataset's run only: times each of its per-URL fetches
(`download_image_with_retry`, retries included, as curate's `fetch_seconds` is) in every process it spawns and
appends the seconds to $CURATE_BENCH_LATENCY_DIR/<pid>.txt. Measurement only; img2dataset's code runs unchanged."""

import importlib.abc
import importlib.machinery
import os
import sys
import time

_TARGET = "img2dataset.downloader"


def _instrument(module) -> None:
    original = module.download_image_with_retry
    log = open(os.path.join(os.environ["CURATE_BENCH_LATENCY_DIR"], f"{os.getpid()}.txt"), "a", buffering=1)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            log.write(f"{time.perf_counter() - start:.6f}\n")

    module.download_image_with_retry = timed


class _Loader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _instrument(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("CURATE_BENCH_LATENCY_DIR"):
    sys.meta_path.insert(0, _Finder())
