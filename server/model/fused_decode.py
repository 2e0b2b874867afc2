"""The whole decoder stack of a base-only decode step in one C call (``kernels/decode_cpu.cpp``).

At batch 1 a step's GEMMs are a third of its time on the CPU; the rest was thousands of small torch
ops and per-layer Python (norms, RoPE, casts, cache writes, residual adds). Here, once per model, a
C description of every layer is built (norm weights and eps, each linear as a (C function, weight
handle) pair plus its bias, the head shapes), and a step runs norm -> qkv -> RoPE -> cache write ->
paged attention -> o + residual -> norm -> gate_up -> SwiGLU -> down + residual for every layer,
then the final norm, inside one foreign call (GIL released). The embedding lookup, the RoPE tables
(cos/sin [M, D]), the LM head and the sampler stay in Python as before.

A step with bank rows passes, per linear, the C call that adds its banks' deltas after the base
linear (``route_lora``, one routed linear in one call: routing, plans, LoRA, statistics), asked of
the step's adapters (``c_linear_hooks``: ``adapters.runtime.step.BankStep``) before the forward;
the step takes the Python path when they cannot give one for every adapted linear (an FFN that
MixLoRA or a factor bank replaces, a site on the general path) or offer none (another adapter kind).

A step takes this path (``LlamaModel.hidden_states``) only when it can compute exactly what the
Python path computes: CPU, fp32 activations, no autograd, no adapters or adapters whose every
linear has a C hook (above), no precomputed input embeddings, the engine's paged attention with every row a decode row
on the C++ attention backend (``PagedAttentionStep.paged_decode``), every linear served by a C
kernel (``TargetLinear.c_linear``) and the library built. ``MOLESERVE_FUSED_DECODE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from kernels.cpp_build import load_cpp_library

if TYPE_CHECKING:
    from .context import StepContext
    from .llama import LlamaModel

_SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "decode_cpu.cpp"
ENV_SWITCH = "MOLESERVE_FUSED_DECODE"
# Most rows a step may have to take the fused path when a linear runs on ``ms_f32linear``: past
# that, oneDNN's packed fp32 GEMMs of the per-layer path win (at 32 rows the fused step measured
# 1.1-1.2x slower, at 1 and 8 rows 1.3-1.9x faster: BENCHMARKS.md, "Quantized base (issue #21)").
F32_MAX_ROWS = 16


@dataclass
class PagedDecode:
    """A decode-only step's paged attention, as the fused forward reads it (all int64, contiguous).

    k_cache / v_cache: every layer's cache [layers, blocks, BS, Hkv, D] fp32.
    slot_mapping [M]: each row's flat cache slot. rows / row_seq / ctx_lens [M]: each decode row's
    flat row, its sequence's row of block_tables [S, max_blocks], its context length.
    window: the sliding window, or None.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    rows: torch.Tensor
    row_seq: torch.Tensor
    ctx_lens: torch.Tensor
    block_tables: torch.Tensor
    window: int | None


