"""One engine step's adapter work: token -> bank -> expert slots, routers, routed LoRA calls.

``BankStep`` implements ``server.model.AdapterStep``. It is built once per step by the registry
from the pool state and each token's bank; everything per token is a tensor op, Python loops run
over banks and sites only. Per (layer, target) hook site and step:

- one router GEMM for every bank at once (``x @ router_pool.T`` -> [T, S]), then each token reads
  its own bank's N columns (one ``take`` with a per-step index);
- one routing call per group of banks that route alike (all DynMoLE banks with N experts share one
  ``dynamic_route`` call, their parameters as per-token tensors);
- one pair plan, one ``routed_lora`` call per target over the pooled slots.

Sites where every bank present is a plain LoRA (N = 1, no router) get a plan built once per step.
MixLoRA banks replace the FFN of their tokens (``mlp``): base gate/up once for all tokens, then per
(token, expert) pair the expert's gate/up deltas, the activation, the base down projection plus the
expert's down delta, weighted and summed (one plan per layer, reused for gate, up and down).

Factor banks (FactorLLM, ``adapters.factor``) also replace the FFN, of their tokens
(``token_factor``), with the sparse factorised FFN (``factor_mlp``). Per layer where a factor bank
of the step is factorised, each factor bank's tokens run ``factor_mlp`` on their rows, with the
LoRA experts of their ``factor+bank`` bank on top (a sub-step over those rows), and the other
tokens take the usual path (dense + per-linear deltas, or MixLoRA) on theirs. A factor bank and
a MixLoRA bank never serve one token (the registry refuses the combination).

Routing statistics are kept as the tensors routing produced and reduced once, after the forward,
by ``routing_stats()``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import PairPlan, dynamic_route, plan_from_slots, routed_lora, slots_from_dense, topk_route
from kernels.routed_lora.cpu_ops import (STAT_WIDTH, RouteLoraSites, RouteLoraStats, RouteLoraStep, build_plan_cpu,
                                        route_plan_cpu, routed_lora_int8_cpu)
from server.engine.routing_stats import ENTROPY_BUCKETS, BankRoutingStats, RoutingStats, SiteCounts
from adapters.factor.serving import factor_mlp
from adapters.fingerprint import FFN_TARGETS
from server.model import ModelConfig

from .layout import BankLayout, SiteRule
from .pool import PoolState, Site, linear_shape

_MISSING = object()
_NOTHING = object()  # a (layer, targets) no bank of the step adapts
FAST_PATH = True  # the one-call C++ route_lora decode path (tests switch it off to compare)


@dataclass
class _FastRecords:
    """What a step's ``route_lora`` calls did: their statistics and which ``WholeLinear`` ran."""

    stats: RouteLoraStats | None = None
    used: dict = field(default_factory=dict)  # WholeLinear -> None, in call order


@dataclass(frozen=True, eq=False)
class WholeLinear:
    """A (layer, targets) that one ``route_lora`` call serves: its sites are one DynMoLE (Tsallis)
    group of the step's banks ``members`` (indices into the step's bank list) with n experts, and
    nothing else; or only plain LoRA (``plain``: every member bank has one unrouted expert there).
    Depends only on the banks' layouts and the pool state, so it is kept across steps."""

    sites: tuple
    members: tuple[int, ...]
    n: int
    args: RouteLoraSites
    plain: bool = False  # plain LoRA sites (n = 1, no router): each member token's one slot, weight 1


@dataclass
class RouteGroup:
    """Tokens routed by one call at a site. rows [Tg] (None: all T tokens); take_idx [Tg, n] flat
    indices into the [T, S] logits; offsets [Tg] each row's bank slot offset; bank [Tg] each row's
    index in the step's bank list; params: scalars or [Tg] tensors; bcast_thr [Tg]: the entropy
    above which a row broadcasts (+inf where broadcast is off)."""

    key: tuple
    rows: Tensor | None
    take_idx: Tensor
    offsets: Tensor
    bank: Tensor
    params: dict
    bcast_thr: Tensor | None


@dataclass
class SiteSpec:
    groups: list[RouteGroup]
    plain_slot: Tensor | None  # [T] slot of tokens whose bank applies a plain LoRA here, -1 elsewhere
    static_plan: PairPlan | None  # when nothing is routed here
    full: bool  # one group covering every token, nothing plain
    rows_mask: Tensor | None = None  # [T] bool: tokens with any work at this site (blocks only)
    acts: list = field(default_factory=list)  # blocks: (activation, [P?] selector) per distinct act
    act_names: set | None = None  # blocks: the activations of the groups' banks (``_act``), once known


def _topp_route(logits: Tensor, top_p: float, temperature: float) -> Tensor:
    """MoE-PEFT mixlora-dynamic: keep experts while the cumulative sum *before* them is <= top_p."""
    p = torch.softmax(logits.float(), dim=-1)
    if temperature > 0:
        p = p / temperature
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) <= top_p
    mask = torch.empty_like(keep).scatter_(-1, order, keep)
    return p * mask


def _entropy(p: Tensor, kind: str, q: Tensor | float, eps: float) -> Tensor:
    """Normalised Shannon (eps inside the log, as the DynMoLE release) or Renyi entropy [T]."""
    n = p.shape[-1]
    if n <= 1:
        return torch.zeros(p.shape[0])
    if kind == "shannon":
        pe = p + eps
        return -(pe * pe.log()).sum(-1) / math.log(n)
    q = q.reshape(-1) if isinstance(q, Tensor) else q
    return torch.log(p.pow(q.unsqueeze(-1) if isinstance(q, Tensor) else q).sum(-1)) / (1 - q) / math.log(n)


