"""Parrot image requests through the engine (CPU): what the encoder cache and the visual routing
save. Prints the table of BENCHMARKS.md ("Parrot images").

    python benchmarks/parrot_images.py [--threads 2] [--requests 4] [--repeats 3] [--llm-layers 30]

A random Parrot at small but real proportions is written to a temporary folder: a Qwen2 language
model with SmolLM2-135M's sizes (hidden 576, 30 layers), a ViT-B/16-sized CLIP tower (768 wide, 12
layers, 224 px: 197 tokens per image, CLS kept) and a 6-expert mixture (intermediate 576 = D, as
released). Each system prefills ``--requests`` image requests in one step and samples one token:

- ``cold``: every image new (the encoder cache cleared first): tower + projector + mixture per image;
- ``cached``: the same images with other questions: tower + projector from the cache, the mixture
  recomputed per request (its text differs);
- ``text``: the same prompts with the image rows left as placeholder tokens and no image: the LLM alone;
- ``cold topk:1``: as ``cold`` with ``--visual-routing topk:1`` (one expert of six per image).

Systems alternate within each repeat, in one process; the median of the repeats is reported. The
machine is shared, so absolute times move between runs; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine, load_tokenizer  # noqa: E402
from server.engine.protocol import GenerationRequest, SamplingParams  # noqa: E402
from server.model import ensure_default_model  # noqa: E402
from server.model.parrot import load_model_with_vision  # noqa: E402
from server.multimodal import ImageInput  # noqa: E402

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def write_checkpoint(root: Path, llm_layers: int) -> Path:
    """A random parrot_qwen2 folder (released layout) and its CLIP tower folder."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower_dir = root / "tower"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=224, patch_size=16)).save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tower_dir)
    default = ensure_default_model()
    vocab = json.loads((default / "config.json").read_text())["vocab_size"]
    d, experts = 576, 6
    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=d, intermediate_size=1536, num_hidden_layers=llm_layers,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = root / "parrot"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default / name).exists():
            shutil.copy(default / name, folder / name)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="parrot_qwen2", mm_vision_tower=str(tower_dir), mm_hidden_size=768,
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="cls_patch",
               image_aspect_ratio="pad", num_experts=experts, moe_intermediate_size=d, moe_hidden_size=d,
               moe_weight=0.1, use_moe=True)
    (folder / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    state.update({"model.mm_projector.0.weight": torch.randn(d, 768, generator=g) * 0.03,
                  "model.mm_projector.0.bias": torch.zeros(d), "model.mm_projector.2.weight": torch.randn(d, d, generator=g) * 0.04,
                  "model.mm_projector.2.bias": torch.zeros(d), "model.moe_model.gate.weight": torch.randn(experts, d, generator=g)})
    for e in range(experts):
        p = f"model.moe_model.experts.{e}."
        for n, shape in (("gate_proj", (d, d)), ("up_proj", (d, d)), ("down_proj", (d, d))):
            state[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.04
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def requests(tok, spec, n: int, images: list[torch.Tensor], question: str, rid: str, *, with_images=True):
    before = tok(SYSTEM, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n):
        after = tok(f"\n{question} ({i})<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids = before + [spec.placeholder_token_id] * spec.tokens_per_image + after
        imgs = [ImageInput(images[i], f"img-{rid}-{i}", len(before), spec.tokens_per_image)] if with_images else []
        out.append(GenerationRequest(f"{rid}{i}", ids, SamplingParams(max_tokens=1, temperature=0.0), images=imgs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llm-layers", type=int, default=30, help="decoder layers of the language model (SmolLM2-135M: 30)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp), args.llm_layers)
        loaded = load_model_with_vision(folder)
        tok = load_tokenizer(folder)
        engines = {}
        for routing in ("dense", "topk:1"):
            cfg = EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_memory=256 << 20,
                               max_num_batched_tokens=4096, max_num_seqs=16, visual_routing=routing)
            engines[routing] = LLMEngine(cfg, model=loaded[0], tokenizer=tok, vision=loaded[1])
        spec = engines["dense"].multimodal_spec
        s = spec.tokens_per_image
        g = torch.Generator().manual_seed(2)
        times: dict[str, list[float]] = {k: [] for k in ("cold", "cached", "text", "cold topk:1")}
        for rep in range(args.repeats + 1):  # the first repeat warms up and is not counted
            images = [torch.randn(3, 224, 224, generator=g) for _ in range(args.requests)]
            runs = [("cold", "dense", requests(tok, spec, args.requests, images, "What is this?", f"c{rep}-")),
                    ("cached", "dense", requests(tok, spec, args.requests, images, "Which colour is it?", f"c{rep}-")),
                    ("text", "dense", requests(tok, spec, args.requests, images, "What is this?", f"t{rep}-", with_images=False)),
                    ("cold topk:1", "topk:1", requests(tok, spec, args.requests, images, "What is this?", f"k{rep}-"))]
            for name, routing, reqs in runs:
                engine = engines[routing]
                if name.startswith("cold"):
                    engine.visual.cache.clear()
                for r in reqs:  # same image ids across the first two runs: only "cached" may hit
                    r.request_id += name
                t0 = time.perf_counter()
                engine.generate(reqs)
                dt = time.perf_counter() - t0
                print(f"repeat {rep}{' (warm-up)' if not rep else ''}: {name}: {dt:.3f} s", file=sys.stderr, flush=True)
                if rep:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{args.requests} image requests ({s} visual + ~{len(reqs[0].prompt_token_ids) - s} text tokens each), "
              f"prefill + 1 token, {args.llm_layers}-layer LLM, {args.threads} threads, median of {args.repeats}\n")
        print("| system | s | vs text only |")
        print("| --- | --- | --- |")
        for k in ("text", "cold", "cached", "cold topk:1"):
            print(f"| {k} | {med[k]:.3f} | {med[k] / med['text']:.2f}x |")
        print(f"\ncached / cold: {med['cached'] / med['cold']:.2f}x; cold topk:1 / cold dense: "
              f"{med['cold topk:1'] / med['cold']:.2f}x")


if __name__ == "__main__":
    main()
