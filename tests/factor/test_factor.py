"""FactorLLM: the sparse factorised FFN against its dense references, calibration, the bank, the CLI."""

from __future__ import annotations

import pytest
import torch

from adapters import BankError, BaseFingerprint, load_bank
from adapters.factor import (
    FactorStep,
    build_factor_bank,
    factor_ffn,
    factor_ffn_reference,
    factor_route,
    load_factor_weights,
    pack_experts,
)
from adapters.factor.calibrate import FactorConfig, factorize
from adapters.factor.decode import greedy_decode
from adapters.factor.permutation import balanced_kmeans, choose_permutation
from kernels import plan_from_slots
from server.model import SequenceKVCache, StepContext, load_model, step_context


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def base(model):
    return BaseFingerprint.from_hf_config(model.config.raw)


def random_factor_bank(model, base, experts: int, top_k: int, *, seed: int = 0, scale: float = 1.0, layers=None):
    gen = torch.Generator().manual_seed(seed)
    n = model.config.num_hidden_layers
    inter, hidden = model.config.intermediate_size, model.config.hidden_size
    chosen = range(n) if layers is None else layers
    routers = [torch.randn(experts, hidden, generator=gen) if i in chosen else None for i in range(n)]
    perms = [torch.randperm(inter, generator=gen) if i in chosen else None for i in range(n)]
    return build_factor_bank(f"f{experts}{top_k}", base, top_k=top_k, routers=routers, permutations=perms,
                             scales=[scale] * n)


def logits_of(model, seqs: list[list[int]], adapters=None) -> torch.Tensor:
    """Every token's logits for a flat batch of whole sequences, [T, vocab]."""
    cache = SequenceKVCache(model.config)
    step = cache.step(list(range(len(seqs))), [len(s) for s in seqs])
    ids = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad(), step_context(StepContext(positions=step.positions(), attention=step, adapters=adapters)):
        return model(ids)


SEQS = [[5, 17, 99, 3, 250, 7, 42, 11], [8, 1, 77, 30, 30, 200], [123]]


class MaskedReferenceStep:
    """Every FFN replaced by the dense masked reference of the factor layer (all experts computed)."""

    def __init__(self, weights):
        self.weights = weights

    def linear(self, layer, targets, x, out):
        pass

    def mlp(self, layer, x, mlp):
        f = self.weights.layers[layer]
        if f is None:
            return None
        slots, w = f.route(x)
        gates = torch.zeros(x.shape[0], f.num_experts).scatter_(1, slots, w)
        return factor_ffn_reference(x, f.w_gate_up, f.w_down, gates, gate_up_bias=f.gate_up_bias)


class LoraStep:
    """A plain LoRA on every projection of every layer, for every token (a bank 'on top')."""

    def __init__(self, model, seed=0, rank=4):
        gen = torch.Generator().manual_seed(seed)
        self.deltas = {}
        for i, block in enumerate(model.layers):
            for lin in (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj):
                a = torch.randn(rank, lin.in_features, generator=gen) * 0.1
                b = torch.randn(lin.out_features, rank, generator=gen) * 0.1
                self.deltas[(i, lin.targets)] = (a, b)

    def linear(self, layer, targets, x, out):
        a, b = self.deltas[(layer, targets)]
        out += (x @ a.t()) @ b.t()

    def mlp(self, layer, x, mlp):
        return None


