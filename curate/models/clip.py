"""The open_clip model family: loading CLIP models through open_clip's own loading code.

A model is named by a ``ClipSpec`` (which also names models of other families: ``family: transformers`` or a
``transformers:`` prefix, curate.models.scorer). For open_clip, its model is:

- an open_clip architecture with a pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``: downloaded where the hub is
  reachable) or a path to a weights file (``pretrained: /ckpt/epoch_5.pt``);
- ``hf-hub:org/repo`` (open_clip_config.json and weights from the hub);
- a local checkpoint folder (``local-dir:/path`` or just the path): open_clip_config.json + weights, the layout the
  bundled trainer and open_clip's push_to_hub write;
- a custom architecture: ``architecture_file: tiny.json`` registers that model-config JSON under its file stem.

Weights load with ``torch.load(weights_only=True)`` or safetensors only: a checkpoint carrying pickled objects is
refused with a message, never unpickled. Nothing here imports torch until a model is actually loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.core.atomic import atomic_folder
from curate.errors import CurateError
from curate.models.scorer import AUTO, ModelFamily, Scorer

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
FOLDER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip's local-dir loader looks for
NOT_MODEL_WEIGHTS = ("itm_head.safetensors",)  # other files a curate checkpoint folder holds
# Architectures that ship with curate (tiny ones for tests, demos and CPU benchmarks), by file stem.
BUNDLED_CONFIGS = Path(__file__).parent / "configs"
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


@dataclass(frozen=True)
class ClipSpec:
    model: str
    pretrained: str | None = None
    architecture_file: str | None = None
    family: str = AUTO  # a name in curate.models.scorer.FAMILIES; auto: the family that claims the model

    def __post_init__(self) -> None:
        from curate.models.scorer import FAMILIES, resolve_family

        prefix = self.model.split(":", 1)[0]
        if prefix in FAMILIES and ":" in self.model:  # "transformers:/path" as stored in clip_model
            object.__setattr__(self, "model", self.model.split(":", 1)[1])
            object.__setattr__(self, "family", prefix)
        if self.family == AUTO:
            object.__setattr__(self, "family", resolve_family(self))

    def open_clip_name(self) -> str:
        """The name open_clip's create_model gets: a bare folder path becomes ``local-dir:<absolute path>``."""
        if self.model.startswith((HF_HUB, LOCAL_DIR)):
            if self.model.startswith(LOCAL_DIR):
                return LOCAL_DIR + str(Path(self.model[len(LOCAL_DIR):]).expanduser().resolve())
            return self.model
        if Path(self.model).expanduser().is_dir():
            return LOCAL_DIR + str(Path(self.model).expanduser().resolve())
        return self.model

    def describe(self) -> str:
        """What a score was computed with, as stored beside it: ``ViT-B-32/laion2b_s34b_b79k``, ``hf-hub:org/x``,
        ``local-dir:/abs/path``; another family's models as ``<family>:<hub id or absolute path>``."""
        if self.family != "open_clip":
            folder = Path(self.model).expanduser()
            return f"{self.family}:{folder.resolve() if folder.exists() else self.model}"
        name = self.open_clip_name()
        if name.startswith((HF_HUB, LOCAL_DIR)) or not self.pretrained:
            return name
        tag = str(Path(self.pretrained).expanduser().resolve()) if _looks_like_path(self.pretrained) else self.pretrained
        return f"{name}/{tag}"


def _looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or "/" in value or Path(value).expanduser().exists()


