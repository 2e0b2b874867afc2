"""Vision towers (CLIP, SigLIP, Dinov2 vision models via transformers' classes) built from a local
folder, returning the features LLaVA-style models feed their projector.

The architecture comes from the folder's ``config.json`` (a whole CLIP / SigLIP model's config is
reduced to its ``vision_config``), the input size from its ``preprocessor_config.json`` when present;
the weights from the folder, overridden by tower weights found inside a checkpoint (a released
Parrot checkpoint stores its own copy under ``model.vision_tower.vision_tower.``).

``features(pixel_values [B, 3, S, S]) -> [B, N, mm_hidden]`` is ``hidden_states[select_layer]`` of
the tower (before any final norm), with the CLS token kept (``cls_patch``) or dropped (``patch``).
Layers after the selected one are removed at load time: they never contribute to the features.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .weights import read_checkpoint


@dataclass(frozen=True)
class TowerKind:
    """How one transformers vision family is built: its config and model classes, whether its
    sequence starts with a CLS token, and the whole-model config that nests a ``vision_config``."""

    config_class: str
    model_class: str
    has_cls: bool
    parent_type: str | None = None


TOWER_KINDS = {
    "clip_vision_model": TowerKind("CLIPVisionConfig", "CLIPVisionModel", True, "clip"),
    "siglip_vision_model": TowerKind("SiglipVisionConfig", "SiglipVisionModel", False, "siglip"),
    "dinov2": TowerKind("Dinov2Config", "Dinov2Model", True),
}
_PARENTS = {k.parent_type: name for name, k in TOWER_KINDS.items() if k.parent_type}


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


def _input_size(folder: Path, raw: dict) -> int:
    """The square input side the processor produces: its crop size (or resize size), else the
    config's ``image_size``."""
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = _read_json(pre)
        keys = ("crop_size", "size") if p.get("do_center_crop", True) else ("size",)
        for key in keys:
            v = p.get(key)
            if isinstance(v, int) and v > 0:
                return v
            if isinstance(v, dict) and v.get("height") and v.get("height") == v.get("width"):
                return int(v["height"])
            if isinstance(v, dict) and isinstance(v.get("shortest_edge"), int) and key == "size" and not p.get("crop_size"):
                return int(v["shortest_edge"])
    size = raw.get("image_size")
    if not isinstance(size, int) or size <= 0:
        raise ModelLoadError(f"{folder / 'config.json'}: image_size must be a positive integer, got {size!r}")
    return size


class VisionTower(nn.Module):
    """A frozen vision encoder. ``image_size`` is the input side S, ``num_tokens`` the N of ``features``."""

    def __init__(self, model: nn.Module, kind: TowerKind, *, image_size: int, select_layer: int,
                 select_feature: str, folder: Path):
        super().__init__()
        self.model = model
        self.kind = kind
        self.image_size = image_size
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.folder = folder  # the transformers folder (processor settings live there too)
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        keep_cls = kind.has_cls and select_feature == "cls_patch"
        self.num_tokens = (image_size // self.patch_size) ** 2 + int(keep_cls)
        self._drop_first = kind.has_cls and select_feature == "patch"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> [B, N, mm_hidden]: the selected layer's hidden states."""
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        h = out.hidden_states[-1]  # the encoder was cut after the selected layer; pre-final-norm
        return h[:, 1:] if self._drop_first else h


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "vision_model", model)
    return inner.encoder.layers if hasattr(inner.encoder, "layers") else inner.encoder.layer


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole CLIP / SigLIP checkpoint (and vision-model checkpoints written before transformers 5,
    the release's copy among them) nest the tower under ``vision_model.``; current vision-model
    classes do not. One naming, so that the checkpoint's copy replaces the folder's tensor by tensor."""
    return {k.removeprefix("vision_model."): t for k, t in state.items()}


def load_vision_tower(folder: str | Path, *, select_layer: int = -2, select_feature: str = "cls_patch",
                      overrides: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> VisionTower:
    """Build the tower of a local transformers folder; ``overrides`` (tower state-dict keys -> tensors)
    win over the folder's weights. Raises ModelLoadError with one line naming the problem."""
    import transformers  # noqa: PLC0415 - heavy import

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"vision tower {str(folder)!r} is not a local folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (not a transformers vision tower folder)")
    raw = _read_json(path)
    model_type = raw.get("model_type")
    if model_type in _PARENTS:
        model_type, raw = _PARENTS[model_type], dict(raw.get("vision_config") or {})
        raw.setdefault("model_type", model_type)
    kind = TOWER_KINDS.get(model_type)
    if kind is None:
        raise ModelLoadError(f"{path}: model_type {raw.get('model_type')!r} is not a supported vision tower "
                             f"(supported: clip, siglip, dinov2 and their vision models)")
    if select_feature == "cls_patch" and not kind.has_cls:
        raise ModelLoadError(f"{folder}: mm_vision_select_feature 'cls_patch' needs a CLS token, which a "
                             f"{model_type} tower does not have")
    try:
        config = getattr(transformers, kind.config_class)(**{k: v for k, v in raw.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid {model_type} config ({exc})") from None
    depth = int(config.num_hidden_layers)
    keep = depth + 1 + select_layer if select_layer < 0 else select_layer
    if not 0 <= keep <= depth:
        raise ModelLoadError(f"mm_vision_select_layer {select_layer} is outside the tower's {depth} layers")
    image_size = _input_size(folder, raw)
    if image_size % int(config.patch_size):
        raise ModelLoadError(f"{folder}: input size {image_size} is not a multiple of patch_size {config.patch_size}")

    state: dict[str, torch.Tensor] = {}
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or not overrides:
        state = _unprefixed(read_checkpoint(folder))
    state.update(_unprefixed(overrides or {}))
    # transformers maps the checkpoint's names (which differ between its versions) onto the model's;
    # its progress bar and load report stay quiet: problems are reported below, in one line
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model, info = getattr(transformers, kind.model_class).from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    layer_re = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
    missing = sorted(k for k in info["missing_keys"] if not ((m := layer_re.search(k)) and int(m.group(1)) >= keep))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{folder}: missing vision tower tensor {missing[0]}{more}")
    if info["mismatched_keys"]:
        name, got, want = sorted(info["mismatched_keys"])[0]
        raise ModelLoadError(f"{folder}: vision tower tensor {name} has shape {tuple(got)}, expected {tuple(want)}")
    del _encoder_layers(model)[keep:]  # hidden_states[select_layer] only depends on the layers before it
    for name, t in model.named_parameters():
        if not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            raise ModelLoadError(f"{folder}: vision tower parameter {name} holds NaN or inf")
    model.requires_grad_(False)
    model = model.to(device=device, dtype=dtype).eval()
    return VisionTower(model, kind, image_size=image_size, select_layer=select_layer,
                       select_feature=select_feature, folder=folder)
