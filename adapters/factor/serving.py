"""Serving a factor bank: its experts packed once at load, and the FFN of a batch that mixes tokens
of the factor bank with dense (base or other-bank) tokens.

Memory: packing copies the base gate|up and down weights of every factorised layer into expert
order (``pack_experts``), i.e. one extra copy of the model's FFN weights per loaded factor bank;
the dense weights stay in place for the batch's other requests.

The bank runtime's ``AdapterStep.mlp(layer, x, mlp)`` calls ``factor_mlp`` when any token of the
step uses a factor bank; ``FactorStep`` is the same thing as a standalone ``AdapterStep`` (one
factor bank, optionally another adapter on top) for tests, benchmarks and tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import plan_from_slots
from kernels.factor_cpu import factor_ffn_cpu

from ..bank import ExpertBank
from .bank import DOWN, GATE_UP, SCALE, layer_permutation
from .kernel import factor_ffn, factor_route, gate_up_columns, pack_experts

GATE_UP_TARGETS = ("gate_proj", "up_proj")
DOWN_TARGETS = ("down_proj",)


@dataclass
class FactorLayer:
    """One factorised layer, ready to serve. E experts of m = I / E neurons."""

    router: Tensor  # [E, H] fp32
    top_k: int
    scale: float
    w_gate_up: Tensor  # [E, 2m, H] model dtype
    w_down: Tensor  # [E, m, H]
    gate_up_bias: Tensor | None  # [E, 2m]
    down_bias: Tensor | None  # [H]
    gate_up_index: Tensor  # int64 [2I]: expert-major gate|up column -> dense column
    inverse_permutation: Tensor  # int64 [I]: dense neuron -> expert-major position

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (slots [T, K], weights [T, K]) for ``factor_ffn``."""
        return factor_route(x, self.router, self.top_k, self.scale)


@dataclass
class FactorWeights:
    """A factor bank bound to a model: one FactorLayer per decoder layer (None = dense layer)."""

    name: str
    layers: list[FactorLayer | None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None
                   for t in (layer.w_gate_up, layer.w_down, layer.router))


@torch.no_grad()
def load_factor_weights(bank: ExpertBank, model) -> FactorWeights:
    """Pack ``bank``'s experts from ``model``'s FFN weights (or the bank's fine-tuned ones), on the
    model's device and in its dtype. ``model``: a ``server.model.LlamaModel`` with the bank's base."""
    if bank.kind != "factor":
        raise ValueError(f"bank {bank.name!r} is of kind {bank.kind!r}, not 'factor'")
    device, dtype = model.device, model.dtype
    layers: list[FactorLayer | None] = []
    for adapters, block in zip(bank.layers, model.layers, strict=True):
        if adapters.block_router is None:
            layers.append(None)
            continue
        mlp = block.mlp
        e = adapters.block_router.shape[0]
        perm = layer_permutation(adapters).to(device)
        gate_up = adapters.extra[GATE_UP].to(device, dtype) if GATE_UP in adapters.extra else mlp.gate_up_proj.dense_weight().to(dtype)
        down = adapters.extra[DOWN].to(device, dtype) if DOWN in adapters.extra else mlp.down_proj.dense_weight().to(dtype)
        gu_bias = None if mlp.gate_up_proj.bias is None else mlp.gate_up_proj.bias
        w_gate_up, w_down, bias = pack_experts(gate_up, down, perm, e, gu_bias)
        layers.append(FactorLayer(
            router=adapters.block_router.to(device, torch.float32),
            top_k=bank.routing.top_k,
            scale=float(adapters.extra[SCALE]),
            w_gate_up=w_gate_up, w_down=w_down, gate_up_bias=bias,
            down_bias=None if mlp.down_proj.bias is None else mlp.down_proj.bias,
            gate_up_index=gate_up_columns(perm, e),
            inverse_permutation=torch.argsort(perm),
        ))
    return FactorWeights(bank.name, layers)


