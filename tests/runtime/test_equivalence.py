"""Our execution of each bank kind equals an independent reference (fp32, max |difference|), with the
pool's weights in float32, in the server's default pool dtype on the CPU (float16) and in int8 with
row scales (``--bank-dtype int8``: the reference holds to TOL_INT8, the weights' rounding)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.runtime import BankRegistry, serving_bank_dtype
from server.model import load_model
from tests.adapters.bank_builders import fingerprint_of, write_mixlora, write_peft_lora, write_plugin_moe
from tests.runtime.helpers import flat_logits, greedy_request, make_engine

LENGTHS = (7, 1, 12)
TOL = 1e-3
TOL_INT8 = 3e-2  # int8 rows keep ~8 bits: each weight rounds by up to 0.4% of its row's largest
POOL_DTYPES = pytest.mark.parametrize(
    "pool_dtype", sorted({torch.float32, serving_bank_dtype(torch.float32, "cpu"), torch.int8}, key=str), ids=str)


def _tol(pool_dtype: torch.dtype) -> float:
    return TOL_INT8 if pool_dtype == torch.int8 else TOL


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return load_model(tiny_model_dir)


def _hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _prompts(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]


def _registry(model, root, dtype=torch.float32) -> BankRegistry:
    return BankRegistry(model.config, allowed_roots=[root], dtype=dtype)


def _mixlora_reference(model_dir, folder):
    """transformers' model with the bank at ``folder`` injected by the ``mixlora`` package, in eval mode."""
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float32)
    hf = _hf(model_dir)
    inject_adapter_in_model(hf, config, weights)
    hf.eval()
    for layer in hf.model.layers:  # the expert LoRAs sit in a plain dict: eval() does not reach them
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return hf


def _max_logprob_diff(model, registry, bank, hf_model) -> float:
    prompts = _prompts(model.config.vocab_size)
    # our side: all prompts in one flat batch, plus a base-model prompt beside them
    got = flat_logits(model, registry, prompts + prompts[:1], [bank] * len(prompts) + [None])
    worst = 0.0
    with torch.no_grad():
        for p, g in zip(prompts, got):
            ref = hf_model(p[None]).logits[0]
            worst = max(worst, (g.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item())
    return worst


@POOL_DTYPES
@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), ("gate_proj", "down_proj")])
def test_mixlora_matches_the_mixlora_package(tmp_path, tiny_model_dir, ours, targets, pool_dtype):
    folder = tmp_path / "mix"
    write_mixlora(folder, fingerprint_of(tiny_model_dir), r=4, alpha=8, num_experts=4, top_k=2, targets=targets)
    registry = _registry(ours, tmp_path, pool_dtype)
    registry.load_sync("mix", folder)

    hf = _mixlora_reference(tiny_model_dir, folder)
    diff = _max_logprob_diff(ours, registry, "mix", hf)
    assert diff <= _tol(pool_dtype)


def test_mixlora_with_ffn_bias_matches_the_mixlora_package(tmp_path, default_model_dir):
    """Our base down projection runs once over the routing-weighted mix of the experts' activations;
    with a down bias each token still gets sum_e w_e (W h_e + b), as the package computes it."""
    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "biased", default_model_dir, mlp_bias=True, seed=3)
    folder = tmp_path / "mix"
    write_mixlora(folder, fingerprint_of(model_dir), r=4, alpha=8, num_experts=4, top_k=2,
                  targets=("gate_proj", "up_proj", "down_proj"))
    model = load_model(model_dir)
    registry = _registry(model, tmp_path)
    registry.load_sync("mix", folder)
    hf = _mixlora_reference(model_dir, folder)
    assert _max_logprob_diff(model, registry, "mix", hf) <= TOL


@POOL_DTYPES
def test_mixlora_through_the_engine(tmp_path, tiny_model_dir, pool_dtype):
    """The same next-token log-probabilities through LLMEngine (top 20) as our model's full forward."""
    folder = tmp_path / "mix"
    write_mixlora(folder, fingerprint_of(tiny_model_dir), num_experts=4, top_k=2)
    engine = make_engine(tiny_model_dir, None)
    registry = BankRegistry(engine.model_config, allowed_roots=[tmp_path], dtype=pool_dtype)
    registry.load_sync("mix", folder)
    engine.set_adapter_provider(registry)
    prompts = _prompts(engine.model_config.vocab_size, seed=1)
    events = engine.generate([greedy_request(f"r{i}", p.tolist(), "mix", 1, logprobs=20) for i, p in enumerate(prompts)])

    hf = _mixlora_reference(tiny_model_dir, folder)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(p[None]).logits[0, -1].log_softmax(-1)
            lp = [e for e in events[f"r{i}"] if e.logprobs][0].logprobs[0]
            for tok, value in lp.top:
                assert abs(value - ref[tok].item()) <= _tol(pool_dtype)
            assert lp.token_id == int(ref.argmax())


