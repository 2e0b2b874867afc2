"""Weight-only quantized base weights (server/model/quantization.py): each packed kernel against its
dequantized reference, the GGUF block layouts against the gguf package's own dequantization, and a
quantized tiny model against its dequantized fp32 twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant_cpu
from server.model import SequenceKVCache, StepContext, load_model, step_context
from server.model.layers import TargetLinear
from server.model.quantization import Int4Weight, Int8Weight, from_gguf_blocks
from server.model.weights import _gguf_blocks, load_quantized_blocks, save_quantized_blocks


# None: the default (on an AVX-512 CPU our fp32 kernel, kernels/quant_cpu.py); bfloat16: torch's packed kernels
COMPUTE_DTYPES = [None, torch.bfloat16]


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("out_f,in_f", [(48, 64), (128, 96), (16, 256)])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_int4_kernel_matches_its_reference(out_f, in_f, m, compute_dtype):
    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    q = Int4Weight.quantize(w, compute_dtype=compute_dtype)
    assert q.use_kernel  # the CPU build has a packed int4 kernel
    assert (q.cpu_kernel is not None) == (compute_dtype is None and quant_cpu.fast())
    ref = q.dequantize()
    # round to nearest: every weight within half a step of its group's grid (plus the bf16 rounding
    # of the scale and offset)
    step = (w.reshape(out_f, -1, 32).amax(-1) - w.reshape(out_f, -1, 32).amin(-1)) / 15
    assert ((ref - w).abs() <= step.repeat_interleave(32, 1) * 0.55 + w.abs().amax() * 2 ** -7).all()
    x = torch.randn(m, in_f, generator=g)
    _close_to_reference(q, x, ref)


def _close_to_reference(q, x, ref):
    """torch's kernels (bf16 input and output, fp32 accumulation) equal the dequantized weight
    applied to the bf16-rounded input, up to the output's bf16 rounding (2^-8 relative) and
    summation order; our fp32 kernel equals it to fp32 rounding."""
    want = F.linear(x.to(q.compute_dtype).float(), ref)
    got = q.linear(x)
    assert got.dtype == x.dtype
    if q.compute_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("out_f,in_f", [(48, 64), (200, 96)])
@pytest.mark.parametrize("m", [1, 7])
def test_int8_kernel_matches_its_reference(out_f, in_f, m, compute_dtype):
    g = torch.Generator().manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f, generator=g)
    q = Int8Weight.quantize(w, compute_dtype=compute_dtype)
    assert q.use_kernel
    assert (q.cpu_kernel is not None) == (compute_dtype is None and quant_cpu.fast())
    ref = q.dequantize()
    # half a step of the row's grid, plus the scale's bf16 rounding (2^-9 relative) times 127
    assert ((ref - w).abs() <= w.abs().amax(1, keepdim=True) * (1 / 254 + 2 ** -8) + 1e-6).all()
    x = torch.randn(m, in_f, generator=g)
    _close_to_reference(q, x, ref)


def test_a_shape_the_kernel_refuses_runs_on_the_reference():
    q = Int4Weight.quantize(torch.randn(24, 64), compute_dtype=torch.bfloat16)  # torch's CPU packing needs out % 16 == 0
    assert not q.use_kernel
    _close_to_reference(q, torch.randn(3, 64), q.dequantize())


def test_a_disagreeing_kernel_falls_back_to_the_reference(monkeypatch):
    from server.model import quantization

    monkeypatch.setattr(quantization, "_PROBED", {})
    monkeypatch.setattr(Int8Weight, "kernel", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    q = Int8Weight.quantize(torch.randn(8, 64))
    assert not q.use_kernel
    _close_to_reference(q, torch.randn(2, 64), q.dequantize())


class _FakeTensor:
    def __init__(self, kind, data):
        self.tensor_type, self.data = kind, data


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_as_the_gguf_package_does(kind, tmp_path):
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((32, 96)).astype(np.float32)
    data = quants.quantize(w, qtype)  # [24, bytes per row]
    want = torch.from_numpy(quants.dequantize(data, qtype))
    blocks = _gguf_blocks(_FakeTensor(qtype, data))
    got = from_gguf_blocks([blocks]).dequantize()
    # Q8_0: re-quantized per row, one more rounding (at most half a row step); Q4: as stored. Both:
    # scales (and offsets) rounded to bf16 (2^-9 relative).
    row_max = want.abs().amax(1, keepdim=True)
    bound = row_max * (1 / 254 + 2 ** -8) if kind == "Q8_0" else row_max * 2 ** -7
    assert ((got - want).abs() <= bound + 1e-6).all()
    # the converted file gives the same blocks back
    path = tmp_path / "q.safetensors"
    save_quantized_blocks({"x.weight": blocks}, path)
    back = load_quantized_blocks(path, {"x.weight": (32, 96)})["x.weight"]
    assert back[0] == blocks[0]
    for a, b in zip(back[1:], blocks[1:]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b.to(a.dtype)))
    with pytest.raises(Exception, match="does not fit"):
        load_quantized_blocks(path, {"x.weight": (32, 64)})


def dequantized_twin(quantized, model_dir):
    """Our fp32 model whose base weights are exactly what ``quantized``'s stand for (the reference)."""
    twin = load_model(model_dir)
    source = dict(quantized.named_modules())
    for name, module in twin.named_modules():
        if isinstance(module, TargetLinear):
            module.weight.copy_(source[name].dense_weight())
    twin.lm_head_weight = nn.Parameter(quantized.lm_head_quant.dequantize(), requires_grad=False)
    return twin


