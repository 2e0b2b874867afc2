"""LM fine-tuning of a factor bank's expert slices: it lowers the factorised model's loss, writes a
valid bank the server packs from, and leaves the base model untouched."""

from __future__ import annotations

import torch

from adapters import BaseFingerprint, load_bank
from adapters.factor import FactorStep, load_factor_weights, pack_experts
from adapters.factor.bank import DOWN, GATE_UP
from adapters.factor.finetune import finetune_factor_bank, lm_loss, unpack_experts
from server.model import load_model
from tests.factor.test_factor import random_factor_bank


def test_unpack_inverts_pack():
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(48, 8, generator=gen), torch.randn(8, 24, generator=gen)
    perm = torch.randperm(24, generator=gen)
    w1, w2, _ = pack_experts(gate_up, down, perm, 4)
    g, d = unpack_experts(w1, w2, perm, 4)
    assert torch.equal(g, gate_up) and torch.equal(d, down)


def test_finetune_lowers_the_loss_and_round_trips(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    base = BaseFingerprint.from_hf_config(model.config.raw)
    bank = random_factor_bank(model, base, 4, 2, seed=1)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, model.config.vocab_size, (12,), generator=gen).tolist() for _ in range(4)]
    before_params = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = float(lm_loss(model, seqs, FactorStep(load_factor_weights(bank, model))))
    tuned, report = finetune_factor_bank(model, bank, seqs, steps=6, seqs_per_step=4, lr=1e-2)
    with torch.no_grad():
        after = float(lm_loss(model, seqs, FactorStep(load_factor_weights(tuned, model))))
    assert after < before - 0.05, (before, after)
    assert report["steps"] == 6 and report["tokens"] == 6 * 48 and len(report["loss"]) == 6
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))  # base untouched
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    for la, lt in zip(bank.layers, tuned.layers):  # routing kept, weights stored per factorised layer
        assert (la.block_router is None) == (lt.block_router is None)
        if la.block_router is not None:
            assert torch.equal(la.block_router, lt.block_router) and {GATE_UP, DOWN} <= set(lt.extra)
    tuned.save(tmp_path / "tuned")
    loaded = load_bank(tmp_path / "tuned", base=base)
    with torch.no_grad():
        again = float(lm_loss(model, seqs, FactorStep(load_factor_weights(loaded, model))))
    assert abs(again - after) < 1e-5


def test_factorize_cli_finetunes(tiny_model_dir, tmp_path):
    import json

    from server.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "bank"
    rc = main(["factorize", "--model", str(tiny_model_dir), "--experts", "4", "--top-k", "2", "--calib-steps", "2",
               "--calib-data", str(text), "--seq-len", "32", "--tokens-per-step", "64", "--finetune-steps", "3",
               "--finetune-lr", "1e-3", "--out", str(out)])
    assert rc == 0
    bank = load_bank(out)
    assert all({GATE_UP, DOWN} <= set(la.extra) for la in bank.layers if la.block_router is not None)
    report = json.loads((out / "finetune.json").read_text())
    assert report["steps"] == 3 and len(report["loss"]) == 3
    assert main(["factorize", "--model", str(tiny_model_dir), "--experts", "4", "--top-k", "2",
                 "--finetune-lr", "0", "--out", str(out)]) == 2