def _dynmole_reference(hf, written: dict, cfg: dict, scaling: float):
    """ALGORITHMS.md §2 written out on transformers' own model: a forward hook per targeted linear."""
    n, q, eps = cfg["num_experts"], cfg["entropy_index"], cfg["entropy_eps"]

    def hook_for(prefix):
        router = written[f"{prefix}.moe_gate.weight"]
        a = [written[f"{prefix}.experts.{e}.lora_A.weight"] for e in range(n)]
        b = [written[f"{prefix}.experts.{e}.lora_B.weight"] for e in range(n)]

        def hook(_module, inputs, out):
            x = inputs[0]
            p = torch.softmax(x.float() @ router.t(), dim=-1)
            h = (1 - (p + eps).pow(q).sum(-1)) / (q - 1) / ((1 - n ** (1 - q)) / (q - 1))
            sp, order = torch.sort(p, dim=-1, descending=True)
            keep = (sp.cumsum(-1) <= cfg["top_p"]) | (torch.arange(n) < cfg["keep_top_k"])
            keep = keep | (h > cfg["entropy_threshold"]).unsqueeze(-1)
            mask = torch.zeros_like(keep).scatter(-1, order, keep)
            w = p * mask
            delta = sum(w[..., e:e + 1] * scaling * (x.float() @ a[e].t() @ b[e].t()) for e in range(n))
            return out + delta.to(out.dtype)

        return hook

    for i, layer in enumerate(hf.model.layers):
        for t in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, t).register_forward_hook(hook_for(f"dynmole.layers.{i}.mlp.{t}"))


@POOL_DTYPES
def test_dynmole_matches_a_reference_from_the_algorithm(tmp_path, tiny_model_dir, ours, pool_dtype):
    cfg = {"num_experts": 6, "entropy_index": 1.1, "entropy_eps": 1e-5, "top_p": 0.75, "keep_top_k": 2,
           "entropy_threshold": 0.8}
    folder = tmp_path / "dyn"
    written = write_plugin_moe(folder, fingerprint_of(tiny_model_dir), kind="dynmole", r=4, alpha=8,
                               num_experts=6, entropy_threshold=cfg["entropy_threshold"])
    # soften the routers so that some tokens broadcast and others route sparsely
    written = {k: v * 0.5 if k.endswith("moe_gate.weight") else v for k, v in written.items()}
    torch.save(written, folder / "adapter_model.bin")
    registry = _registry(ours, tmp_path, pool_dtype)
    registry.load_sync("dyn", folder)
    hf = _hf(tiny_model_dir)
    _dynmole_reference(hf, written, cfg, 8 / 4)
    diff = _max_logprob_diff(ours, registry, "dyn", hf)
    assert diff <= _tol(pool_dtype)
    # routing was non-trivial: some decisions broadcast, some did not
    prompts = _prompts(ours.config.vocab_size)
    handle = registry.acquire("dyn")
    step = registry.build_step([handle], [len(prompts[0])])
    from server.model import SequenceKVCache, StepContext, step_context
    cache = SequenceKVCache(ours.config)
    att = cache.step([0], [len(prompts[0])])
    with torch.no_grad(), step_context(StepContext(positions=att.positions(), attention=att, adapters=step)):
        ours(prompts[0])
    stats = step.routing_stats().banks["dyn"]
    registry.release(handle)
    assert 0 < stats.broadcast < stats.decisions


@POOL_DTYPES
def test_peft_lora_matches_peft(tmp_path, tiny_model_dir, ours, pool_dtype):
    from peft import PeftModel

    folder = tmp_path / "lora"
    write_peft_lora(folder, fingerprint_of(tiny_model_dir), r=8, alpha=16,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    registry = _registry(ours, tmp_path, pool_dtype)
    registry.load_sync("lora", folder)
    peft_model = PeftModel.from_pretrained(_hf(tiny_model_dir), str(folder)).eval()
    prompts = _prompts(ours.config.vocab_size)
    got = flat_logits(ours, registry, prompts, ["lora"] * len(prompts))
    with torch.no_grad():
        for p, g in zip(prompts, got):
            diff = (g - peft_model(input_ids=p[None]).logits[0]).abs().max().item()
            assert diff <= _tol(pool_dtype)
