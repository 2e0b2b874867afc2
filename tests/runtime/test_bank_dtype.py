"""Banks stored in a half-precision or int8 pool on a float32 model (``--bank-dtype``; the CPU default
is float16 on a float32 base, int8 on a quantized one; int8 with per-row scales is CPU-only)."""

from __future__ import annotations

import dataclasses

import torch

import pytest

from adapters.runtime import BankRegistry
from server.model import load_model
from tests.adapters.bank_builders import fingerprint_of, write_mixlora, write_plugin_moe
from tests.runtime.helpers import flat_logits


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.05), (torch.float16, 0.01), (torch.int8, 0.05)])
def test_half_pool_matches_fp32_pool_within_rounding(tmp_path, tiny_model_dir, dtype, bound):
    model = load_model(tiny_model_dir)
    fp = fingerprint_of(tiny_model_dir)
    write_plugin_moe(tmp_path / "dyn", fp, kind="dynmole", r=4, alpha=8, num_experts=4)
    write_mixlora(tmp_path / "mix", fp, r=4, alpha=8, num_experts=4, top_k=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (5, 9, 3)]
    banks = ["dyn", "mix", None]
    outs = {}
    for dt in (torch.float32, dtype):
        reg = BankRegistry(model.config, dtype=dt, allowed_roots=[tmp_path])
        reg.load_sync("dyn", tmp_path / "dyn")
        reg.load_sync("mix", tmp_path / "mix")
        assert next(iter(reg.pool.state.lora_a.values())).dtype == dt
        outs[dt] = flat_logits(model, reg, prompts, banks)
    base = flat_logits(model, BankRegistry(model.config), prompts, [None] * 3)
    for bank, a, b, ref in zip(banks, outs[torch.float32], outs[dtype], base):
        if bank is None:
            assert torch.equal(a, b)
            continue
        delta = (a - ref).abs().max().item()
        assert delta > 1e-3  # the bank does change the logits ...
        assert (a - b).abs().max().item() < bound * delta  # ... and half storage barely changes that change


