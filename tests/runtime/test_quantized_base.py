"""Every bank kind on a weight-only quantized base: the adapter deltas are added after the quantized
base GEMM (TargetLinear), so a bank on the quantized model equals the same bank on the same model
run through the quantized weights' torch reference (dequantized weight, the kernel's bf16 roundings)
instead of the packed kernels. Also through the engine, with banks of every kind in one batch.
(The fp32 model with each kind is checked against independent references in test_equivalence.py;
routing kinds make discrete choices, so the twin shares the kernels' roundings to keep them equal.)"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.runtime import BankRegistry
from server.model import load_model
from tests.adapters.bank_builders import fingerprint_of, random_bank
from tests.runtime.helpers import flat_logits, greedy_request, make_engine, tokens_of
from tests.runtime.test_factor_serving import factor_bank

KINDS = ("lora", "dynmole", "mola", "mixlora", "factor")


def _bank(model_dir, cfg, kind: str, seed: int):
    if kind == "factor":
        return factor_bank(model_dir, cfg, 4, 2, seed=seed, name=kind)
    return random_bank(kind, fingerprint_of(model_dir), r=4, experts_per_layer=(3, 2), seed=seed, name=kind)


@pytest.fixture(scope="module", params=["int4", "int8"])
def served(request, tiny_model_dir, tmp_path_factory):
    """(quantized model, its twin on the reference path, a registry of every kind for each)."""
    root = tmp_path_factory.mktemp(f"banks-{request.param}")
    quantized = load_model(tiny_model_dir, quantization=request.param)
    twin = copy.deepcopy(quantized)
    for module in twin.modules():
        if hasattr(module, "use_kernel"):
            module.use_kernel = False
    registries = []
    for model in (quantized, twin):
        registry = BankRegistry(model.config, allowed_roots=[root])
        registry.attach_model(model)
        registries.append(registry)
    for i, kind in enumerate(KINDS):
        _bank(tiny_model_dir, quantized.config, kind, seed=i + 1).save(root / kind)
        for registry in registries:
            registry.load_sync(kind, root / kind)
    return quantized, twin, registries


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_on_a_quantized_base_equals_its_dequantized_twin(served, kind):
    quantized, twin, (reg_q, reg_t) = served
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, quantized.config.vocab_size, (n,), generator=gen) for n in (6, 1, 11)]
    banks = [kind, kind, None]  # with a base-model row in the same flat batch
    got = flat_logits(quantized, reg_q, prompts, banks)
    want = flat_logits(twin, reg_t, prompts, banks)
    base = flat_logits(quantized, reg_q, prompts, [None] * 3)
    # equal up to the kernels' summation order (a last-bit difference of a bf16 output at most);
    # the bank's effect is many times larger
    for g, w, b in zip(got, want, base):
        assert (g - w).abs().max() <= 0.01 * w.abs().max()
    for g, b in zip(got[:2], base[:2]):
        assert (g - b).abs().max() > 0.05 * b.abs().max()


def test_every_kind_in_one_engine_batch_on_a_quantized_base(tiny_model_dir, tmp_path):
    """All kinds and the base in one continuous batch of the engine on an int4 base: each request's
    greedy tokens equal those it gets running alone."""
    engine = make_engine(tiny_model_dir, None, quantization="int4")
    assert engine.model.quantization == "int4"
    registry = BankRegistry(engine.model_config, allowed_roots=[tmp_path])
    for i, kind in enumerate(KINDS):
        _bank(tiny_model_dir, engine.model_config, kind, seed=i + 1).save(tmp_path / kind)
        registry.load_sync(kind, tmp_path / kind)
    engine.set_adapter_provider(registry)
    gen = torch.Generator().manual_seed(3)
    prompts = {k: torch.randint(0, 1000, (5 + i,), generator=gen).tolist() for i, k in enumerate(KINDS + ("base",))}
    together = engine.generate([greedy_request(k, p, None if k == "base" else k, 6) for k, p in prompts.items()])
    for k, p in prompts.items():
        alone = engine.generate([greedy_request(f"{k}-alone", p, None if k == "base" else k, 6)])
        assert tokens_of(together[k]) == tokens_of(alone[f"{k}-alone"])