class _Linear(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


class _Hook(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("a", ctypes.c_void_p), ("b", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float), ("final_norm", ctypes.c_void_p), ("layers", ctypes.c_void_p)]


class F32Weight(ctypes.Structure):
    """The handle ``ms_f32linear`` reads: a plain fp32 weight [n, k], row-major."""

    _fields_ = [("w", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The kernel (compiled once, cached on disk; see kernels.cpp_build); None if unavailable."""
    lib = load_cpp_library(_SOURCE, "fused decode")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ms_decode_forward.argtypes = [p, p, i64, p, p, p, p, i64, i64, p, p, p, p, p, i64, i64, p, ctypes.c_int]
    lib.ms_decode_forward.restype = ctypes.c_int
    lib.ms_f32linear.argtypes = [p, p, i64, p, ctypes.c_int]
    lib.ms_f32linear.restype = None
    return lib


def f32_linear(weight: torch.Tensor) -> tuple[int, F32Weight] | None:
    """(address of ``ms_f32linear``, its handle for ``weight`` [n, k]) for a CPU fp32 contiguous
    weight; None otherwise. The handle points into ``weight``: keep both alive together."""
    lib = load_library()
    if lib is None or weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    fn = ctypes.cast(lib.ms_f32linear, ctypes.c_void_p).value
    return fn, F32Weight(weight.data_ptr(), weight.shape[0], weight.shape[1])


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class FusedDecode:
    """One model's layers described for ``ms_decode_forward``; ``run`` is one decode step's decoder."""

    def __init__(self, lib: ctypes.CDLL, model: LlamaModel, linears: list[list[tuple[int, int]]]):
        cfg = model.config
        self.lib = lib
        f32 = ctypes.cast(lib.ms_f32linear, ctypes.c_void_p).value
        # steps with more rows take the per-layer path (its GEMMs are faster there)
        self.max_rows = F32_MAX_ROWS if any(fn == f32 for fns in linears for fn, _ in fns) else None
        # every tensor the description points into, kept alive with it (a weight replaced later, e.g. by
        # ``quantize``, drops the whole description: ``LlamaModel.fused_decoder``)
        self._keep: list[torch.Tensor] = [model.norm.weight]
        self._handles: list[tuple] = []
        # (layer, targets) of every linear in the order the forward calls them: where a hook goes
        self.targets: list[tuple[int, tuple[str, ...]]] = []
        layers = (_Layer * len(model.layers))()
        for i, (desc, layer, fns) in enumerate(zip(layers, model.layers, linears)):
            mods = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            self.targets.extend((i, m.targets) for m in mods)
            desc.norm1 = self._ptr(layer.input_layernorm.weight)
            desc.norm2 = self._ptr(layer.post_attention_layernorm.weight)
            # what the weight handles live in (a float weight's handle, a quantized format's object)
            self._handles.extend((m.weight, m.quant, getattr(m, "_c_weight", None)) for m in mods)
            for name, mod, (fn, handle) in zip(("qkv", "o", "gate_up", "down"), mods, fns):
                bias = self._ptr(mod.bias) if mod.bias is not None else None
                setattr(desc, name, _Linear(fn, handle, bias, mod.out_features))
        self._layers = layers
        self._model = _Model(len(model.layers), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                             cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, self._ptr(model.norm.weight),
                             ctypes.addressof(layers))
        self._address = ctypes.addressof(self._model)

    def __reduce__(self):  # a copied (or pickled) model must not point at this one's tensors: rebuilt
        return type(None), ()

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.detach()
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("fused decode: norm weights and biases must be contiguous CPU fp32")
        self._keep.append(t)
        return t.data_ptr()

    @classmethod
    def build(cls, model: LlamaModel) -> FusedDecode | None:
        """The description of ``model``, or None when a part has no C kernel (or the library is missing)."""
        lib = load_library()
        if lib is None or model.config.head_dim % 2:
            return None
        linears = []
        for layer in model.layers:
            fns = [m.c_linear() for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                          layer.mlp.down_proj)]
            if any(f is None for f in fns):
                return None
            linears.append(fns)
        try:
            return cls(lib, model, linears)
        except ValueError:
            return None

    def hooks(self, adapters, rows: int) -> tuple[ctypes.Array, Callable[[], None]] | None:
        """The step's per-linear adapter calls (``c_linear_hooks``) as the forward reads them, and what
        to call after it; None when ``adapters`` cannot give them."""
        ask = getattr(adapters, "c_linear_hooks", None)
        found = ask(self.targets, rows) if ask is not None else None
        if found is None:
            return None
        calls, done = found
        hooks = (_Hook * len(self.targets))()
        for slot, call in zip(hooks, calls):
            if call is not None:
                slot.fn, slot.a, slot.b = call
        return hooks, done

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, paged: PagedDecode,
            hooks: ctypes.Array | None = None) -> torch.Tensor:
        """h [M, hidden] token embeddings (overwritten) -> final normed hidden states [M, hidden];
        cos / sin [M, head_dim]. Writes the step's keys and values into the cache. ``hooks``: the
        step's adapter calls (``hooks()``), or None."""
        k, v = paged.k_cache, paged.v_cache
        bt = paged.block_tables.contiguous()
        rc = self.lib.ms_decode_forward(
            self._address, h.data_ptr(), h.shape[0], cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
            k.data_ptr(), v.data_ptr(), k.shape[1], k.shape[2], paged.slot_mapping.contiguous().data_ptr(),
            paged.rows.contiguous().data_ptr(), paged.row_seq.contiguous().data_ptr(),
            paged.ctx_lens.contiguous().data_ptr(), bt.data_ptr(), bt.shape[1], paged.window or 0,
            None if hooks is None else ctypes.addressof(hooks), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"ms_decode_forward failed with code {rc}")
        return h


def fused_step(model: LlamaModel, ctx: StepContext, h: torch.Tensor
               ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``run`` bound to this step's paged attention when the step qualifies (see the module
    docstring), else None. Cheap: no host sync; with adapters one lookup per linear (their C calls)."""
    if (ctx.input_embeds is not None or h.device.type != "cpu"
            or h.dtype != torch.float32 or torch.is_grad_enabled() or not enabled()):
        return None
    paged_decode = getattr(ctx.attention, "paged_decode", None)
    paged = paged_decode() if paged_decode is not None else None
    if paged is None or paged.rows.shape[0] != h.shape[0] or paged.k_cache.dtype != torch.float32:
        return None
    decoder = model.fused_decoder()
    if decoder is None or (decoder.max_rows is not None and h.shape[0] > decoder.max_rows):
        return None
    if ctx.adapters is None:
        return lambda h, cos, sin: decoder.run(h, cos, sin, paged)
    found = decoder.hooks(ctx.adapters, h.shape[0])
    if found is None:
        return None
    hooks, done = found

    def run(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = decoder.run(h, cos, sin, paged, hooks)
        done()
        return out

    return run
