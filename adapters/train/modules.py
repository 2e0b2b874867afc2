"""A bank as trainable parameters, and the differentiable ``AdapterStep`` that runs it in our model.

``TrainableBank`` holds the same tensors as an ``ExpertBank`` (``from_bank`` / ``to_bank`` convert
exactly), as ``nn.Parameter``s. ``TrainingAdapterStep`` implements ``server.model.AdapterStep`` with
the semantics the server runs (ALGORITHMS.md §1, §2), computing every expert densely:

- ``dynmole`` (and ``mola``): per targeted linear, a router on the linear's input picks weights
  w [T, N] (``kernels.dynamic_route`` / ``topk_route``); delta = s * sum_e w_e B_e (A_e dropout(x)).
  gate/up share one hook call and write their own output slices; down sees the intermediate activation.
- ``mixlora``: the layer's FFN is replaced through ``AdapterStep.mlp``: base gate/up once, then for
  each expert e and the tokens routed to it, its LoRA deltas on gate/up, act, base down + its LoRA
  delta on down; y = sum over top-k of (renormalised) w_e * expert_e. Attention targets: plain LoRA.
- ``lora``: one expert, weight 1, no router.

Routing statistics (weights, probabilities, entropies, logits) are recorded per router for the
auxiliary losses and the progress display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.bank import ExpertBank, LayerAdapters, LinearExperts
from adapters.fingerprint import FFN_TARGETS, TARGETS, BaseFingerprint
from adapters.routing import RoutingConfig
from kernels import dynamic_route, topk_route


@dataclass(frozen=True)
class BankSpec:
    """The shape of a bank to train (the trainer's config narrows to this)."""

    kind: str
    num_experts: int
    rank: int
    alpha: float
    targets: tuple[str, ...]
    routing: RoutingConfig
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def experts_for(self, target: str) -> int:
        """Experts on ``target``: mixlora's attention targets carry one plain LoRA."""
        if self.kind == "lora" or (self.kind == "mixlora" and target not in FFN_TARGETS):
            return 1
        return self.num_experts

    def has_linear_router(self) -> bool:
        return self.kind in ("dynmole", "mola")


class LinearExpertsParams(nn.Module):
    """lora_a [N, r, in], lora_b [N, out, r], router [N, in] or None."""

    def __init__(self, n: int, rank: int, in_f: int, out_f: int, router: bool):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(n, rank, in_f))
        self.lora_b = nn.Parameter(torch.zeros(n, out_f, rank))
        self.router = nn.Parameter(torch.empty(n, in_f)) if router else None


