"""The batch size that fills the card: the GPU benchmarks try sizes in turn and keep the fastest."""

from __future__ import annotations

from collections.abc import Callable


def fill_the_card(sizes: list[int], rate_of: Callable[[int], float], label: str, device: str) -> tuple[int, float]:
    """(size, rate) of the fastest of ``sizes``, tried in turn until one runs out of memory, is slower than the one
    before, or gains less than 5% on it (a card already full)."""
    import torch

    best_size, best_rate = sizes[0], 0.0
    for size in sizes:
        try:
            rate = rate_of(size)
        except torch.OutOfMemoryError:
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{label}, batch {size}: {rate:.1f}/s", flush=True)
        if rate <= best_rate:
            break
        gained = rate >= best_rate * 1.05
        best_size, best_rate = size, rate
        if not gained:
            break
    return best_size, best_rate