def builtin_architectures() -> list[str]:
    """open_clip's architecture names, read from its model_configs folder without importing it (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        raise CurateError("open_clip is not installed: pip install open-clip-torch")
    return sorted(p.stem for p in (Path(spec.origin).parent / "model_configs").glob("*.json"))


def bundled_architecture(name: str) -> Path | None:
    path = BUNDLED_CONFIGS / f"{name}.json"
    return path if path.is_file() else None


def check_spec(spec: ClipSpec) -> None:
    """Checks what can be checked without torch or the network; raises ValueError with a message to act on."""
    name = spec.open_clip_name()
    if name.startswith(HF_HUB):
        if not name[len(HF_HUB):].strip("/") or name.count("/") != 1:
            raise ValueError(f"'{spec.model}': an hf-hub id looks like 'hf-hub:org/repo'")
        return
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"'{spec.model}': no open_clip_config.json in {folder} (a checkpoint folder holds "
                             "open_clip_config.json and the weights)")
        try:
            config = json.loads((folder / "open_clip_config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"'{spec.model}': {folder}/open_clip_config.json is not readable JSON ({err})") from None
        if not isinstance(config, dict) or "model_cfg" not in config:
            raise ValueError(f"'{spec.model}': {folder}/open_clip_config.json has no model_cfg")
        if not _folder_weights(folder):
            raise ValueError(f"'{spec.model}': no weights file ({', '.join(FOLDER_WEIGHT_SUFFIXES)}) in {folder}")
        return
    if name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"checkpoint folder {spec.model} does not exist")
    known = builtin_architectures() + [p.stem for p in BUNDLED_CONFIGS.glob("*.json")]
    if spec.architecture_file:
        path = Path(spec.architecture_file).expanduser()
        if not path.is_file():
            raise ValueError(f"architecture_file {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"architecture_file {path} is not a readable JSON model config ({err})") from None
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
            raise ValueError(f"architecture_file {path}: a model config needs embed_dim, vision_cfg and text_cfg")
        known.append(path.stem)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; closest known: {', '.join(close)}" if close else "; `open_clip.list_models()` lists them"
        raise ValueError(f"unknown architecture '{spec.model}'{hint}")
    if spec.pretrained and _looks_like_path(spec.pretrained) and not Path(spec.pretrained).expanduser().is_file():
        raise ValueError(f"pretrained weights file {spec.pretrained} does not exist")


def architecture_config(spec: ClipSpec) -> dict | None:
    """The model config a spec builds (read from JSON, no torch), or None where it lives on the hub."""
    name = spec.open_clip_name()
    if name.startswith(HF_HUB):
        return None
    if name.startswith(LOCAL_DIR):
        path = Path(name[len(LOCAL_DIR):]) / CONFIG_FILE
        config = json.loads(path.read_text()) if path.is_file() else {}
        return config.get("model_cfg", config)
    if spec.architecture_file:
        return json.loads(Path(spec.architecture_file).expanduser().read_text())
    bundled = bundled_architecture(name)
    if bundled is not None:
        return json.loads(bundled.read_text())
    origin = importlib.util.find_spec("open_clip")
    path = Path(origin.origin).parent / "model_configs" / f"{name}.json" if origin and origin.origin else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _folder_weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in FOLDER_WEIGHT_SUFFIXES and p.name not in NOT_MODEL_WEIGHTS)


def _register_architecture(spec: ClipSpec) -> None:
    import open_clip

    if spec.architecture_file:
        open_clip.add_model_config(Path(spec.architecture_file).expanduser())
    elif bundled_architecture(spec.model) is not None:
        open_clip.add_model_config(bundled_architecture(spec.model))


def _weights_files(spec: ClipSpec) -> list[Path]:
    """Local weight files this spec will load (hub downloads are checked as they load)."""
    name = spec.open_clip_name()
    if name.startswith(LOCAL_DIR):
        return _folder_weights(Path(name[len(LOCAL_DIR):]))
    if spec.pretrained and _looks_like_path(spec.pretrained):
        return [Path(spec.pretrained).expanduser()]
    return []


def check_weights_only(path: Path) -> None:
    """Refuse a checkpoint that is more than tensors and plain containers (a pickle could run any code)."""
    if path.suffix == ".safetensors":
        return  # tensors and a JSON header by construction
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CurateError(
            f"{path}: refusing to load a checkpoint that holds pickled objects, not only tensors ({first}); "
            "re-save its state_dict with torch.save or as safetensors") from None
    except RuntimeError:
        # mmap needs the zipfile format (torch >= 1.6); older files are read without it, still weights-only
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CurateError(f"{path}: refusing to load a checkpoint that holds pickled objects ({err})") from None


def preflight(spec: ClipSpec) -> None:
    """In the driver, before any work (after check_spec): its tag exists, local weights are weights only."""
    name = spec.open_clip_name()
    if spec.pretrained and not name.startswith((HF_HUB, LOCAL_DIR)) and not _looks_like_path(spec.pretrained):
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        if spec.pretrained not in tags:
            close = difflib.get_close_matches(spec.pretrained, tags, n=4, cutoff=0.3) or tags[:6]
            raise CurateError(f"no pretrained tag '{spec.pretrained}' for {name}; known: {', '.join(close) or 'none'}")
    for path in _weights_files(spec):
        check_weights_only(path)


@dataclass
class LoadedClip:
    model: Any  # open_clip CLIP / CustomTextCLIP, eval mode, on its device
    preprocess: Any  # PIL image -> CHW float tensor (the model's own eval transform)
    tokenizer: Any  # list[str] -> LongTensor
    name: str  # ClipSpec.describe()


def load_clip(spec: ClipSpec, device: str = "cpu") -> LoadedClip:
    """The model, its eval preprocessing and tokenizer, by open_clip's loading code (weights only)."""
    import open_clip

    _register_architecture(spec)
    name = spec.open_clip_name()
    for path in _weights_files(spec):
        check_weights_only(path)
    pretrained = None if name.startswith((HF_HUB, LOCAL_DIR)) else spec.pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True, load_weights=True,
            require_pretrained=bool(pretrained) or name.startswith((HF_HUB, LOCAL_DIR)),  # never silently random
        )
    except pickle.UnpicklingError as err:
        raise CurateError(f"{spec.describe()}: refusing to load a checkpoint that holds pickled objects ({err})") \
            from None
    model.eval()
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(name), spec.describe())


