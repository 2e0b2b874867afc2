"""The engine's Parrot forward equals the released one (ALGORITHMS.md §5), written here independently:
transformers' CLIP tower (hidden_states[-2], CLS kept) with the checkpoint's tower weights on top of
the folder's, pad-to-square with the CLIP mean colour, mlp2x_gelu, text-guided routing over every
text token of the templated prompt, sum_e w_e E_e(Hv) + moe_weight * Hv, the N embeddings in place
of the image, 1-D positions, the LLM via transformers' Qwen2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .builders import TOKENS_PER_IMAGE, pad_and_process, random_image
from .helpers import chat_pieces, image_request, make_engine, tokens_of

MM_KEYS = ("mm_", "moe_", "num_experts", "use_moe", "image_aspect_ratio", "tokenizer_model_max_length")


@torch.no_grad()
def reference(parrot_dir, tower_dir, pixel_values, before, after, steps):
    """(log-probabilities [L, vocab] at every position of the merged prompt, greedy continuation)."""
    from transformers import CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((parrot_dir / "config.json").read_text())
    state = load_file(str(parrot_dir / "model.safetensors"))
    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    prefix = "model.vision_tower.vision_tower."
    own = {k[len(prefix):].removeprefix("vision_model."): v for k, v in state.items() if k.startswith(prefix)}
    assert not tower.load_state_dict(own, strict=False).unexpected_keys
    hv = tower(pixel_values=pixel_values[None], output_hidden_states=True).hidden_states[-2][0]  # [N, mm], CLS first
    hv = F.linear(F.gelu(F.linear(hv, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
                  state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])  # [N, D]

    llm_cfg = Qwen2Config.from_dict({k: v for k, v in cfg.items() if not k.startswith(MM_KEYS)} | {"model_type": "qwen2"})
    llm = Qwen2ForCausalLM(llm_cfg).eval()
    missing = llm.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm_", "model.moe_", prefix))},
                                  strict=False).missing_keys
    assert not missing
    embed = llm.get_input_embeddings()
    d = cfg["hidden_size"]
    ht = embed(torch.tensor(before + after))  # every text token of the prompt, the image excluded
    a = torch.softmax(ht @ hv[0] / math.sqrt(d), dim=0)
    w = torch.softmax((a @ ht) @ state["model.moe_model.gate.weight"].t(), dim=0)  # [E], dense
    mixed = cfg["moe_weight"] * hv
    for e in range(cfg["num_experts"]):
        p = f"model.moe_model.experts.{e}."
        mixed = mixed + w[e] * F.linear(F.silu(F.linear(hv, state[p + "gate_proj.weight"])) *
                                        F.linear(hv, state[p + "up_proj.weight"]), state[p + "down_proj.weight"])
    emb = torch.cat([embed(torch.tensor(before)), mixed, embed(torch.tensor(after))])
    first = None
    out = []
    for _ in range(steps):
        logits = llm(inputs_embeds=emb[None], position_ids=torch.arange(emb.shape[0])[None]).logits[0]
        if first is None:
            first = torch.log_softmax(logits.float(), dim=-1)
        tok = int(logits[-1].argmax())
        out.append(tok)
        emb = torch.cat([emb, embed(torch.tensor([tok]))])
    return first, out


@pytest.mark.parametrize("chunk", [512, 6], ids=["one-step-prefill", "chunked-prefill-splits-the-image"])
def test_engine_matches_the_released_forward(parrot_dir, tower_dir, parrot_model, chunk):
    engine = make_engine(parrot_dir, parrot_model, max_num_batched_tokens=chunk)
    before, after = chat_pieces(engine.tokenizer, "What is in the picture?")
    image = random_image(3)  # 50 x 30: padded to a square first
    pv = pad_and_process(image, tower_dir)  # the reference's pre-processing (transformers' CLIP processor)
    spec = engine.multimodal_spec
    n = TOKENS_PER_IMAGE
    assert spec.tokens_per_image == n
    served_pv = spec.processor(image)  # what the API layer will send (parrot-media's processor)
    assert served_pv.shape == pv.shape and torch.allclose(served_pv, pv, atol=1e-5)
    req = image_request("r", before, after, served_pv, "h3", n, spec.placeholder_token_id,
                        max_tokens=6, logprobs=5, prompt_logprobs=True)
    if chunk < 512:  # the image span starts inside one chunk and ends in another
        assert req.images[0].offset % chunk and (req.images[0].offset + n) // chunk > req.images[0].offset // chunk
    events = engine.generate([req])["r"]
    ref_lp, ref_tokens = reference(parrot_dir, tower_dir, pv, before, after, 6)
    assert tokens_of(events) == ref_tokens
    ids = req.prompt_token_ids
    ref_prompt = [float(ref_lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    got_prompt = events[0].prompt_logprobs
    assert len(got_prompt) == len(ref_prompt)
    assert max(abs(a - b) for a, b in zip(got_prompt, ref_prompt)) < 1e-3
    first = events[0].logprobs[0]  # the first generated token's top alternatives
    for tok, lp in first.top:
        assert abs(lp - float(ref_lp[-1, tok])) < 1e-3
