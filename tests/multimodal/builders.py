"""Tiny checkpoints in Parrot's released layout (ALGORITHMS.md §5), written by the tests.

``make_tower``: a random CLIP vision tower folder (transformers layout, with a CLIP processor
config). ``make_parrot``: a ``parrot_qwen2`` folder: a random Qwen2 language model plus
``model.mm_projector.*``, ``model.moe_model.*`` and the tower's weights under
``model.vision_tower.vision_tower.vision_model.*`` (perturbed, so that a loader which ignored them
and kept the folder's would be caught).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_model

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             image_size=42, patch_size=14)  # 9 patches + CLS = 10 visual tokens
TOKENS_PER_IMAGE = (42 // 14) ** 2 + 1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tower(folder: Path, seed: int = 1) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**TOWER))
    with torch.no_grad():  # layer norms and biases off their init, so their paths are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)
    return folder


def make_parrot(folder: Path, tower_dir: Path, tokenizer_from: Path, *, seed: int = 0, num_experts: int = 3,
                moe_weight: float = 0.1, mm_vision_tower: str | None = None, **overrides) -> Path:
    """A tiny released-layout Parrot checkpoint whose tower is ``tower_dir`` (``mm_vision_tower``
    names it unless given)."""
    make_tiny_model(folder, tokenizer_from, model_type="qwen2", seed=seed, tie_word_embeddings=False, **overrides)
    cfg = json.loads((folder / "config.json").read_text())
    d = cfg["hidden_size"]
    cfg.update(model_type="parrot_qwen2", architectures=["ParrotQwen2ForCausalLM"],
               mm_vision_tower=str(tower_dir) if mm_vision_tower is None else mm_vision_tower,
               mm_hidden_size=TOWER["hidden_size"], mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
               mm_vision_select_feature="cls_patch", image_aspect_ratio="pad", num_experts=num_experts,
               moe_intermediate_size=48, moe_hidden_size=d, moe_weight=moe_weight, use_moe=True,
               use_moe_residual=True, moe_top_k=2, tokenizer_model_max_length=2048)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 100)

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    mm = TOWER["hidden_size"]
    state.update({"model.mm_projector.0.weight": rnd(d, mm), "model.mm_projector.0.bias": rnd(d),
                  "model.mm_projector.2.weight": rnd(d, d), "model.mm_projector.2.bias": rnd(d),
                  "model.moe_model.gate.weight": rnd(num_experts, d, scale=1.0)})
    for e in range(num_experts):
        p = f"model.moe_model.experts.{e}."
        state.update({p + "gate_proj.weight": rnd(48, d), p + "up_proj.weight": rnd(48, d), p + "down_proj.weight": rnd(d, 48)})
    for key, t in load_file(str(tower_dir / "model.safetensors")).items():
        name = key if key.startswith("vision_model.") else "vision_model." + key
        state["model.vision_tower.vision_tower." + name] = (t + rnd(*t.shape, scale=0.02)).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def pad_and_process(image, tower_dir: Path) -> torch.Tensor:
    """The release's pre-processing (``image_aspect_ratio = pad``): pad to a square with the CLIP mean
    colour, then the tower's CLIP processor -> pixel_values [3, S, S]."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    w, h = image.size
    side = max(w, h)
    background = tuple(int(m * 255) for m in CLIP_MEAN)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    proc = CLIPImageProcessor.from_pretrained(tower_dir)
    return proc(images=square, return_tensors="pt")["pixel_values"][0]


def random_image(seed: int, size: tuple[int, int] = (50, 30)):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")