# -- the kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, experts, top_k, bias", [(1, 4, 2, False), (9, 8, 2, True), (33, 8, 4, False), (5, 4, 4, True)])
def test_sparse_kernel_equals_dense_masked_reference(tokens, experts, top_k, bias):
    gen = torch.Generator().manual_seed(tokens)
    hidden, inter = 24, 32
    gate_up, down = torch.randn(2 * inter, hidden, generator=gen), torch.randn(hidden, inter, generator=gen)
    perm = torch.randperm(inter, generator=gen)
    b = torch.randn(2 * inter, generator=gen) if bias else None
    w1, w2, pb = pack_experts(gate_up, down, perm, experts, b)
    x = torch.randn(tokens, hidden, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    slots, weights = factor_route(x, router, top_k, 1.7)
    slots[0, 1:] = -1  # a token with fewer pairs
    gates = torch.zeros(tokens, experts).scatter_(1, slots.clamp(min=0), torch.where(slots >= 0, weights, 0.0))
    got = factor_ffn(x, w1, w2, plan_from_slots(slots, weights), gate_up_bias=pb)
    want = factor_ffn_reference(x, w1, w2, gates, gate_up_bias=pb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_all_experts_sum_to_the_dense_ffn():
    gen = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(64, 16, generator=gen), torch.randn(16, 32, generator=gen)
    x = torch.randn(7, 16, generator=gen)
    w1, w2, _ = pack_experts(gate_up, down, torch.randperm(32, generator=gen), 4)
    g, u = (x @ gate_up.t()).chunk(2, dim=1)
    dense = (torch.nn.functional.silu(g) * u) @ down.t()
    torch.testing.assert_close(factor_ffn_reference(x, w1, w2, torch.ones(7, 4)), dense, rtol=1e-5, atol=1e-4)


# -- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("experts", [4, 8])
def test_k_equals_e_reproduces_the_dense_model(model, base, experts):
    weights = load_factor_weights(random_factor_bank(model, base, experts, experts), model)
    torch.testing.assert_close(logits_of(model, SEQS, FactorStep(weights)), logits_of(model, SEQS), rtol=1e-5, atol=1e-5)
    prompts = [SEQS[0], SEQS[2]]
    dense = greedy_decode(model, prompts, 12)
    assert greedy_decode(model, prompts, 12, lambda seq_of: FactorStep(weights)) == dense


def test_k_below_e_equals_dense_masked_reference(model, base):
    weights = load_factor_weights(random_factor_bank(model, base, 8, 2, scale=2.5), model)
    sparse = logits_of(model, SEQS, FactorStep(weights))
    torch.testing.assert_close(sparse, logits_of(model, SEQS, MaskedReferenceStep(weights)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse, logits_of(model, SEQS), atol=1e-3)  # it really is sparse


def test_factor_and_plain_requests_share_a_batch(model, base):
    weights = load_factor_weights(random_factor_bank(model, base, 4, 2, layers=[1]), model)  # layer 0 stays dense
    lens = [len(s) for s in SEQS]
    rows = torch.arange(sum(lens))[lens[0]:lens[0] + lens[1]]  # only the second sequence uses the bank
    mixed = logits_of(model, SEQS, FactorStep(weights, rows)).split(lens)
    alone_factor = logits_of(model, [SEQS[1]], FactorStep(weights))
    for i, seq in enumerate(SEQS):
        want = alone_factor if i == 1 else logits_of(model, [seq])
        torch.testing.assert_close(mixed[i], want, rtol=1e-5, atol=1e-5)


def test_lora_bank_on_top_of_a_factor_bank(model, base):
    lora = LoraStep(model)
    full = load_factor_weights(random_factor_bank(model, base, 4, 4), model)
    # K = E: factor + LoRA == dense + LoRA, the LoRA on gate/up/down included.
    torch.testing.assert_close(logits_of(model, SEQS, FactorStep(full, inner=lora)), logits_of(model, SEQS, lora),
                               rtol=1e-5, atol=1e-5)
    # K < E, mixed batch: each sequence as if alone.
    sparse = load_factor_weights(random_factor_bank(model, base, 4, 2), model)
    lens = [len(s) for s in SEQS]
    rows = torch.arange(lens[0])
    mixed = logits_of(model, SEQS, FactorStep(sparse, rows, inner=lora)).split(lens)
    torch.testing.assert_close(mixed[0], logits_of(model, [SEQS[0]], FactorStep(sparse, inner=lora)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits_of(model, [SEQS[1]], lora), rtol=1e-5, atol=1e-5)


# -- calibration ----------------------------------------------------------------------------------

def test_balanced_kmeans_groups_are_equal_and_find_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 5
    points = centers.repeat_interleave(8, 0) + torch.randn(32, 16, generator=gen) * 0.1
    labels = balanced_kmeans(points, 4)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    assert all(len(set(labels[i * 8:(i + 1) * 8].tolist())) == 1 for i in range(4))


def test_router_training_lowers_the_pa_loss(model, base):
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (32,), generator=gen).tolist() for _ in range(8)]
    cfgs = [FactorConfig(experts=4, top_k=2, lr=2e-2), FactorConfig(experts=4, top_k=4, permutation="weights")]
    (bank, report), (full, _) = factorize(model, base, seqs, cfgs, steps=30, seqs_per_step=4)
    first, last = sum(report.pa_loss[:3]) / 3, sum(report.pa_loss[-3:]) / 3
    assert last < 0.9 * first, report.pa_loss
    assert report.label_agreement[-1] > report.label_agreement[0]
    assert bank.kind == "factor" and bank.routing.top_k == 2 and bank.num_experts() == 4
    assert all(float(layer.extra["scale"]) == 1.0 for layer in full.layers)
    fw = load_factor_weights(full, model)
    torch.testing.assert_close(logits_of(model, SEQS, FactorStep(fw)), logits_of(model, SEQS), rtol=1e-5, atol=1e-5)


def test_coactivation_permutation_is_a_permutation(model):
    x = torch.randn(40, model.config.hidden_size)
    perm = choose_permutation("coact", 4, model.layers[0].mlp.gate_up_proj.weight, x)
    assert torch.equal(torch.sort(perm).values, torch.arange(model.config.intermediate_size))


# -- the bank -------------------------------------------------------------------------------------

def test_bank_round_trip_and_rules(model, base, tmp_path):
    bank = random_factor_bank(model, base, 4, 2, scale=1.5, layers=[0])
    bank.save(tmp_path / "fb")
    loaded = load_bank(tmp_path / "fb", base=base)
    assert loaded.kind == "factor" and loaded.layers[1].is_empty()
    assert torch.equal(loaded.layers[0].extra["permutation"], bank.layers[0].extra["permutation"])
    a, b = load_factor_weights(bank, model), load_factor_weights(loaded, model)
    torch.testing.assert_close(logits_of(model, SEQS, FactorStep(a)), logits_of(model, SEQS, FactorStep(b)))

    bad = random_factor_bank(model, base, 4, 2)
    bad.layers[0].extra["permutation"][0] = bad.layers[0].extra["permutation"][1]
    with pytest.raises(BankError, match="is not a permutation"):
        bad.save(tmp_path / "bad")
    with pytest.raises(BankError, match="needs scale 1"):
        random_factor_bank(model, base, 4, 4, scale=2.0)
    with pytest.raises(BankError, match="do not divide intermediate_size"):
        random_factor_bank(model, base, 3, 2)


def test_factorize_cli(tiny_model_dir, tmp_path, model):
    from server.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "bank"
    rc = main(["factorize", "--model", str(tiny_model_dir), "--experts", "4", "--top-k", "2", "--calib-steps", "3",
               "--calib-data", str(text), "--seq-len", "32", "--tokens-per-step", "64", "--out", str(out)])
    assert rc == 0
    bank = load_bank(out)
    assert bank.kind == "factor" and bank.name == "bank" and (out / "calibration.json").is_file()
    assert main(["factorize", "--model", str(tiny_model_dir), "--experts", "3", "--top-k", "2", "--out", str(out)]) == 2
