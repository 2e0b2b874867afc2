"""Loading a served model with its vision side: a released Parrot checkpoint (``model_type``
``parrot_qwen2``, ALGORITHMS.md §5), or a plain Llama-family model given a tower with
``--vision-tower DIR`` (a tower and no projector: the ``parrot`` bank of each image request supplies
the projector and the mixture).

A Parrot folder holds the Qwen2 language model (loaded by the Llama-family loader), the projector
and the mixture (``model.mm_projector.*``, ``model.moe_model.*``: a ``VisualAdapter``) and usually
a copy of the tower's weights (``model.vision_tower.vision_tower.*``). The tower's architecture and
processor settings come from a local transformers folder: ``--vision-tower DIR`` when given, else
the config's ``mm_vision_tower`` when that names a local folder (the release names a hub id, which
is refused with a line naming the flag). Weights inside the checkpoint win over the folder's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.parrot import ParrotConfig, ParrotConfigError, VisualAdapter

from .config import ModelConfig
from .errors import ModelLoadError
from .llama import LlamaModel, load_model
from .vision import VisionTower, load_vision_tower
from .weights import read_checkpoint

PARROT_MODEL_TYPE = "parrot_qwen2"
RELEASE_STOP_TOKEN = "<|im_end|>"  # the release's conversation template stops generation here
TOWER_PREFIX = "model.vision_tower.vision_tower."
ADAPTER_PREFIX = "model."  # the adapter's own keys are mm_projector.* and moe_model.*


@dataclass
class ModelVision:
    """The served model's vision side.

    tower: the frozen vision encoder (features per image: [tokens_per_image, mm_hidden]).
    adapter: the checkpoint's projector + mixture, or None for a tower-only base (a ``parrot`` bank
        supplies one per request).
    config: the vision-side config the tower was loaded for (select layer / feature, mm size).
    name: the model's name, the identity of its own adapter in cache keys.
    """

    tower: VisionTower
    adapter: VisualAdapter | None
    config: ParrotConfig
    name: str

    @property
    def tokens_per_image(self) -> int:
        return self.tower.num_tokens


def _raw_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())  # ModelConfig.from_folder checked it


def _tower_folder(folder: Path, pcfg: ParrotConfig, vision_tower: str | Path | None) -> Path:
    if vision_tower is not None:
        path = Path(vision_tower).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"--vision-tower {str(vision_tower)!r} is not a local folder")
        return path
    name = pcfg.vision_tower
    if not name:
        raise ModelLoadError(f"{folder / 'config.json'}: no mm_vision_tower; pass --vision-tower DIR "
                             f"(a local transformers folder of the vision tower)")
    for candidate in (Path(name).expanduser(), folder / name):
        if candidate.is_dir():
            return candidate
    raise ModelLoadError(f"{folder / 'config.json'}: mm_vision_tower {name!r} is not a local folder (nothing is "
                         f"fetched from a hub); pass --vision-tower DIR, a local copy of that tower")


def _load_adapter(folder: Path, pcfg: ParrotConfig, state: dict[str, torch.Tensor], device, dtype) -> VisualAdapter:
    with torch.device("meta"):
        adapter = VisualAdapter(pcfg)
    adapter = adapter.to_empty(device="cpu")
    own = {}
    for key, target in adapter.state_dict().items():
        name = ADAPTER_PREFIX + key
        t = state.get(name)
        if t is None:
            raise ModelLoadError(f"{folder}: missing tensor {name}")
        if tuple(t.shape) != tuple(target.shape):
            raise ModelLoadError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        if not t.is_floating_point():
            raise ModelLoadError(f"{folder}: tensor {name} has dtype {t.dtype}, expected a floating-point type")
        if not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            raise ModelLoadError(f"{folder}: tensor {name} holds NaN or inf")
        own[key] = t
    adapter.load_state_dict(own)
    adapter.requires_grad_(False)
    return adapter.to(device=device, dtype=dtype).eval()


def load_model_with_vision(path: str | Path, *, vision_tower: str | Path | None = None,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                           quantization: str = "none") -> tuple[LlamaModel, ModelVision | None]:
    """The language model and its vision side (None: a text-only model, no ``vision_tower``).
    Raises ModelLoadError with one line naming the problem."""
    folder = Path(path).expanduser()
    cfg = ModelConfig.from_folder(folder)
    raw = _raw_config(folder)
    is_parrot = raw.get("model_type") == PARROT_MODEL_TYPE
    if not is_parrot and vision_tower is None:
        return load_model(folder, device=device, dtype=dtype, quantization=quantization), None
    try:
        if is_parrot:
            pcfg = ParrotConfig.from_dict(raw, hidden_size=cfg.hidden_size, where=str(folder / "config.json"))
        else:  # a tower-only base: LLaVA's feature selection, which a parrot bank must share
            pcfg = ParrotConfig(hidden_size=cfg.hidden_size, mm_hidden_size=1, select_layer=-2, select_feature="cls_patch")
    except ParrotConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    tower_dir = _tower_folder(folder, pcfg, vision_tower)
    state = read_checkpoint(folder)
    overrides = {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    tower = load_vision_tower(tower_dir, select_layer=pcfg.select_layer, select_feature=pcfg.select_feature,
                              overrides=overrides, device=device, dtype=dtype)
    if not is_parrot:
        pcfg = ParrotConfig(hidden_size=cfg.hidden_size, mm_hidden_size=tower.hidden_size, select_layer=-2,
                            select_feature="cls_patch", vision_tower=str(tower_dir))
    elif tower.hidden_size != pcfg.mm_hidden_size:
        raise ModelLoadError(f"{folder / 'config.json'}: mm_hidden_size {pcfg.mm_hidden_size} does not match the "
                             f"vision tower's hidden_size {tower.hidden_size} ({tower_dir})")
    adapter = _load_adapter(folder, pcfg, state, device, dtype) if is_parrot else None
    llm = load_model(folder, device=device, dtype=dtype, state=state, quantization=quantization)
    return llm, ModelVision(tower=tower, adapter=adapter, config=pcfg, name=cfg.name)


def release_stop_ids(vision: ModelVision | None, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Stop ids a Parrot checkpoint needs beyond config.json's ``eos_token_id``: the release stops
    generation at ``<|im_end|>`` (its ChatML template's end of turn) whatever that key names (a Qwen
    base config names ``<|endoftext|>``). Empty for any other model."""
    if vision is None or vision.adapter is None or tokenizer is None:
        return ()
    vocab = tokenizer.get_vocab()
    tid = vocab.get(RELEASE_STOP_TOKEN)
    return (tid,) if isinstance(tid, int) and tid not in eos_token_ids else ()