def _logits(model, prompts):
    cache = SequenceKVCache(model.config)
    lens = [len(p) for p in prompts]
    step = cache.step(list(range(len(prompts))), lens)
    with torch.no_grad(), step_context(StepContext(positions=step.positions(), attention=step)):
        return model(torch.cat(prompts))


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_model_equals_its_dequantized_twin(tiny_model_dir, mode):
    """Logits within the bf16 rounding of the kernels' inputs and outputs (about 2^-8 relative per
    linear, through 2 layers) of the fp32 twin."""
    model = load_model(tiny_model_dir, quantization=mode)
    assert model.quantization == mode and model.lm_head_weight is model.embed_tokens.weight
    assert all(m.weight is None for m in model.modules() if isinstance(m, TargetLinear))
    twin = dequantized_twin(model, tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (5, 1, 9)]
    got, want = _logits(model, prompts), _logits(twin, prompts)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # and the quantization is close to the float model (a sanity bound, not a quality measure)
    ref = _logits(load_model(tiny_model_dir), prompts)
    assert (_logits(model, prompts) - ref).abs().max() < (0.5 if mode == "int4" else 0.05) * ref.abs().max()


def test_auto_is_none_without_quantized_blocks(tiny_model_dir):
    assert load_model(tiny_model_dir, quantization="auto").quantization == "none"


@pytest.mark.slow
def test_default_model_serves_its_gguf_blocks_as_stored(default_model_dir):
    """The embedded default's int4 weights are its GGUF's Q4_1 blocks: dequantized, they equal the
    fp32 folder transformers wrote from the same file (which also checks the q/k row order), up to
    the bf16 rounding of each block's scale and offset."""
    from safetensors.torch import load_file

    model = load_model(default_model_dir, quantization="auto")
    assert model.quantization == "int4"
    state = load_file(str(default_model_dir / "model.safetensors"))
    for i in (0, len(model.layers) - 1):
        p = f"model.layers.{i}."
        qkv = torch.cat([state[p + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
        gate_up = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        for linear, want in ((model.layers[i].self_attn.qkv_proj, qkv), (model.layers[i].mlp.gate_up_proj, gate_up),
                             (model.layers[i].mlp.down_proj, state[p + "mlp.down_proj.weight"])):
            got = linear.dense_weight()
            # a permuted row or a wrong code is off by a whole step, far beyond this bound
            assert ((got - want).abs() <= want.abs().amax(1, keepdim=True) * 2 ** -7).all()
    head = state["model.embed_tokens.weight"]
    assert ((model.lm_head_quant.dequantize() - head).abs() <= head.abs().amax(1, keepdim=True) * (1 / 254 + 2 ** -8)).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_quantized_lm_head_computes_each_row_on_its_own(tiny_model_dir, mode):
    """Issue #21: the int8 head serves every row count, and a row's logits are bitwise the same
    alone as among 8 rows (the kernel's output never depends on the step's other rows)."""
    model = load_model(tiny_model_dir, quantization=mode)
    h = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model.lm_head(h)
        alone = torch.cat([model.lm_head(h[i:i + 1]) for i in range(8)])
        want = F.linear(h.bfloat16().float(), model.lm_head_quant.dequantize())
    assert torch.equal(together, alone)
    assert (together - want).abs().max() <= 0.02 * want.abs().max()  # it is the int8 head, not the float one
    assert (together - F.linear(h, model.lm_head_weight)).abs().max() > 0