class OpenClipScorer(Scorer):
    """An open_clip model behind the Scorer interface; ``model`` and ``tokenizer`` stay reachable for what only
    open_clip models do (the ITM head reads their token states, CoCa generates)."""

    def __init__(self, clip: LoadedClip, device: str) -> None:
        self.model, self.tokenizer, self.name, self.device = clip.model, clip.tokenizer, clip.name, device
        self._preprocess = clip.preprocess

    def preprocess(self, image: Any) -> Any:
        return self._preprocess(image)

    def encode_images(self, pixels: Any) -> Any:
        return self.model.encode_image(pixels)

    def encode_texts(self, texts) -> Any:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device, non_blocking=True))


FAMILY = ModelFamily(
    name="open_clip",
    claims=lambda spec: True,  # the default family: architecture names, hf-hub:, local-dir:, checkpoint folders
    check=check_spec,
    preflight=preflight,
    load=lambda spec, device: OpenClipScorer(load_clip(spec, device), device),
)


def save_checkpoint_dir(model: Any, model_cfg: dict, folder: Path, extra: dict | None = None,
                        tokenizer: Any = None) -> Path:
    """Save ``model`` as a checkpoint folder any ClipSpec (and open_clip's ``local-dir:``) loads: its config with
    the model's eval preprocessing, and safetensors weights. Written to a temporary folder, then renamed."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        _save_into(tmp, model, model_cfg, extra, tokenizer)
    return folder


def _save_into(tmp: Path, model, model_cfg: dict, extra: dict | None, tokenizer) -> None:
    from safetensors.torch import save_file

    preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess, **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    if hasattr(tokenizer, "save_pretrained"):  # HF tokenizers: a local-dir model loads its tokenizer from the folder
        tokenizer.save_pretrained(str(tmp))
