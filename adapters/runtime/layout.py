"""What the runtime needs to know about one bank: where its experts apply and how they route.

Built once per loaded bank version (off the engine thread), with its tensors packed for the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters import ExpertBank, RoutingConfig
from adapters.errors import BankError
from adapters.fingerprint import FFN_TARGETS

from .pool import PackedBank, Site


@dataclass(frozen=True)
class SiteRule:
    """How the tokens of a bank are treated at one per-linear hook site.

    n experts; ``routed``: a per-linear router picks among them (dynmole, mola); otherwise n == 1
    and the one expert applies with weight 1 (plain LoRA, MixLoRA's attention LoRAs).
    ``group``: tokens of banks with equal groups are routed by one call (same strategy, N and
    the parameters that cannot vary per token).
    """

    n: int
    routed: bool
    group: tuple = ()


@dataclass
class BankLayout:
    name: str
    kind: str
    routing: RoutingConfig
    act_fn: str | None
    sites: dict[Site, SiteRule]  # per-linear hook sites (MixLoRA's FFN projections are not among them)
    blocks: dict[int, SiteRule]  # layer -> the block router's rule (MixLoRA)
    packed: PackedBank
    nbytes: int = field(default=0)


def route_group(routing: RoutingConfig, n: int) -> tuple:
    """Key of the routing call a site joins: DynMoLE parameters may differ per token (they become
    [T] tensors); top-k's k and top-p's parameters are part of the key."""
    s = routing.strategy
    if s == "dynmole":
        return ("dynmole", n, routing.entropy_type)
    if s == "topk":
        return ("topk", n, min(routing.top_k, n))
    if s == "topp":
        return ("topp", n, routing.top_p, routing.temperature)
    return ("none", n)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: (values, fp32 scales over the other dims); a zero row
    has scale 0. An int8 pool's storage (pool.py)."""
    w = w.float()
    scale = w.abs().amax(-1) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def _stored(w: torch.Tensor, dtype: torch.dtype, bank: str, what: str) -> torch.Tensor:
    """``w`` in the pool's dtype; a finite weight that the dtype cannot hold (float16 tops out at 65504)
    is refused rather than turned into inf."""
    out = w.to(dtype).contiguous()
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(w.dtype).max and not torch.isfinite(out).all():
        big = float(w.abs().max())
        raise BankError(f"{what} holds a weight of magnitude {big:.3g}, beyond the {str(dtype).removeprefix('torch.')} "
                        f"expert pool's range ({torch.finfo(dtype).max:.0f}); serve it with --bank-dtype float32",
                        bank=bank)
    return out


def build_layout(bank: ExpertBank, *, dtype: torch.dtype) -> BankLayout:
    """Pack ``bank`` (validated, fp32 on the host) for a pool of ``dtype``.

    A ``factor`` bank (FactorLLM) has no LoRA experts and never enters the slot pool: its
    ``block_router`` splits the base FFN (adapters/factor), it is not MixLoRA's. Its layout has no
    sites and no blocks; ``packed`` is empty and only says how many experts it has. Nor does a
    ``parrot`` bank (its visual adapter is applied to images, not to the LLM's linears)."""
    if bank.kind == "parrot":
        packed = PackedBank(num_slots=bank.parrot.config.num_experts, rank=1, scaling=1.0, linears={})
        return BankLayout(name=bank.name, kind=bank.kind, routing=bank.routing, act_fn=None, sites={}, blocks={},
                          packed=packed, nbytes=0)
    if bank.kind == "factor":
        packed = PackedBank(num_slots=bank.num_experts(), rank=1, scaling=1.0, linears={})
        return BankLayout(name=bank.name, kind=bank.kind, routing=bank.routing, act_fn=None, sites={}, blocks={},
                          packed=packed, nbytes=0)
    linears, blocks, sites, block_rules, row_scales = {}, {}, {}, {}, {}
    n_max = 1
    for layer, la in enumerate(bank.layers):
        for target, ex in la.linears.items():
            site = (layer, target)
            if dtype == torch.int8:  # rows over in (A) and over out (B): route_lora's shrink and expand rows
                (a, sa), (b, sb) = int8_rows(ex.lora_a), int8_rows(ex.lora_b.transpose(1, 2))
                row_scales[site] = (sa, sb)
            else:
                a = _stored(ex.lora_a, dtype, bank.name, f"layer {layer} {target} lora_a")
                b = _stored(ex.lora_b.transpose(1, 2), dtype, bank.name, f"layer {layer} {target} lora_b")
            router = ex.router.float().contiguous() if ex.router is not None else None
            linears[site] = (a, b, router)
            n = ex.num_experts()
            n_max = max(n_max, n)
            if bank.kind == "mixlora" and target in FFN_TARGETS:
                continue  # applied inside the FFN mixture, not by the per-linear hook
            routed = router is not None
            sites[site] = SiteRule(n, routed, route_group(bank.routing, n) if routed else ("none", 1))
        if la.block_router is not None:
            n = la.block_router.shape[0]
            n_max = max(n_max, n)
            blocks[layer] = la.block_router.float().contiguous()
            block_rules[layer] = SiteRule(n, True, route_group(bank.routing, n))
    packed = PackedBank(num_slots=n_max, rank=bank.rank, scaling=float(bank.scaling), linears=linears, blocks=blocks,
                        row_scales=row_scales)
    return BankLayout(name=bank.name, kind=bank.kind, routing=bank.routing, act_fn=bank.act_fn, sites=sites,
                      blocks=block_rules, packed=packed, nbytes=packed.nbytes())