def test_serve_bank_dtype_flag(tiny_model_dir):
    from server.commands.serve import build_engine
    from server.settings import Settings

    _, registry = build_engine(Settings(model=str(tiny_model_dir), bank_dtype="bfloat16", kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.bfloat16
    _, registry = build_engine(Settings(model=str(tiny_model_dir), bank_dtype="float32", kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.float32
    _, registry = build_engine(Settings(model=str(tiny_model_dir), bank_dtype="int8", kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.int8
    _, registry = build_engine(Settings(model=str(tiny_model_dir), kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.float16  # auto on a float32 CPU model
    _, registry = build_engine(Settings(model=str(tiny_model_dir), quantization="int8", kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.int8  # auto on a quantized CPU base
    _, registry = build_engine(Settings(model=str(tiny_model_dir), quantization="int8", bank_dtype="float16",
                                        kv_cache_memory=16 << 20))
    assert registry.pool.dtype == torch.float16  # the flag overrides it


def test_int8_pool_rows_install_free_and_compact(tmp_path, tiny_model_dir):
    """An int8 pool holds each row as int8 values and one scale: the stored weights are the bank's to
    within half a step of its row; a freed range is zero (values and scales); compaction moves both."""
    from adapters import load_bank
    from adapters.runtime.pool import SlotPool
    from kernels.routed_lora.cpu_ops import packs_int8, unpack_int8_a, unpack_int8_b

    model = load_model(tiny_model_dir)
    fp = fingerprint_of(tiny_model_dir)
    write_plugin_moe(tmp_path / "dyn", fp, kind="dynmole", r=4, alpha=8, num_experts=4)
    bank = load_bank(tmp_path / "dyn", base=fp, name="dyn")
    reg = BankRegistry(model.config, dtype=torch.int8)
    reg.add(bank)
    st = reg.pool.state
    site = (1, "up_proj")
    off = min(reg.pool._ranges)
    assert st.packed == packs_int8()  # in the kernel's packed order where its build has the VNNI expand
    a, b = st.lora_a[site][off:off + 4], st.lora_b[site][off:off + 4]
    if st.packed:
        a, b = unpack_int8_a(a), unpack_int8_b(b)
    a = a.float() * st.lora_a_scale[site][off:off + 4].unsqueeze(-1)
    b = b.float() * st.lora_b_scale[site][off:off + 4].unsqueeze(-1)
    ex = bank.layers[1].linears["up_proj"]
    step_a = ex.lora_a.abs().amax(-1, keepdim=True) / 127
    step_b = ex.lora_b.transpose(1, 2).abs().amax(-1, keepdim=True) / 127
    assert st.lora_a[site].dtype == torch.int8 and (a - ex.lora_a).abs().le(step_a / 2 + 1e-7).all()
    assert (b - ex.lora_b.transpose(1, 2)).abs().le(step_b / 2 + 1e-7).all()
    reg.add(dataclasses.replace(bank, name="dyn2"))
    reg.unload_sync("dyn")
    assert not st.lora_a_scale[site][off:off + 4].any() and not st.lora_a[site][off:off + 4].any()
    with pytest.raises(ValueError, match="int8 expert pool runs on the CPU only"):
        SlotPool(model.config, device="cuda", dtype=torch.int8)


def test_packed_int8_pool_keeps_its_banks_through_rank_growth(tmp_path, tiny_model_dir):
    """Where the slots are stored packed (the order depends on R), a bank of a larger rank regrows
    the pool: R becomes a multiple of 4 and the banks already there keep their weights."""
    from adapters import load_bank
    from kernels.routed_lora.cpu_ops import packs_int8, unpack_int8_a, unpack_int8_b

    if not packs_int8():
        pytest.skip("this kernel build has no VNNI expand: the pool stores rows")
    model = load_model(tiny_model_dir)
    fp = fingerprint_of(tiny_model_dir)
    write_plugin_moe(tmp_path / "small", fp, kind="dynmole", r=4, alpha=8, num_experts=4, seed=1)
    write_plugin_moe(tmp_path / "big", fp, kind="dynmole", r=6, alpha=8, num_experts=4, seed=2)
    small, big = load_bank(tmp_path / "small", base=fp, name="small"), load_bank(tmp_path / "big", base=fp, name="big")
    reg = BankRegistry(model.config, dtype=torch.int8)
    site = (1, "down_proj")

    def stored(name: str, r: int) -> torch.Tensor:  # the bank's dequantized A and B at the site, flat
        st = reg.pool.state
        off = reg._current[name].offset
        a = unpack_int8_a(st.lora_a[site][off:off + 4]).float() * st.lora_a_scale[site][off:off + 4].unsqueeze(-1)
        b = unpack_int8_b(st.lora_b[site][off:off + 4]).float() * st.lora_b_scale[site][off:off + 4].unsqueeze(-1)
        assert not a[:, r:].any() and not b[:, r:].any()  # zero beyond the bank's rank
        return torch.cat([a[:, :r].flatten(), b[:, :r].flatten()])

    reg.add(small)
    assert reg.pool.state.packed and reg.pool.state.rank == 4
    before = stored("small", 4)
    reg.add(big)
    assert reg.pool.state.rank == 8  # 6, in fours
    assert torch.equal(stored("small", 4), before)
    ex = big.layers[1].linears["down_proj"]
    want_a, want_b = ex.lora_a, ex.lora_b.transpose(1, 2)
    half = torch.cat([(want_a.abs().amax(-1, keepdim=True) / 254).expand_as(want_a).flatten(),
                      (want_b.abs().amax(-1, keepdim=True) / 254).expand_as(want_b).flatten()])
    got = stored("big", 6)
    assert (got - torch.cat([want_a.flatten(), want_b.flatten()])).abs().le(half + 1e-7).all()


def test_a_weight_beyond_float16_is_refused_by_a_float16_pool_not_turned_into_inf(tmp_path, tiny_model_dir):
    from adapters.runtime.registry import BankLoadError
    from adapters import load_bank

    model = load_model(tiny_model_dir)
    fp = fingerprint_of(tiny_model_dir)
    write_plugin_moe(tmp_path / "big", fp, kind="dynmole", r=4, alpha=8, num_experts=4)
    bank = load_bank(tmp_path / "big", base=fp, name="big")
    bank.layers[1].linears["up_proj"].lora_b[2, 0, 0] = 1e5  # finite, valid, but no float16 holds it
    reg = BankRegistry(model.config, dtype=torch.float16)
    with pytest.raises(BankLoadError, match=r"bank 'big': layer 1 up_proj lora_b .*1e\+05.*float16.*--bank-dtype float32"):
        reg.add(bank)
    assert reg.list() == [] and reg.pool.slots_used == 0  # nothing half-loaded
    exact = BankRegistry(model.config, dtype=torch.float32)
    exact.add(bank)
    assert exact.list()[0]["name"] == "big"
