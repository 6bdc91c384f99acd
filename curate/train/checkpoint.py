"""Checkpoints: a folder any ClipSpec and open_clip's ``local-dir:`` load (open_clip_config.json + safetensors),
plus ``train_state.pt`` (optimizer, step, data position, RNG, loss scaler, objectives) for resuming. Everything loads with
``weights_only=True``; the newest complete one is named in ``latest.json``, written last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from curate.core.atomic import atomic_file, write_text_atomic

from curate.models.clip import CONFIG_FILE, save_checkpoint_dir

STATE_FILE, LATEST = "train_state.pt", "latest.json"


def save(out: Path, step: int, model: Any, model_cfg: dict, optimizer: Any, position: dict[str, int],
         train_config: dict, keep: int, itm_head: Any = None, tokenizer: Any = None,
         extra_state: dict[str, Any] | None = None) -> Path:
    import torch

    folder = Path(out) / "checkpoints" / f"step_{step:08d}"
    curate = {"step": step, "train_config": train_config}
    if itm_head is not None:
        curate["itm_head"] = itm_head.shape
    save_checkpoint_dir(model, model_cfg, folder, extra={"curate": curate}, tokenizer=tokenizer)
    if itm_head is not None:
        from curate.models.itm import save_head

        save_head(itm_head, folder)
    state = {"optimizer": optimizer.state_dict(), "step": step, **position, **(extra_state or {})}
    with atomic_file(folder / STATE_FILE) as handle:
        torch.save(state, handle)
    write_text_atomic(Path(out) / LATEST, json.dumps({"step": step, "checkpoint": str(folder.relative_to(out))}))
    for old in sorted((Path(out) / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder under out, or None."""
    path = Path(out) / LATEST
    if not path.exists():
        return None
    folder = Path(out) / json.loads(path.read_text())["checkpoint"]
    return folder if (folder / STATE_FILE).exists() and (folder / CONFIG_FILE).exists() else None


def load_state(folder: Path) -> dict[str, Any]:
    import torch

    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