def factor_mlp(x: Tensor, mlp, layer: FactorLayer, factor_rows: Tensor | None = None, lora=None,
               on_route=None) -> Tensor:
    """The FFN output [T, H] of a batch x [T, H] where the tokens ``factor_rows`` (int64 [F]; None =
    all) use the factor layer and every other token the dense FFN of ``mlp`` (a ``server.model.llama.MLP``).

    ``lora``: the step's per-linear adapter work (an ``AdapterStep``) for banks on top, or None.
    Its ``linear(layer, targets, x, out)`` is called once for gate|up and once for down with
    full-batch tensors, so its token -> bank map stays valid: for dense tokens it sees the dense
    FFN's tensors; for factor tokens the delta on gate|up is added to each chosen expert's slice,
    and the down delta is taken on the sparse intermediate (zero on neurons of unchosen experts).
    At K = E this equals the dense FFN with the same LoRA. Factor tokens never run the dense FFN.
    ``on_route``: called with the factor tokens' chosen experts [F, K] (int64), for the routing statistics.
    """
    t = x.shape[0]
    if factor_rows is not None and factor_rows.numel() == t:
        factor_rows = None
    xf = x if factor_rows is None else x.index_select(0, factor_rows)

    if lora is None and factor_rows is None:  # the fast path: the whole batch on the factor bank
        fused = factor_ffn_cpu(x, layer.router, layer.w_gate_up, layer.w_down, layer.top_k, layer.scale,
                               layer.gate_up_bias) if x.device.type == "cpu" else None
        if fused is not None:  # routing and the chosen experts in one C++ call
            out, chosen = fused
        else:
            chosen, weights = layer.route(x)
            out = factor_ffn(x, layer.w_gate_up, layer.w_down, plan_from_slots(chosen, weights),
                             gate_up_bias=layer.gate_up_bias)
        if on_route is not None:
            on_route(chosen)
        return out if layer.down_bias is None else out + layer.down_bias

    inter = mlp.intermediate_size
    dense_rows = None
    if factor_rows is not None:
        keep = torch.ones(t, dtype=torch.bool, device=x.device)
        keep[factor_rows] = False
        dense_rows = keep.nonzero().squeeze(1)
    gate_up = x.new_zeros(t, 2 * inter)
    if dense_rows is not None:
        dense_x = x.index_select(0, dense_rows)
        gate_up.index_copy_(0, dense_rows, mlp.gate_up_proj.base(dense_x))
    delta = None
    if lora is not None:
        lora.linear(mlp.layer, GATE_UP_TARGETS, x, gate_up)  # factor rows hold only the delta
        delta = gate_up if factor_rows is None else gate_up.index_select(0, factor_rows)
        delta = delta.index_select(1, layer.gate_up_index)
    sparse_act = xf.new_zeros(xf.shape[0], inter) if lora is not None else None
    chosen, weights = layer.route(xf)
    if on_route is not None:
        on_route(chosen)
    plan = plan_from_slots(chosen, weights)
    y_factor = factor_ffn(xf, layer.w_gate_up, layer.w_down, plan, gate_up_bias=layer.gate_up_bias,
                          gate_up_delta=delta, intermediate=sparse_act)

    if factor_rows is None:
        out, act = y_factor, sparse_act.index_select(1, layer.inverse_permutation)
    else:
        out = x.new_empty(t, x.shape[1])
        gate, up = gate_up.index_select(0, dense_rows).split(inter, dim=1)
        dense_act = F.silu(gate) * up
        out.index_copy_(0, dense_rows, mlp.down_proj.base(dense_act))
        out.index_copy_(0, factor_rows, y_factor)
        act = None
        if lora is not None:
            act = x.new_zeros(t, inter)
            act.index_copy_(0, dense_rows, dense_act)
            act.index_copy_(0, factor_rows, sparse_act.index_select(1, layer.inverse_permutation))
    if layer.down_bias is not None:
        out = out + layer.down_bias
    if lora is not None:
        lora.linear(mlp.layer, DOWN_TARGETS, act, out)
    return out


class FactorStep:
    """An ``AdapterStep`` serving one factor bank for the tokens ``rows`` (None = all; the rest run
    dense), with an optional adapter step ``inner`` on top (e.g. a LoRA bank's) whose ``linear``
    hooks apply to every projection, the factorised FFN's included (see ``factor_mlp``)."""

    def __init__(self, weights: FactorWeights, rows: Tensor | None = None, inner=None):
        self.weights = weights
        self.rows = rows
        self.inner = inner

    def linear(self, layer: int, targets: tuple[str, ...], x: Tensor, out: Tensor) -> None:
        if self.inner is not None:
            self.inner.linear(layer, targets, x, out)

    def mlp(self, layer: int, x: Tensor, mlp) -> Tensor | None:
        factor = self.weights.layers[layer]
        if factor is None or (self.rows is not None and self.rows.numel() == 0):
            return None if self.inner is None else self.inner.mlp(layer, x, mlp)
        return factor_mlp(x, mlp, factor, self.rows, self.inner)
