"""Parrot's projector and text-guided mixture of visual experts (ALGORITHMS.md §5), as modules whose
state-dict keys are the release's (``model.mm_projector.*``, ``model.moe_model.*`` without the prefix).

The mixture is computed per image, but only for the experts its routing keeps:

    q = Hv[0]                                   the projected CLS                       [D]
    a = softmax(Ht q / sqrt(D))                 over the prompt's text-token embeddings  [Nt]
    g = a^T Ht                                                                           [D]
    w = route(gate(g))                          dense softmax | top-k | DynMoLE hybrid   [E]
    Hv' = sum_{e: w_e != 0} w_e E_e(Hv) + moe_weight * Hv                               [N, D]

Images of one step that keep the same expert are computed in one GEMM chain for that expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ParrotConfig, VisualRouting


def build_projector(cfg: ParrotConfig) -> nn.Sequential:
    """LLaVA's projector: ``linear`` or ``mlp<N>x_gelu`` = Linear(mm, D) (GELU, Linear(D, D)) * (N - 1).
    Keys: ``0.weight``, ``0.bias``, ``2.weight``, ... (the GELUs hold no weights)."""
    layers: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, cfg.hidden_size)]
    for _ in range(cfg.projector_depth - 1):
        layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
    return nn.Sequential(*layers)


class Expert(nn.Module):
    """A bias-free SwiGLU MLP: down(silu(gate(x)) * up(x)), D -> I -> D."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class VisualRoute:
    """One image's routing: the weights [E] (zeros for experts not computed), the plain softmax
    probabilities [E] and their normalised Tsallis entropy (for metrics)."""

    weights: Tensor
    probs: Tensor
    entropy: float

    @property
    def experts(self) -> list[int]:
        return torch.nonzero(self.weights).flatten().tolist()


class VisualMixture(nn.Module):
    """``model.moe_model``: router ``gate`` [E, D] (no bias) and E SwiGLU ``experts``."""

    def __init__(self, cfg: ParrotConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.moe_weight = cfg.moe_weight
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def router_logits(self, visual: Tensor, text_embeds: Tensor) -> Tensor:
        """visual [N, D] (one image, CLS first), text_embeds [Nt, D] (the prompt's text tokens'
        word embeddings) -> router logits [E]. With no text token, g is zero (uniform logits)."""
        if text_embeds.shape[0] == 0:
            return self.gate(torch.zeros_like(visual[0]))
        q = visual[0]
        attn = torch.softmax(text_embeds @ q / math.sqrt(self.hidden_size), dim=0)  # [Nt]
        return self.gate(attn @ text_embeds)

    def route(self, visual: Tensor, text_embeds: Tensor, routing: VisualRouting) -> VisualRoute:
        from kernels.routing import dynamic_route, topk_route, tsallis_entropy  # noqa: PLC0415

        logits = self.router_logits(visual, text_embeds).float()
        probs = torch.softmax(logits, dim=-1)
        entropy = float(tsallis_entropy(probs.detach()[None], routing.q)[0]) if self.num_experts > 1 else 0.0
        if routing.mode == "dense":
            weights = probs
        elif routing.mode == "topk":
            weights = topk_route(logits[None], routing.k)[0]
        else:
            weights, _ = dynamic_route(logits[None], top_p=routing.top_p, keep_top_k=routing.keep_top_k,
                                       entropy_threshold=routing.entropy_threshold, q=routing.q)
            weights = weights[0]
        return VisualRoute(weights=weights, probs=probs, entropy=entropy)

    def combine(self, visuals: list[Tensor], routes: list[VisualRoute]) -> list[Tensor]:
        """Apply each image's route: visuals[i] [N_i, D] -> [N_i, D]. Each expert runs once, over the
        rows of the images that keep it."""
        outs = [v * self.moe_weight for v in visuals]
        for e, expert in enumerate(self.experts):
            users = [i for i, r in enumerate(routes) if float(r.weights[e]) != 0.0]
            if not users:
                continue
            rows = torch.cat([visuals[i] for i in users]) if len(users) > 1 else visuals[users[0]]
            y = expert(rows)
            at = 0
            for i in users:
                n = visuals[i].shape[0]
                outs[i] = outs[i] + routes[i].weights[e].to(y.dtype) * y[at:at + n]
                at += n
        return outs

    def forward(self, visual: Tensor, text_embeds: Tensor, routing: VisualRouting | None = None) -> Tensor:
        """One image: visual [N, D], text_embeds [Nt, D] -> [N, D] (``dense``: the release's output)."""
        route = self.route(visual, text_embeds, routing or VisualRouting())
        return self.combine([visual], [route])[0]


class VisualAdapter(nn.Module):
    """What sits between the frozen tower and the LLM: the projector and (optionally) the mixture.
    A released checkpoint holds one (``model.mm_projector`` + ``model.moe_model``); a ``parrot`` bank
    holds another, with the same keys."""

    def __init__(self, cfg: ParrotConfig):
        super().__init__()
        self.config = cfg
        self.mm_projector = build_projector(cfg)
        self.moe_model = VisualMixture(cfg) if cfg.num_experts else None

    def project(self, features: Tensor) -> Tensor:
        """Tower features [B, N, mm_hidden] -> [B, N, D] (depends on the image alone: cacheable)."""
        return self.mm_projector(features)

    def mix(self, projected: list[Tensor], text_embeds: list[Tensor], routing: VisualRouting
            ) -> tuple[list[Tensor], list[VisualRoute | None]]:
        """Per image: projected [N, D] and its prompt's text embeddings [Nt, D] -> the embeddings that
        replace the image's placeholders [N, D], and its route (None when the mixture is bypassed)."""
        if self.moe_model is None or not self.config.use_moe:
            return projected, [None] * len(projected)
        routes = [self.moe_model.route(v, t, routing) for v, t in zip(projected, text_embeds)]
        return self.moe_model.combine(projected, routes), routes
