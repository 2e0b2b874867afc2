"""A vision tower's image processor: RGB image -> pixel_values [3, H, W] float32, from the tower
folder's ``preprocessor_config.json`` (one concept: pre-processing).

    processor = ImageProcessor.from_folder("/models/clip-vit-large-patch14-336", aspect="pad")
    pixel_values = processor(pil_image)        # torch.float32 [3, 336, 336]

It reads the settings of transformers' CLIP, SigLIP and Dinov2 (``BitImageProcessor``) processors
and computes what their PIL backends compute, step for step: optional pad to a square, resize
(shortest edge kept in proportion, or a fixed size) with the configured PIL filter, centre crop,
rescale (in float64, then float32) and normalise. ``aspect="pad"`` is LLaVA's and Parrot's
``expand2square``: the image is first centred on a square of the background colour
``int(mean * 255)`` per channel, so nothing of it is cropped away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CONFIG_FILE = "preprocessor_config.json"
ASPECTS = ("pad", "square")
# transformers' defaults when a key is missing, per processor family (CLIP's are also the fallback).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageProcessorError(ValueError):
    """The folder's pre-processing settings are missing or not understood; the message names the key."""


@dataclass(frozen=True)
class ImageProcessor:
    """What one image goes through before the tower.

    shortest_edge: resize so the shorter side is this long (the other in proportion, truncated as
    transformers does); else ``size`` (height, width) exactly; neither: no resize. crop: centre crop
    (height, width) or None. rescale: factor or None. mean / std: per channel, or None (no
    normalisation). resample: a PIL filter id (3 = bicubic).
    """

    shortest_edge: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    resample: int = Image.Resampling.BICUBIC
    rescale: float | None = 1 / 255
    mean: tuple[float, float, float] | None = _CLIP_MEAN
    std: tuple[float, float, float] | None = _CLIP_STD
    aspect: str = "pad"

    @classmethod
    def from_folder(cls, tower_dir: str | Path, aspect: str = "pad", *, aspect_ratio: str | None = None) -> "ImageProcessor":
        """``aspect_ratio``: the config's ``image_aspect_ratio`` under its own name (wins over ``aspect``)."""
        aspect = aspect_ratio or aspect
        path = Path(tower_dir) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ImageProcessorError(f"{path}: missing (the vision tower's image-processor settings)") from None
        except (OSError, ValueError) as exc:
            raise ImageProcessorError(f"{path}: unreadable: {exc}") from None
        if not isinstance(raw, dict):
            raise ImageProcessorError(f"{path}: must hold a JSON object")
        return cls.from_dict(raw, aspect=aspect, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], aspect: str = "pad", where: str = CONFIG_FILE) -> "ImageProcessor":
        if aspect not in ASPECTS:
            raise ImageProcessorError(f"image aspect {aspect!r}: expected one of {ASPECTS}")
        kind = str(raw.get("image_processor_type", "CLIPImageProcessor"))
        siglip = kind.startswith("Siglip")
        default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if siglip else \
            (_IMAGENET_MEAN, _IMAGENET_STD) if kind.startswith("Bit") else (_CLIP_MEAN, _CLIP_STD)

        def bad(key: str, why: str) -> ImageProcessorError:
            return ImageProcessorError(f"{where}: {key} {why}, got {raw.get(key)!r}")

        def side(key: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8192:
                raise bad(key, "must be a side length in pixels (1..8192)")
            return value

        def hw(key: str, value: Any) -> tuple[int, int]:
            if isinstance(value, dict) and "height" in value and "width" in value:
                return side(key, value["height"]), side(key, value["width"])
            if isinstance(value, int):
                return side(key, value), side(key, value)
            raise bad(key, "must be an integer or {height, width}")

        def triple(key: str, default: tuple[float, ...]) -> tuple[float, float, float]:
            value = raw.get(key, default)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise bad(key, "must be three numbers (one per channel)")
            return tuple(float(v) for v in value)  # type: ignore[return-value]

        shortest = size = crop = None
        if raw.get("do_resize", True):
            value = raw.get("size", {"height": 224, "width": 224} if siglip else {"shortest_edge": 224})
            if isinstance(value, int) and not isinstance(value, bool):
                # legacy int: SigLIP resizes to a square, CLIP and Bit keep the aspect (shortest edge)
                size, shortest = ((side("size", value),) * 2, None) if siglip else (None, side("size", value))
            elif isinstance(value, dict) and set(value) == {"shortest_edge"}:
                shortest = side("size", value["shortest_edge"])
            elif isinstance(value, dict) and set(value) == {"height", "width"}:
                size = hw("size", value)
            else:
                raise bad("size", "must be an integer, {shortest_edge} or {height, width}")
        if raw.get("do_center_crop", not siglip):
            crop = hw("crop_size", raw.get("crop_size", 224))
        resample = raw.get("resample", Image.Resampling.BICUBIC)
        if not isinstance(resample, int) or isinstance(resample, bool) or resample not in range(6):
            raise bad("resample", "must be a PIL filter id (0..5)")
        rescale = None
        if raw.get("do_rescale", True):
            rescale = raw.get("rescale_factor", 1 / 255)
            if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 < rescale <= 1:
                raise bad("rescale_factor", "must be a number in (0, 1]")
        mean = std = None
        if raw.get("do_normalize", True):
            mean, std = triple("image_mean", default_mean), triple("image_std", default_std)
            if any(s <= 0 for s in std):
                raise bad("image_std", "must be positive")
        return cls(shortest_edge=shortest, size=size, crop=crop, resample=resample,
                   rescale=None if rescale is None else float(rescale), mean=mean, std=std, aspect=aspect)

    @property
    def background(self) -> tuple[int, int, int]:
        """The pad colour: LLaVA's ``tuple(int(x * 255) for x in image_mean)`` (CLIP: (122, 116, 104))."""
        mean = self.mean if self.mean is not None else (0.0, 0.0, 0.0)
        return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the image (shortest edge, no crop)."""
        if self.crop is not None:
            return self.crop
        if self.size is not None:
            return self.size
        return None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB ``PIL.Image`` -> pixel_values [3, H, W] float32."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand_to_square(image, self.background)
        if self.shortest_edge is not None:
            height, width = _shortest_edge_size(image.height, image.width, self.shortest_edge)
            image = image.resize((width, height), resample=self.resample)
        elif self.size is not None:
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        pixels = np.asarray(image).transpose(2, 0, 1)  # [3, H, W] uint8
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        if self.rescale is not None:
            pixels = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre ``image`` on a square canvas of ``background`` (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: the long side is
    ``int(edge * long / short)`` (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> [C, height, width], top-left at ((H - height) // 2, (W - width) // 2); a side
    shorter than the crop is zero-padded first, centred with the extra pixel before (as transformers)."""
    _, h, w = pixels.shape
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
        padded[:, top:top + h, left:left + w] = pixels
        pixels, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top:top + height, left:left + width]