def route(group: RouteGroup, logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """logits [Tg, n] -> (dense weights [Tg, n] fp32, DynMoLE entropy [Tg] or None)."""
    strategy = group.key[0]
    prm = group.params
    if strategy == "topk":
        return topk_route(logits, group.key[2]), None
    if strategy == "topp":
        return _topp_route(logits, group.key[2], group.key[3]), None
    if strategy == "dynmole":
        etype = group.key[2]
        if etype == "tsallis":
            return dynamic_route(logits, top_p=prm["top_p"], keep_top_k=prm["keep_top_k"],
                                 entropy_threshold=prm["entropy_threshold"], q=prm["q"], eps=prm["eps"])
        w, _ = dynamic_route(logits, top_p=prm["top_p"], keep_top_k=prm["keep_top_k"], entropy_threshold=1.0,
                             q=2.0, eps=prm["eps"])
        p = torch.softmax(logits.float(), dim=-1)
        ent = _entropy(p, etype, prm["q"], prm["eps"])
        return torch.where((ent > group.bcast_thr).unsqueeze(-1), p, w), ent
    raise ValueError(f"unknown routing strategy {strategy!r}")


def pair_plan(plan: PairPlan) -> PairPlan:
    """The plan whose 'tokens' are ``plan``'s pairs (already grouped by slot), each weight 1."""
    p = plan.num_pairs
    ones = torch.ones(p, dtype=torch.float32, device=plan.pair_slot.device)
    return PairPlan(slots=plan.pair_slot.unsqueeze(1), weights=ones.unsqueeze(1),
                    pair_token=torch.arange(p, device=ones.device), pair_slot=plan.pair_slot, pair_weight=ones,
                    seg_slot=plan.seg_slot, seg_start=plan.seg_start, seg_len=plan.seg_len,
                    max_seg_len=plan.max_seg_len)


def _activation(name: str | None, cfg: ModelConfig) -> Callable[[Tensor], Tensor]:
    name = name or cfg.hidden_act
    if name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@dataclass
class StepBank:
    """A bank version present in the step: its layout and where the pool holds it."""

    name: str
    layout: BankLayout
    offset: int


@dataclass
class FactorRows:
    """At a layer: the tokens of each factorised factor bank (with a sub-step over them) and the rest."""

    groups: list[tuple[int, Tensor | None, "BankStep"]]  # (factor index, rows or None = all, sub-step)
    rest: Tensor | None  # the other tokens' rows (None: no other token)
    rest_step: "BankStep | None"


class BankStep:
    """The step's ``AdapterStep``. ``token_bank [T]``: each token's index into ``banks``, -1 = none.
    ``factors``: the step's factor banks (``adapters.factor.FactorWeights``); ``token_factor [T]``:
    each token's index into ``factors``, -1 = none (None: no factor bank in the step)."""

    def __init__(self, cfg: ModelConfig, state: PoolState, banks: list[StepBank], token_bank: Tensor, *,
                 collect_stats: bool = True, backend: str = "auto", factors: list | None = None,
                 token_factor: Tensor | None = None, factor_names: list[str] | None = None, static_plans: bool = False):
        self.cfg = cfg
        self.factors = list(factors or [])
        self.factor_names = list(factor_names or [w.name for w in self.factors])  # as the registry names them
        self.token_factor = token_factor if self.factors else None
        self._factor_rows: dict[tuple[int, ...], FactorRows] = {}
        self._present: set[int] | None = None
        self.state = state
        self.banks = banks
        self.num_tokens = token_bank.shape[0]
        self.token_bank = token_bank
        self.collect_stats = collect_stats
        self.backend = backend
        dev = token_bank.device
        table = torch.tensor([b.offset for b in banks] + [-1], dtype=torch.long, device=dev)
        self.token_offset = table[token_bank]  # -1 indexes the trailing -1: base tokens
        self._bank_ids = torch.arange(len(banks), device=dev)
        self._sites: dict[Site, SiteSpec | None] = {}
        self._any_sites: set | None = None
        self._blocks: dict[int, SiteSpec | None] = {}
        self._by_key: dict[tuple, SiteSpec | None] = {}
        self._columns: dict[tuple[str, ...], list[tuple[str, int, int]]] = {}
        self._records: list[tuple[object, RouteGroup, Tensor, Tensor, Tensor | None]] = []
        self._routers: dict[tuple, Tensor] = {}  # sites -> their routers concatenated ([M*S, in])
        self._stacked_groups: dict[tuple, RouteGroup] = {}
        self._cpu_plans = dev.type == "cpu" and backend in ("auto", "cpu") and not static_plans
        # GPU: plans of static sizes, built without a host sync inside the layer loop (``static_plans``:
        # also off CUDA, without the CPU fast path: the step a CUDA graph captures, run eagerly)
        self.static_plans = dev.type == "cuda" or static_plans
        self._decide = self._decisions()  # (layer, targets) -> WholeLinear | _NOTHING | None (general path)
        self._group_steps: dict[tuple, RouteLoraStep] = {}  # (members, n) -> the step's route_lora group
        self._fast = _FastRecords()  # what the route_lora calls did (shared with sub-steps)
        self._kept: tuple[RouteLoraStats, dict] | None = None  # _kept_groups
        self._factor_routes: list[tuple[int, int, Tensor]] = []  # (factor index, layer, chosen experts [F, K])

    # -- per-step metadata, built on first use and cached --------------------------------------

    def _spec(self, rules: list[SiteRule | None], block_layer: int | None = None) -> SiteSpec | None:
        key = (block_layer is not None, *(None if r is None else (r.routed, r.group) for r in rules),
               *(self.banks[i].layout.act_fn for i, r in enumerate(rules) if r is not None and block_layer is not None))
        spec = self._by_key.get(key, _MISSING)
        if spec is not _MISSING:
            return spec
        spec = self._build_spec(rules, block_layer is not None)
        self._by_key[key] = spec
        return spec

    def _build_spec(self, rules: list[SiteRule | None], block: bool) -> SiteSpec | None:
        if all(r is None for r in rules):
            return None
        t, dev, cap = self.num_tokens, self.token_bank.device, self.state.capacity
        plain = [i for i, r in enumerate(rules) if r is not None and not r.routed]
        by_group: dict[tuple, list[int]] = {}
        for i, r in enumerate(rules):
            if r is not None and r.routed:
                by_group.setdefault(r.group, []).append(i)
        plain_slot = None
        if plain:
            is_plain = torch.isin(self.token_bank, torch.tensor(plain, device=dev))
            plain_slot = torch.where(is_plain, self.token_offset, -1)
        groups = []
        for key, members in by_group.items():
            n = key[1]
            in_group = torch.isin(self.token_bank, torch.tensor(members, device=dev))
            rows = in_group.nonzero().squeeze(1)
            full = rows.numel() == t
            offsets = self.token_offset[rows]
            take = (rows * cap + offsets).unsqueeze(1) + torch.arange(n, device=dev)
            bank = self.token_bank[rows]
            params, thr = {}, None
            if key[0] == "dynmole":
                cfgs = [self.banks[i].layout.routing for i in members]
                for name, attr in (("top_p", "top_p"), ("keep_top_k", "keep_top_k"),
                                   ("entropy_threshold", "entropy_threshold"), ("q", "entropy_index")):
                    values = [getattr(c, attr) for c in cfgs]
                    if len(set(values)) == 1:
                        params[name] = values[0]
                    else:  # one value per token: a table over the step's banks, read per row
                        table = torch.zeros(len(self.banks), dtype=torch.float32, device=dev)
                        table[torch.tensor(members, device=dev)] = torch.tensor(values, dtype=torch.float32, device=dev)
                        params[name] = table[bank]
                params["eps"] = cfgs[0].entropy_eps
                off = torch.tensor([math.inf if (c.entropy_index <= 0 or c.entropy_threshold >= 1) else c.entropy_threshold
                                    for c in cfgs], dtype=torch.float32, device=dev)
                table = torch.full((len(self.banks),), math.inf, device=dev)
                table[torch.tensor(members, device=dev)] = off
                thr = table[bank]
            groups.append(RouteGroup(key, None if full else rows, take, offsets, bank, params, thr))
        full = len(groups) == 1 and groups[0].rows is None and plain_slot is None
        static = None
        if not groups:
            static = plan_from_slots(plain_slot.unsqueeze(1), (plain_slot >= 0).float().unsqueeze(1))
        spec = SiteSpec(groups, plain_slot, static, full)
        if block:
            spec.rows_mask = torch.isin(self.token_bank, torch.tensor([i for i, r in enumerate(rules) if r], device=dev))
        return spec

    def _site_spec(self, site: Site) -> SiteSpec | None:
        spec = self._sites.get(site, _MISSING)
        if spec is _MISSING:
            if self._any_sites is None:  # sites some bank of the step adapts: the others return at once
                self._any_sites = set().union(*(b.layout.sites.keys() for b in self.banks))
            spec = self._spec([b.layout.sites.get(site) for b in self.banks]) if site in self._any_sites else None
            self._sites[site] = spec
        return spec

    def _block_spec(self, layer: int) -> SiteSpec | None:
        spec = self._blocks.get(layer, _MISSING)
        if spec is _MISSING:
            spec = self._spec([b.layout.blocks.get(layer) for b in self.banks], block_layer=layer)
            self._blocks[layer] = spec
        return spec

    # -- routing -------------------------------------------------------------------------------

    def _plan(self, spec: SiteSpec, router: Tensor, x: Tensor, site: object) -> PairPlan:
        """Route every group of ``spec`` on x [T, in] with the pooled router [S, in]; one plan."""
        return self._plans(spec, (router,), x, (site,))[0]

    def _plans(self, spec: SiteSpec, routers: tuple[Tensor, ...], x: Tensor, sites: tuple) -> list[PairPlan]:
        """One plan per router of ``routers`` (sites sharing ``spec`` and the input x [T, in]):
        one router GEMM over all of them ([T, M*S]), one ``take`` and one routing call per group
        over the M stacked copies of its rows, one plan per router."""
        m = len(routers)
        if spec.static_plan is not None:
            return [spec.static_plan] * m
        fused = self._fused_plans(spec, routers, x, sites)
        if fused is not None:
            return fused
        cap = self.state.capacity
        if m == 1:
            router = routers[0]
        else:
            router = self._routers.get(sites)
            if router is None:
                router = self._routers[sites] = torch.cat(routers)
        logits = torch.mm(x.float(), router.t())  # [T, M*S]: every bank's router at once
        parts = []
        for g in spec.groups:
            gm = g if m == 1 else self._stacked(g, m, cap)
            lg = logits.take(gm.take_idx)  # [M*Tg, n]: each row its own bank's experts
            w, ent = route(gm, lg)
            tg = g.take_idx.shape[0]
            if self.collect_stats:
                for i, site in enumerate(sites):
                    r = slice(i * tg, (i + 1) * tg)
                    self._records.append((site, g, lg[r], w[r], None if ent is None else ent[r]))
            parts.append((g, w, tg))
        plans = []
        for i in range(m):
            if spec.full:
                g, w, tg = parts[0]
                plans.append(self._dense_plan(w[i * tg:(i + 1) * tg], g.offsets))
                continue
            plans.append(self._mixed_plan(spec, [(g, self._dense_plan(w[i * tg:(i + 1) * tg], g.offsets))
                                                 for g, w, tg in parts], x.device))
        return plans

    def _fused_plans(self, spec: SiteSpec, routers: tuple[Tensor, ...], x: Tensor, sites: tuple
                     ) -> list[PairPlan] | None:
        """``_plans`` in one C++ call (router dot products of each row's own bank only, DynMoLE
        routing, every site's plan) when the site is one DynMoLE (Tsallis) group and nothing else,
        on the CPU without autograd; None otherwise (the torch path runs)."""
        if not self._cpu_plans or len(spec.groups) != 1 or spec.plain_slot is not None:
            return None
        g = spec.groups[0]
        if g.key[0] != "dynmole" or g.key[2] != "tsallis" or (x.requires_grad and torch.is_grad_enabled()):
            return None
        offsets, params = self._row_params(g)
        out = route_plan_cpu(x, routers, offsets, g.key[1], **params)
        if out is None:
            return None
        logits, w, ent, plans = out
        if self.collect_stats:
            self._record(g, sites, logits, w, ent)
        return plans

    def _row_params(self, g: RouteGroup) -> tuple[Tensor, dict]:
        """A group's slot offsets and DynMoLE parameters over all T rows (offset -1, parameters 0 on
        rows outside the group), for ``route_plan_cpu``; cached per step."""
        key = ("rows", id(g))
        hit = self._stacked_groups.get(key)
        if hit is not None:
            return hit
        prm = {"eps": g.params["eps"]}
        offsets = g.offsets
        if g.rows is not None:
            offsets = torch.full((self.num_tokens,), -1, dtype=torch.long, device=g.offsets.device)
            offsets[g.rows] = g.offsets
        for k in ("top_p", "keep_top_k", "entropy_threshold", "q"):
            v = g.params[k]
            if not isinstance(v, Tensor):
                v = torch.tensor([float(v)], dtype=torch.float32)
            elif g.rows is not None:
                full = torch.zeros(self.num_tokens, dtype=torch.float32, device=v.device)
                full[g.rows] = v.float()
                v = full
            prm[k] = v.float().contiguous()
        self._stacked_groups[key] = (offsets, prm)
        return offsets, prm

    def _stacked(self, g: RouteGroup, m: int, cap: int) -> RouteGroup:
        """``g`` over M stacked copies of its rows, reading the M router blocks of [T, M*S] logits."""
        key = (id(g), m)
        gm = self._stacked_groups.get(key)
        if gm is None:
            n = g.take_idx.shape[1]
            rows = g.take_idx[:, 0] // cap  # token of each row
            offs = g.take_idx[:, 0] - rows * cap
            base = (rows * (m * cap) + offs).unsqueeze(1) + torch.arange(n, device=rows.device)
            take = torch.cat([base + i * cap for i in range(m)])
            params = {k: (v.repeat(m) if isinstance(v, Tensor) else v) for k, v in g.params.items()}
            gm = RouteGroup(g.key, None, take, g.offsets.repeat(m), g.bank.repeat(m), params,
                            None if g.bcast_thr is None else g.bcast_thr.repeat(m))
            self._stacked_groups[key] = gm
        return gm

    def _dense_plan(self, w: Tensor, offsets: Tensor) -> PairPlan:
        """Plan of dense weights [Tg, n] at per-row slot offsets: one C++ call on the CPU."""
        if self._cpu_plans:
            plan = build_plan_cpu(w, offsets, self.state.capacity)
            if plan is not None:
                return plan
            self._cpu_plans = False
        if self.static_plans:
            return plan_from_slots(*slots_from_dense(w, offsets, static=True), self.state.capacity)
        return plan_from_slots(*slots_from_dense(w, offsets))

    def _mixed_plan(self, spec: SiteSpec, parts: list[tuple[RouteGroup, PairPlan]], device) -> PairPlan:
        """One plan over every token: the groups' pairs in their rows, plain LoRA tokens' slot."""
        k = max([p.slots.shape[1] for _, p in parts] + [1])
        t = self.num_tokens
        slots = torch.full((t, k), -1, dtype=torch.long, device=device)
        weights = torch.zeros(t, k, dtype=torch.float32, device=device)
        if spec.plain_slot is not None:
            slots[:, 0] = spec.plain_slot
            weights[:, 0] = (spec.plain_slot >= 0).float()
        for g, p in parts:
            rows = g.rows if g.rows is not None else slice(None)
            slots[rows, : p.slots.shape[1]] = p.slots
            weights[rows, : p.slots.shape[1]] = p.weights
        if self._cpu_plans:
            plan = build_plan_cpu(weights, None, self.state.capacity, slots=slots)
            if plan is not None:
                return plan
        return plan_from_slots(slots, weights, self.state.capacity if self.static_plans else None)

    # -- the hook points -----------------------------------------------------------------------

    def _target_columns(self, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
        cols = self._columns.get(targets)
        if cols is None:
            cols, start = [], 0
            for t in targets:
                size = linear_shape(self.cfg, t)[1]
                cols.append((t, start, start + size))
                start += size
            self._columns[targets] = cols
        return cols

    def _delta(self, site: Site, x: Tensor, plan: PairPlan) -> Tensor:
        st = self.state
        if st.lora_a[site].dtype == torch.int8:
            if self.backend in ("auto", "cpu"):  # the int8 rows as stored, their scales folded into h
                out = routed_lora_int8_cpu(x, st.lora_a[site], st.lora_a_scale[site], st.lora_b[site],
                                           st.lora_b_scale[site], plan, st.scaling, st.packed)
                if out is not None:
                    return out
            a, b, scaling, plan = st.dequantized(site, plan)  # the slots this call uses, dequantized
            return routed_lora(x, a, b.transpose(1, 2), plan.slots, plan.weights, scaling, backend=self.backend,
                               plan=plan)
        return routed_lora(x, st.lora_a[site], st.lora_b_view(site), plan.slots, plan.weights, st.scaling,
                           backend=self.backend, plan=plan)

    def linear(self, layer: int, targets: tuple[str, ...], x: Tensor, out: Tensor) -> None:
        d = self._decision_at(layer, targets)
        if d is _NOTHING:
            return
        if d is not None and self._whole_linear(d, x, out):
            return
        if len(targets) > 1 and self._fused(layer, targets, x, out):
            return
        for target, c0, c1 in self._target_columns(targets):
            site = (layer, target)
            spec = self._site_spec(site)
            if spec is None:
                continue
            plan = self._plan(spec, self.state.router.get(site), x, site)
            if plan.num_pairs:
                out[:, c0:c1] += self._delta(site, x, plan)

    # -- the CPU decode fast path: one C++ call per routed linear --------------------------------

    def _decision_at(self, layer: int, targets: tuple[str, ...]):
        key = (layer, targets)
        d = self._decide.get(key, _MISSING)
        if d is _MISSING:
            d = self._decide[key] = self._decision(layer, targets)
        return d

    def c_linear_hooks(self, linears: list[tuple[int, tuple[str, ...]]], rows: int
                       ) -> tuple[list[tuple[int, int, int] | None], Callable[[], None]] | None:
        """This step's adapter work as C calls, for a forward that runs every linear itself (the fused
        decode forward, ``server/model/fused_decode.py``): for each (layer, targets) of ``linears``, in
        the order that forward calls them, None (no bank adapts it) or the (fn, a, b) of its
        ``route_lora`` call (``RouteLoraStep.c_hook``) -- the decision, sites, routing group and
        statistics ``linear`` would use. Then ``done()`` after the forward: what ``linear`` records
        per call. None when some linear or FFN of the step needs the Python path: factor or MixLoRA
        FFNs (``mlp`` would replace them), a site on the general path, a call that would fall back."""
        layers = {layer for layer, _ in linears}
        if (self.factors or rows != self.num_tokens
                or any(layer in b.layout.blocks for b in self.banks for layer in layers)):
            return None
        hooks: list[tuple[int, int, int] | None] = []
        used: list[WholeLinear] = []
        for layer, targets in linears:
            d = self._decision_at(layer, targets)
            if d is _NOTHING:
                hooks.append(None)
                continue
            if d is None:
                return None
            hook = self._group_step(d).c_hook(d.args)
            if hook is None:
                return None
            hooks.append(hook)
            used.append(d)

        def done() -> None:
            for d in used:
                self._fast.used[d] = None

        return hooks, done

    def _decisions(self) -> dict:
        """The (layer, targets) -> path table of this step's banks, shared by every step with the same
        bank layouts in the same order while the pool state lives (a new state starts afresh)."""
        cache = self.state.cache
        key = ("decisions", tuple(id(b.layout) for b in self.banks), self.backend, self._cpu_plans, FAST_PATH)
        hit = cache.get(key)
        if hit is not None and all(ref() is b.layout for ref, b in zip(hit[0], self.banks)):
            return hit[1]
        if sum(1 for k in cache if k[0] == "decisions") >= 64:  # bank mixes come and go: keep the table bounded
            for k in [k for k in cache if k[0] == "decisions"]:
                del cache[k]
        table: dict = {}
        cache[key] = ([weakref.ref(b.layout) for b in self.banks], table)
        return table

    def _decision(self, layer: int, targets: tuple[str, ...]):
        sites = tuple((layer, t) for t in targets)
        if not any(site in b.layout.sites for b in self.banks for site in sites):
            return _NOTHING
        if not (FAST_PATH and self._cpu_plans):
            return None
        specs = [self._site_spec(site) for site in sites]
        spec = specs[0]
        if spec is None or any(sp is not spec for sp in specs):
            return None
        st = self.state
        members = tuple(i for i, b in enumerate(self.banks) if sites[0] in b.layout.sites)
        if spec.static_plan is not None and not spec.groups:  # plain LoRA only (PEFT LoRA, MixLoRA's attention)
            args = st.cache.get(("route_lora_plain", sites))
            if args is None:
                args = st.cache[("route_lora_plain", sites)] = RouteLoraSites(
                    None, [st.lora_a[s] for s in sites], [st.lora_b[s] for s in sites], st.scaling,
                    [c0 for _, c0, _ in self._target_columns(targets)], **self._row_scales(sites))
            return WholeLinear(sites, members, 1, args, plain=True) if args.ok else None
        if spec.static_plan is not None or len(spec.groups) != 1 or spec.plain_slot is not None:
            return None
        g = spec.groups[0]
        routers = [st.router.get(site) for site in sites]
        if g.key[0] != "dynmole" or g.key[2] != "tsallis" or any(r is None for r in routers):
            return None
        args = st.cache.get(("route_lora", sites))
        if args is None:
            rows = st.cache.get("stat_rows")
            if rows is None:
                rows = st.cache["stat_rows"] = {site: i for i, site in enumerate(st.router)}
            args = st.cache[("route_lora", sites)] = RouteLoraSites(
                routers, [st.lora_a[s] for s in sites], [st.lora_b[s] for s in sites], st.scaling,
                [c0 for _, c0, _ in self._target_columns(targets)], [rows[s] for s in sites],
                **self._row_scales(sites))
        if not args.ok:
            return None
        return WholeLinear(sites, members, g.key[1], args)

    def _row_scales(self, sites) -> dict:
        """An int8 pool's row scales of ``sites`` and whether its slots are packed (RouteLoraSites'
        a_scale / b_scale / packed); none otherwise."""
        st = self.state
        if not st.lora_a_scale:
            return {}
        return {"a_scale": [st.lora_a_scale[s] for s in sites], "b_scale": [st.lora_b_scale[s] for s in sites],
                "packed": st.packed}

    def _whole_linear(self, d: WholeLinear, x: Tensor, out: Tensor) -> bool:
        """Routing, plans, routed LoRA and statistics of every target of ``d`` in one C++ call; False
        (nothing done) when the call does not apply (autograd, shapes): the general path runs."""
        if x.requires_grad and torch.is_grad_enabled():
            return False
        if not self._group_step(d)(x, d.args, out):
            return False
        self._fast.used[d] = None
        return True

    def _group_step(self, d: WholeLinear) -> RouteLoraStep:
        gkey = (d.members, d.n, d.plain)
        step = self._group_steps.get(gkey)
        if step is None:
            step = self._group_steps[gkey] = self._route_lora_step(d)
        return step

    def _route_lora_step(self, d: WholeLinear) -> RouteLoraStep:
        """The step's rows for ``d``'s group, from the site's spec: each row's bank slot offset (-1
        outside the group) and the members' DynMoLE parameters (``_row_params``); plain sites: each
        plain row's one slot.

        Routed groups are kept across steps (``_kept_groups``): consecutive decode steps of one batch
        have the same rows, banks and offsets, and building the group (the site's spec, the row
        parameters, the C structs) cost ~0.6 ms of a step's Python, most of a batch-1 bank step's
        overhead beside its weight reads. A kept group's statistics are zeroed when a step first uses
        them (the previous step's were reduced into copies by then: ``routing_stats``)."""
        if d.plain:
            spec = self._site_spec(d.sites[0])
            return RouteLoraStep(spec.plain_slot, 1, top_p=1.0, keep_top_k=1.0, entropy_threshold=1.0, q=1.0, eps=0.0)
        kept = self._kept_groups()
        if kept is not None:
            stats, steps = kept
            if self.collect_stats and self._fast.stats is None:
                for t in (stats.sel, stats.acc, stats.esum):
                    t.zero_()
                self._fast.stats = stats
            if stats is self._fast.stats:
                step = steps.get((d.members, d.n))
                if step is None:
                    offsets, prm = self._row_params(self._site_spec(d.sites[0]).groups[0])
                    step = steps[(d.members, d.n)] = RouteLoraStep(offsets, d.n, stats=stats, **prm)
                return step
        offsets, prm = self._row_params(self._site_spec(d.sites[0]).groups[0])
        stats = None
        if self.collect_stats:
            if self._fast.stats is None:
                self._fast.stats = RouteLoraStats(len(self.state.router), self.state.capacity, ENTROPY_BUCKETS)
            stats = self._fast.stats
        return RouteLoraStep(offsets, d.n, stats=stats, **prm)

    def _kept_groups(self) -> tuple[RouteLoraStats, dict] | None:
        """The routed groups kept (in the pool state's cache) for steps with this step's bank layouts,
        pool offsets and rows' banks, and the statistics they all write (one per pool state: one step
        runs at a time, and [router sites, pool slots] is large for a large pool); None when
        statistics are off (the groups are then not kept)."""
        if not self.collect_stats:
            return None
        if self._kept is None:
            cache = self.state.cache
            stats = cache.get("route_lora_stats")
            if stats is None:
                with torch.inference_mode(False):  # normal tensors: a later step may zero them outside it
                    stats = cache["route_lora_stats"] = RouteLoraStats(len(self.state.router), self.state.capacity,
                                                                       ENTROPY_BUCKETS)
            key = ("route_lora_groups", tuple(id(b.layout) for b in self.banks), tuple(b.offset for b in self.banks),
                   self.token_bank.cpu().numpy().tobytes())
            hit = cache.get(key)
            if hit is None or not all(ref() is b.layout for ref, b in zip(hit[0], self.banks)):
                if sum(1 for k in cache if k[0] == "route_lora_groups") >= 32:  # batches come and go: bounded
                    for k in [k for k in cache if k[0] == "route_lora_groups"]:
                        del cache[k]
                hit = cache[key] = ([weakref.ref(b.layout) for b in self.banks], {})
            self._kept = (stats, hit[1])
        return self._kept

    def _record(self, g: RouteGroup, sites: tuple, logits: Tensor, w: Tensor, ent: Tensor) -> None:
        """Routing statistics records of a fused call's [M, T, ...] outputs (the group's rows only)."""
        for i, site in enumerate(sites):
            lg, wi, ei = logits[i], w[i], ent[i]
            if g.rows is not None:
                lg, wi, ei = lg.index_select(0, g.rows), wi.index_select(0, g.rows), ei.index_select(0, g.rows)
            self._records.append((site, g, lg, wi, ei))

    def _fused(self, layer: int, targets: tuple[str, ...], x: Tensor, out: Tensor) -> bool:
        """Targets sharing x (gate and up) whose sites route alike: one router GEMM, one routing
        call, then one routed LoRA per target. False (nothing done) when they do not qualify."""
        sites = tuple((layer, t) for t in targets)
        specs = [self._site_spec(site) for site in sites]
        spec = specs[0]
        if spec is None or spec.static_plan is not None or any(sp is not spec for sp in specs):
            return False
        routers = tuple(self.state.router.get(site) for site in sites)
        if any(r is None for r in routers):
            return False
        plans = self._plans(spec, routers, x, sites)
        for (target, c0, c1), site, plan in zip(self._target_columns(targets), sites, plans):
            if plan.num_pairs:
                out[:, c0:c1] += self._delta(site, x, plan)
        return True

    def _proj(self, lin, x: Tensor) -> Tensor:
        """``lin(x)`` (a ``TargetLinear``) with this step's deltas, also when this step is a sub-step
        of the one in the step context (the linear's own hook would call that one)."""
        out = lin.base(x)
        self.linear(lin.layer, lin.targets, x, out)
        return out

    def _sub(self, rows: Tensor) -> "BankStep":
        """This step restricted to the tokens ``rows`` (same banks, pool and statistics records)."""
        sub = BankStep(self.cfg, self.state, self.banks, self.token_bank.index_select(0, rows),
                       collect_stats=self.collect_stats, backend=self.backend)
        sub._records = self._records
        sub._fast = self._fast
        return sub

    def _has_ffn_sites(self, layer: int) -> bool:
        """Whether a bank of this step's tokens adds per-linear deltas to the FFN of ``layer``."""
        if self._present is None:
            self._present = set(self.token_bank[self.token_bank >= 0].unique().tolist())
        return any((layer, t) in self.banks[b].layout.sites for b in self._present for t in FFN_TARGETS)

    def _rows_for(self, active: tuple[int, ...]) -> FactorRows:
        rows = self._factor_rows.get(active)
        if rows is None:
            t = self.num_tokens
            groups, covered = [], torch.zeros(t, dtype=torch.bool, device=self.token_bank.device)
            for i in active:
                mask = self.token_factor == i
                r = mask.nonzero().squeeze(1)
                if r.numel() == 0:
                    continue
                covered |= mask
                groups.append((i, None, self) if r.numel() == t else (i, r, self._sub(r)))
            rest = (~covered).nonzero().squeeze(1)
            if rest.numel() == 0:
                rows = FactorRows(groups, None, None)
            else:
                rows = FactorRows(groups, rest, self if rest.numel() == t else self._sub(rest))
            self._factor_rows[active] = rows
        return rows

    def mlp(self, layer: int, x: Tensor, mlp: torch.nn.Module) -> Tensor | None:
        if self.factors:
            active = tuple(i for i, w in enumerate(self.factors) if w.layers[layer] is not None)
            if active:
                return self._factor_mlp(layer, x, mlp, self._rows_for(active))
        return self._bank_mlp(layer, x, mlp)

    def _factor_mlp(self, layer: int, x: Tensor, mlp: torch.nn.Module, rows: FactorRows) -> Tensor:
        """Each factor bank's tokens through ``factor_mlp`` (their LoRA bank's FFN deltas applied
        once, inside it, by the sub-step over their rows), every other token its usual FFN."""
        if not rows.groups:  # no token of the factorised banks here: the rest is every token
            return self._bank_mlp(layer, x, mlp)
        out = None
        for i, r, sub in rows.groups:
            xs = x if r is None else x.index_select(0, r)
            record = (lambda chosen, i=i: self._factor_routes.append((i, layer, chosen))) if self.collect_stats else None
            y = factor_mlp(xs, mlp, self.factors[i].layers[layer], None, sub if sub._has_ffn_sites(layer) else None,
                           on_route=record)
            if r is None:
                return y
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1])
            out.index_copy_(0, r, y)
        if rows.rest is not None:
            sub = rows.rest_step
            xr = x.index_select(0, rows.rest)
            y = sub._bank_mlp(layer, xr, mlp)
            out.index_copy_(0, rows.rest, sub._dense(layer, xr, mlp) if y is None else y)
        return out

    def _dense(self, layer: int, x: Tensor, mlp: torch.nn.Module) -> Tensor:
        g, u = self._proj(mlp.gate_up_proj, x).split(mlp.intermediate_size, dim=-1)
        return self._proj(mlp.down_proj, F.silu(g) * u)

    def _bank_mlp(self, layer: int, x: Tensor, mlp: torch.nn.Module) -> Tensor | None:
        """MixLoRA's FFN for its tokens (None when no bank of the step has a block router here)."""
        key = ("mlp", layer)
        if self._decide.get(key) is _NOTHING:
            return None
        if not any(layer in b.layout.blocks for b in self.banks):
            self._decide[key] = _NOTHING
            return None
        spec = self._block_spec(layer)
        if spec is None:
            return None
        st = self.state
        inter = mlp.intermediate_size
        g, u = self._proj(mlp.gate_up_proj, x).split(inter, dim=-1)  # base (+ per-linear deltas of other banks)
        plan = self._plan(spec, st.block_router[layer], x, (layer, "mlp"))
        tok = plan.pair_token
        pp = pair_plan(plan)
        gp, upp = g.index_select(0, tok), u.index_select(0, tok)  # [P, I]
        xp = None
        if (layer, "gate_proj") in st.lora_a or (layer, "up_proj") in st.lora_a:
            xp = x.index_select(0, tok)
        if (layer, "gate_proj") in st.lora_a:
            gp = gp + self._delta((layer, "gate_proj"), xp, pp)
        if (layer, "up_proj") in st.lora_a:
            upp = upp + self._delta((layer, "up_proj"), xp, pp)
        hp = self._act(spec, plan, gp) * upp
        pw = plan.pair_weight.unsqueeze(1).to(hp.dtype)
        # The base down projection is linear, so sum_e w_e (W h_e + b) = W (sum_e w_e h_e) + b sum_e w_e:
        # one base GEMM over the step's T tokens instead of one per (token, expert) pair (top-2: half
        # the FFN's down work). index_put_(accumulate=True) == index_add_(0, ...), far faster on CPU.
        hmix = torch.zeros(x.shape[0], inter, dtype=hp.dtype, device=x.device).index_put_((tok,), hp * pw,
                                                                                          accumulate=True)
        mixed = mlp.down_proj.base(hmix)
        if mlp.down_proj.bias is not None:  # base() added b once per token; it is owed sum_e w_e times
            wsum = torch.zeros(x.shape[0], 1, dtype=hp.dtype, device=x.device).index_put_((tok,), pw, accumulate=True)
            mixed = mixed + mlp.down_proj.bias * (wsum - 1)
        if (layer, "down_proj") in st.lora_a:  # each expert's own down delta, per pair
            mixed.index_put_((tok,), self._delta((layer, "down_proj"), hp, pp) * pw, accumulate=True)
        if spec.full:
            return mixed
        dense = self._proj(mlp.down_proj, F.silu(g) * u)
        return torch.where(spec.rows_mask.unsqueeze(1), mixed, dense)

    def _act(self, spec: SiteSpec, plan: PairPlan, gp: Tensor) -> Tensor:
        names = spec.act_names
        if names is None:  # once per step and site: ``unique`` syncs the host (no sync in a replayed graph)
            names = spec.act_names = {self.banks[int(b)].layout.act_fn for g in spec.groups for b in g.bank.unique()}
        names = set(names)
        if len(names) == 1:
            return _activation(names.pop(), self.cfg)(gp)
        # banks with different activations in one layer: each pair gets its own bank's
        pair_bank = self.token_bank[plan.pair_token]
        out = torch.empty_like(gp)
        for name in names:
            ids = [i for i, b in enumerate(self.banks) if b.layout.act_fn == name]
            sel = torch.isin(pair_bank, torch.tensor(ids, device=gp.device))
            out[sel] = _activation(name, self.cfg)(gp[sel])
        return out

    # -- statistics ----------------------------------------------------------------------------

    def share_records(self, other: "BankStep") -> None:
        """Reduce ``other``'s routing records in ``routing_stats``: the step ran as a replayed CUDA
        graph of ``other`` (same banks, this step's rows first), whose records the replay refreshed."""
        self._records = other._records
        self._fast = other._fast

    def routing_stats(self, pool_slots_used: int | None = None) -> RoutingStats:
        """Reduce the step's routing records (call once, after the forward)."""
        stats = RoutingStats(pool_slots_used=pool_slots_used, pool_slots_total=self.state.capacity)
        nb = len(self.banks)
        self._factor_stats(stats)
        if nb == 0:
            return stats
        tokens = torch.bincount(self.token_bank[self.token_bank >= 0], minlength=nb).tolist()
        per_bank = [BankRoutingStats(tokens=tokens[i]) for i in range(nb)]
        by_n: dict[int, list] = {}
        for rec in self._records:
            by_n.setdefault(rec[3].shape[1], []).append(rec)
        fast = self._fast if self._fast.used and self._fast.stats is not None else None
        max_k = max([*by_n, *(d.n for d in (fast.used if fast else ()))], default=1)
        nbk = len(ENTROPY_BUCKETS) + 1
        epd = torch.zeros(nb, max_k + 1, dtype=torch.long)
        ent_counts = torch.zeros(nb, nbk, dtype=torch.long)
        ent_sum = torch.zeros(nb, dtype=torch.float64)
        decisions = torch.zeros(nb, dtype=torch.long)
        bcast = torch.zeros(nb, dtype=torch.long)
        edges = torch.tensor(ENTROPY_BUCKETS)
        for n, recs in by_n.items():
            sites = [r[0] for r in recs]
            lens = torch.tensor([r[3].shape[0] for r in recs])
            bank = torch.cat([r[1].bank for r in recs])
            site_id = torch.repeat_interleave(torch.arange(len(recs)), lens)
            sel = torch.cat([r[3] for r in recs]) > 0  # [R, n]
            p = torch.softmax(torch.cat([r[2] for r in recs]).float(), dim=-1)
            h = (-torch.special.xlogy(p, p).sum(-1) / math.log(n)).clamp_(0, 1) if n > 1 else torch.zeros(p.shape[0])
            k = sel.sum(1)
            decisions += torch.bincount(bank, minlength=nb)
            epd += torch.bincount(bank * (max_k + 1) + k, minlength=nb * (max_k + 1)).view(nb, max_k + 1)
            ent_counts += torch.bincount(bank * nbk + torch.bucketize(h, edges), minlength=nb * nbk).view(nb, nbk)
            ent_sum += torch.bincount(bank, weights=h.double(), minlength=nb)
            dyn = [r for r in recs if r[4] is not None]
            if dyn:
                b = torch.cat([r[1].bank for r in dyn])
                over = torch.cat([r[4] > r[1].bcast_thr for r in dyn])
                bcast += torch.bincount(b[over], minlength=nb)
            sel_counts = torch.zeros(len(recs) * nb, n, dtype=torch.long).index_put_((site_id * nb + bank,), sel.long(),
                                                                                     accumulate=True)
            sel_counts = sel_counts.view(len(recs), nb, n)
            present = torch.zeros(len(recs), nb, dtype=torch.bool)
            present[site_id, bank] = True
            rows = [r.unbind(0) for r in sel_counts.unbind(0)]  # views; 720 single indexings took ~3 ms a step
            for i, j in present.nonzero().tolist():
                per_bank[j].selections[sites[i]] = rows[i][j]
        if fast is not None:  # the route_lora calls' counts, kept per bank slot offset
            self._add_fast(fast, per_bank, decisions, bcast, epd, ent_counts, ent_sum)
        dec, bc, es = decisions.tolist(), bcast.tolist(), ent_sum.tolist()
        for i, s in enumerate(per_bank):
            s.decisions, s.broadcast, s.entropy_sum = dec[i], bc[i], es[i]
            s.experts_per_decision = epd[i]
            s.entropy_counts = ent_counts[i] if self.banks[i].layout.kind != "lora" else ()
            name = self.banks[i].name
            if not s.tokens:
                continue
            prev = stats.banks.get(name)
            if prev is not None:  # two versions of one name in the step (a replace in progress)
                s = _merged(prev, s)
            stats.banks[name] = s
        return stats

    def _factor_stats(self, stats: RoutingStats) -> None:
        """Factor banks' routing: per factorised layer (target "mlp") each token picks its top-k of E
        experts (no broadcast; entropy is not computed on that path)."""
        by_bank: dict[int, list[tuple[int, Tensor]]] = {}
        for i, layer, chosen in self._factor_routes:
            by_bank.setdefault(i, []).append((layer, chosen))
        for i, routes in by_bank.items():
            w = self.factors[i]
            k = routes[0][1].shape[1]
            decisions = sum(c.shape[0] for _, c in routes)
            epd = torch.zeros(k + 1, dtype=torch.long)
            epd[k] = decisions
            sel = {(layer, "mlp"): torch.bincount(c.reshape(-1), minlength=w.layers[layer].num_experts)
                   for layer, c in routes}
            s = BankRoutingStats(tokens=int((self.token_factor == i).sum()), decisions=decisions,
                                 selections=sel, experts_per_decision=epd)
            name = self.factor_names[i]
            prev = stats.banks.get(name)
            stats.banks[name] = s if prev is None else _merged(prev, s)

    def _add_fast(self, fast: _FastRecords, per_bank: list[BankRoutingStats], decisions: Tensor, bcast: Tensor,
                  epd: Tensor, ent_counts: Tensor, ent_sum: Tensor) -> None:
        st = fast.stats
        offs = torch.tensor([b.offset for b in self.banks], dtype=torch.long)
        acc = st.acc.index_select(0, offs)  # [nb, width]
        decisions += acc[:, 0]
        bcast += acc[:, 1]
        k = epd.shape[1]
        epd += acc[:, 2:2 + k]
        ent_counts += acc[:, STAT_WIDTH:]
        ent_sum += st.esum.index_select(0, offs)
        rows = self.state.cache["stat_rows"]
        by_group: dict[tuple, list] = {}
        for d in fast.used:
            if not d.plain:  # plain LoRA makes no routing decisions
                by_group.setdefault((d.members, d.n), []).extend(d.sites)
        blocks: dict[int, list] = {}
        for (members, n), sites in by_group.items():
            sel = st.sel.index_select(0, torch.tensor([rows[site] for site in sites]))
            sites = tuple(sites)
            for i in members:
                o = self.banks[i].offset
                blocks.setdefault(i, []).append((sites, sel[:, o:o + n]))
        for i, bl in blocks.items():
            sel = per_bank[i].selections
            if sel:  # the bank also routed on the general path: one plain dict
                merged = dict(sel)
                merged.update(SiteCounts(bl))
                per_bank[i].selections = merged
            else:
                per_bank[i].selections = SiteCounts(bl)

def _merged(a: BankRoutingStats, b: BankRoutingStats) -> BankRoutingStats:
    def add(x, y):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.numel() == 0 or y.numel() == 0:
            return x if y.numel() == 0 else y
        n = max(x.numel(), y.numel())
        return F.pad(x, (0, n - x.numel())) + F.pad(y, (0, n - y.numel()))

    sel = dict(a.selections)
    for k, v in b.selections.items():
        sel[k] = add(sel[k], v) if k in sel else v
    return BankRoutingStats(tokens=a.tokens + b.tokens, decisions=a.decisions + b.decisions,
                            broadcast=a.broadcast + b.broadcast, selections=sel,
                            experts_per_decision=add(a.experts_per_decision, b.experts_per_decision),
                            entropy_counts=add(a.entropy_counts, b.entropy_counts),
                            entropy_sum=a.entropy_sum + b.entropy_sum)