class TrainableBank(nn.Module):
    """Every trainable tensor of a bank. ``layers[i][target]`` -> LinearExpertsParams;
    ``block_routers`` [L, N, hidden] for mixlora."""

    def __init__(self, base: BaseFingerprint, spec: BankSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        self.layers = nn.ModuleList()
        for _ in range(base.num_hidden_layers):
            layer = nn.ModuleDict()
            for t in spec.targets:
                in_f, out_f = base.linear_shape(t)
                layer[t] = LinearExpertsParams(spec.experts_for(t), spec.rank, in_f, out_f, spec.has_linear_router())
            self.layers.append(layer)
        self.block_routers = None
        if spec.kind == "mixlora":
            self.block_routers = nn.Parameter(torch.empty(base.num_hidden_layers, spec.num_experts, base.hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA A Kaiming-uniform(a=sqrt(5)) per expert, B zeros; routers Kaiming-uniform(a=sqrt(5))
        (dynmole, mola) or normal(0, 0.02) (mixlora). Uses the global torch RNG."""
        for layer in self.layers:
            for mod in layer.values():
                for a in mod.lora_a:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                mod.lora_b.zero_()
                if mod.router is not None:
                    nn.init.kaiming_uniform_(mod.router, a=math.sqrt(5))
        if self.block_routers is not None:
            nn.init.normal_(self.block_routers, 0.0, 0.02)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- conversion to and from the bank format ------------------------------------------------

    def to_bank(self, name: str, version: str = "1") -> ExpertBank:
        layers = []
        for i, layer in enumerate(self.layers):
            la = LayerAdapters()
            for t, mod in layer.items():
                la.linears[t] = LinearExperts(
                    lora_a=mod.lora_a.detach().float().cpu().clone(),
                    lora_b=mod.lora_b.detach().float().cpu().clone(),
                    scaling=self.spec.scaling,
                    router=None if mod.router is None else mod.router.detach().float().cpu().clone(),
                )
            if self.block_routers is not None:
                la.block_router = self.block_routers[i].detach().float().cpu().clone()
            layers.append(la)
        return ExpertBank(
            name=name, version=version, kind=self.spec.kind, base=self.base, rank=self.spec.rank,
            alpha=float(self.spec.alpha), use_rslora=self.spec.use_rslora, routing=self.spec.routing,
            targets=tuple(t for t in TARGETS if t in self.spec.targets), layers=layers,
        )

    @classmethod
    def from_bank(cls, bank: ExpertBank) -> "TrainableBank":
        if bank.kind not in ("lora", "dynmole", "mola", "mixlora"):
            raise ValueError(f"kind {bank.kind!r} cannot be run by the training adapter step")
        spec = BankSpec(kind=bank.kind, num_experts=max(bank.num_experts(), 1), rank=bank.rank, alpha=bank.alpha,
                        targets=tuple(bank.targets), routing=bank.routing, use_rslora=bank.use_rslora)
        module = cls(bank.base, spec)
        with torch.no_grad():
            for i, la in enumerate(bank.layers):
                for t, experts in la.linears.items():
                    mod = module.layers[i][t]
                    mod.lora_a.copy_(experts.lora_a)
                    mod.lora_b.copy_(experts.lora_b)
                    if mod.router is not None:
                        mod.router.copy_(experts.router)
                if module.block_routers is not None:
                    module.block_routers[i].copy_(la.block_router)
        return module


@dataclass
class RoutingRecord:
    """What one router saw in one forward. weights/probs [T, N] fp32, entropy [T] (dynmole/mola),
    logits [T, N] (every router)."""

    logits: Tensor
    weights: Tensor
    probs: Tensor
    entropy: Tensor | None = None


@dataclass
class TrainingAdapterStep:
    """``AdapterStep`` for one forward of the whole flat batch through one ``TrainableBank``.

    dropout is applied to the LoRA inputs when ``training``; ``records`` collects every router's
    outputs in call order (layer by layer).
    """

    bank: TrainableBank
    training: bool = False
    dropout: float = 0.05
    records: list[RoutingRecord] = field(default_factory=list)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x

    def _route(self, router: Tensor, x: Tensor) -> Tensor:
        """router [N, in], x [T, in] -> weights [T, N] (recorded)."""
        logits = F.linear(x.float(), router.float())
        routing = self.bank.spec.routing
        probs = torch.softmax(logits, dim=-1)
        if routing.strategy == "dynmole":
            weights, entropy = dynamic_route(logits, top_p=routing.top_p, keep_top_k=routing.keep_top_k,
                                             entropy_threshold=routing.entropy_threshold,
                                             q=routing.entropy_index, eps=routing.entropy_eps)
        else:
            weights, entropy = topk_route(logits, routing.top_k), None
        self.records.append(RoutingRecord(logits, weights, probs, entropy))
        return weights

    def _delta(self, mod: LinearExpertsParams, x_lora: Tensor, weights: Tensor | None) -> Tensor:
        """s * sum_e w_e B_e (A_e x_lora) for x_lora [T, in] -> [T, out]; two GEMMs over N*r."""
        n, r, in_f = mod.lora_a.shape
        h = x_lora @ mod.lora_a.reshape(n * r, in_f).t().to(x_lora.dtype)  # [T, N*r]
        if weights is not None:
            h = (h.view(-1, n, r) * weights.to(h.dtype).unsqueeze(-1)).reshape(-1, n * r)
        b = mod.lora_b.permute(0, 2, 1).reshape(n * r, -1).to(h.dtype)  # [N*r, out]
        return (h @ b) * self.bank.spec.scaling

    def linear(self, layer: int, targets: tuple[str, ...], x: Tensor, out: Tensor) -> None:
        mods = self.bank.layers[layer]
        offset = 0
        x_lora = None
        for t in targets:
            size = self.bank.base.linear_shape(t)[1]
            if t in mods and not (self.bank.spec.kind == "mixlora" and t in FFN_TARGETS):
                mod = mods[t]
                if x_lora is None:
                    x_lora = self._drop(x)
                weights = self._route(mod.router, x) if mod.router is not None else None
                out[:, offset:offset + size] += self._delta(mod, x_lora, weights).to(out.dtype)
            offset += size

    def mlp(self, layer: int, x: Tensor, mlp: nn.Module) -> Tensor | None:
        if self.bank.spec.kind != "mixlora":
            return None
        mods = self.bank.layers[layer]
        weights = self._route(self.bank.block_routers[layer], x)  # [T, N] top-k, renormalised
        inter = mlp.intermediate_size
        gate_up = F.linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)  # base, once for all tokens
        x_lora = self._drop(x)
        y = torch.zeros_like(x)
        for e in range(self.bank.spec.num_experts):
            idx = torch.nonzero(weights[:, e] > 0).squeeze(-1)
            if idx.numel() == 0:
                continue
            xe_lora = x_lora.index_select(0, idx)
            gate, up = gate_up.index_select(0, idx).split(inter, dim=-1)
            if "gate_proj" in mods:
                gate = gate + self._delta_one(mods["gate_proj"], e, xe_lora)
            if "up_proj" in mods:
                up = up + self._delta_one(mods["up_proj"], e, xe_lora)
            act = F.silu(gate) * up
            down = F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)
            if "down_proj" in mods:
                down = down + self._delta_one(mods["down_proj"], e, self._drop(act))
            y = y.index_add(0, idx, down * weights.index_select(0, idx)[:, e:e + 1].to(down.dtype))
        return y

    def _delta_one(self, mod: LinearExpertsParams, e: int, x_lora: Tensor) -> Tensor:
        a, b = mod.lora_a[e].to(x_lora.dtype), mod.lora_b[e].to(x_lora.dtype)
        return (x_lora @ a.t()) @ b.t() * self.bank.spec.scaling
