"""The engine's image side: checking image requests, and the visual embeddings each step feeds at
its image rows ("positions with precomputed embeddings", ``StepContext.input_embeds``).

Per step, for the images whose placeholder span overlaps the step's rows and whose request has not
embedded them yet:

1. tower + projector, once per image: looked up in the encoder cache by (projector identity,
   content hash); the misses go through the tower in one batch, then through each projector;
2. the mixture, per request with its own text (ALGORITHMS.md §5): every text token of the prompt
   (the spans excluded) guides the route; images of one step that keep an expert share its GEMMs
   (``VisualAdapter.mix``). The result [N, D] stays on the sequence for its lifetime, so a chunked
   prefill that splits the span, or a preempted sequence recomputing its prompt, reuses it.

The visual adapter of a request is its bank's (a handle with a ``visual_adapter`` attribute: a
``parrot`` bank), else the served checkpoint's own; a tower-only base has none of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adapters.parrot import VisualAdapter, VisualRoute, VisualRouting
from server.engine.protocol import GenerationRequest, InvalidRequest
from server.engine.routing_stats import BankRoutingStats, entropy_bucket_counts

from .encoder_cache import EncoderCache
from .inputs import ImageInput, ImageSpan

VISUAL_SITE = ("visual", "moe")  # the (layer, target) labels of the mixture's routing in /metrics


@dataclass(eq=False)
class SequenceImages:
    """A sequence's images and what embeds them (``Sequence.images``).

    adapter / identity: the visual adapter (projector + mixture) and a string naming it (the model,
    or bank@version) for cache keys; label: the metrics label (the bank's name, None: the model).
    text_ids: every prompt token outside the image spans (the mixture's guide).
    embeds: per image, the mixed embeddings [N, D] once computed.
    """

    images: list[ImageInput]
    adapter: VisualAdapter
    identity: str
    label: str | None
    text_ids: list[int]
    embeds: list[Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.embeds = [None] * len(self.images)


class VisualEmbedder:
    """Built by the engine for a model with a vision tower (``server.model.parrot.ModelVision``)."""

    max_images = 1  # the release feeds only a prompt's first image through the mixture (§5)

    def __init__(self, vision: Any, embed_tokens: nn.Embedding, routing: VisualRouting, cache: EncoderCache):
        self.vision = vision
        self.tower = vision.tower
        self.embed_tokens = embed_tokens
        self.routing = routing
        self.cache = cache
        self.tokens_per_image = vision.tokens_per_image
        self._routes: list[tuple[str | None, VisualRoute, int]] = []

    # --- requests ----------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Count, shapes and spans of ``request.images`` (thread-safe: reads config only)."""
        images = request.images
        if len(images) > self.max_images:
            raise InvalidRequest(f"the prompt has {len(images)} images; this model takes at most {self.max_images}")
        n, s, end = len(request.prompt_token_ids), self.tower.image_size, 0
        for i, img in enumerate(images):
            if not isinstance(img, ImageInput):
                raise InvalidRequest(f"image {i}: expected an ImageInput")
            pv = img.pixel_values
            if not isinstance(pv, Tensor) or tuple(pv.shape) != (3, s, s) or not pv.is_floating_point():
                shape = tuple(pv.shape) if isinstance(pv, Tensor) else type(pv).__name__
                raise InvalidRequest(f"image {i}: pixel_values must be a float tensor [3, {s}, {s}] "
                                     f"(this model's processor output), got {shape}")
            if not bool(torch.isfinite(pv).all()):
                raise InvalidRequest(f"image {i}: pixel_values hold NaN or inf")
            if img.length != self.tokens_per_image:
                raise InvalidRequest(f"image {i}: its span has {img.length} positions; this model's images take "
                                     f"{self.tokens_per_image}")
            if img.offset < end or img.offset + img.length > n:
                raise InvalidRequest(f"image {i}: its span [{img.offset}, {img.offset + img.length}) is outside "
                                     f"the prompt ({n} tokens) or overlaps the previous image")
            if not isinstance(img.content_hash, str) or not img.content_hash:
                raise InvalidRequest(f"image {i}: content_hash must be a non-empty string")
            end = img.offset + img.length

    def bind(self, request: GenerationRequest, handle: Any) -> tuple[SequenceImages, tuple[ImageSpan, ...]]:
        """The visual adapter for ``request`` (its bank's, else the model's) and the spans' cache keys;
        raises InvalidRequest when there is none or it does not fit the tower."""
        adapter = getattr(handle, "visual_adapter", None)
        bank = request.bank
        if adapter is not None:
            identity = f"bank:{getattr(handle, 'name', bank)}@{getattr(handle, 'version', id(adapter))}"
            label = bank
            cfg = adapter.config
            tower = self.vision.config
            if (cfg.mm_hidden_size, cfg.hidden_size) != (tower.mm_hidden_size, tower.hidden_size) or \
                    (cfg.select_layer, cfg.select_feature) != (tower.select_layer, tower.select_feature):
                raise InvalidRequest(
                    f"bank {bank!r}: its visual adapter (mm_hidden_size {cfg.mm_hidden_size}, layer "
                    f"{cfg.select_layer}, {cfg.select_feature}) does not fit this model's vision tower "
                    f"(mm_hidden_size {tower.mm_hidden_size}, layer {tower.select_layer}, {tower.select_feature})")
        elif self.vision.adapter is not None:
            adapter, identity, label = self.vision.adapter, f"model:{self.vision.name}", None
        elif bank is None:
            raise InvalidRequest("this model has a vision tower but no projector of its own: an image request must "
                                 "name a parrot bank in `model`")
        else:
            raise InvalidRequest(f"bank {bank!r} is not a parrot bank (it has no visual adapter), and this model has "
                                 f"no projector of its own: an image request must name a parrot bank")
        ids = request.prompt_token_ids
        limit = adapter.config.max_length
        if limit is not None and len(ids) > limit:
            # The release truncates the merged sequence (text + image embeddings) here, which would cut
            # the question's end and the assistant header: refuse instead, as --max-model-len does.
            owner = f"bank {bank!r}" if label is not None else "this model"
            raise InvalidRequest(f"the prompt with its image has {len(ids)} tokens; {owner} takes image prompts of at "
                                 f"most {limit} tokens (tokenizer_model_max_length, where the release truncates)",
                                 param="messages", code="context_length_exceeded")
        inside = set()
        for img in request.images:
            inside.update(range(img.offset, img.offset + img.length))
        text_ids = [t for p, t in enumerate(ids) if p not in inside]
        text_digest = hashlib.sha256(",".join(map(str, text_ids)).encode()).hexdigest()
        spans = tuple(ImageSpan(img.offset, img.length, hashlib.sha256(
            f"{img.content_hash}|{text_digest}|{identity}|{self.routing}".encode()).hexdigest())
            for img in request.images)
        return SequenceImages(list(request.images), adapter, identity, label, text_ids), spans

    # --- the step ----------------------------------------------------------------------------------
    def step_inputs(self, seqs: list[Any], num_tokens: list[int]) -> tuple[Tensor, Tensor] | None:
        """(rows [R] int64, embeds [R, D]) of the step's flat batch whose input embeddings are visual,
        or None when the step has none. Embeds the images it needs first (see the module doc)."""
        overlaps: list[tuple[int, Any, int, int, int]] = []  # (flat row, seq images, image, lo, hi)
        start = 0
        for seq, k in zip(seqs, num_tokens):
            state = getattr(seq, "images", None)
            if state is not None:
                c = seq.num_computed_tokens
                for i, img in enumerate(state.images):
                    lo, hi = max(c, img.offset), min(c + k, img.offset + img.length)
                    if lo < hi:
                        overlaps.append((start + lo - c, state, i, lo - img.offset, hi - img.offset))
            start += k
        if not overlaps:
            return None
        self._embed([(state, i) for _, state, i, _, _ in overlaps if state.embeds[i] is None])
        dev = self.embed_tokens.weight.device
        rows = torch.cat([torch.arange(r, r + hi - lo) for r, _, _, lo, hi in overlaps]).to(dev)
        embeds = torch.cat([state.embeds[i][lo:hi] for _, state, i, lo, hi in overlaps])
        return rows, embeds

    def _embed(self, todo: list[tuple[SequenceImages, int]]) -> None:
        if not todo:
            return
        # 1. tower + projector, through the cache; one tower batch for every missing image
        projected: dict[str, Tensor] = {}
        missing: dict[str, tuple[VisualAdapter, ImageInput]] = {}
        for state, i in todo:
            img = state.images[i]
            key = f"{state.identity}|{img.content_hash}"
            if key in projected or key in missing:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                projected[key] = hit
            else:
                missing[key] = (state.adapter, img)
        if missing:
            pixels: dict[str, Tensor] = {}
            for _, img in missing.values():
                pixels.setdefault(img.content_hash, img.pixel_values)
            row_of = {h: j for j, h in enumerate(pixels)}
            features = self.tower.features(torch.stack(list(pixels.values())))  # [B, N, mm]
            per_adapter: dict[int, list[str]] = {}
            for key, (adapter, _) in missing.items():
                per_adapter.setdefault(id(adapter), []).append(key)
            for keys in per_adapter.values():  # one projector call per adapter over its images
                adapter = missing[keys[0]][0]
                p = next(adapter.parameters())
                rows = torch.tensor([row_of[missing[k][1].content_hash] for k in keys], device=features.device)
                out = adapter.project(features.index_select(0, rows).to(p.device, p.dtype))  # [b, N, D]
                for key, value in zip(keys, out.unbind(0) if len(keys) == 1 else out.clone().unbind(0)):
                    projected[key] = value
                    self.cache.put(key, value)
        # 2. the mixture, per request with its own text; images sharing an adapter in one call
        groups: dict[int, list[tuple[SequenceImages, int]]] = {}
        for state, i in todo:
            groups.setdefault(id(state.adapter), []).append((state, i))
        dtype = self.embed_tokens.weight.dtype
        for members in groups.values():
            adapter = members[0][0].adapter
            p = next(adapter.parameters())
            visuals = [projected[f"{s.identity}|{s.images[i].content_hash}"] for s, i in members]
            texts = [self.embed_tokens(torch.tensor(s.text_ids, dtype=torch.long, device=self.embed_tokens.weight.device)
                                       ).to(p.device, p.dtype) for s, _ in members]
            outs, routes = adapter.mix(visuals, texts, self.routing)
            for (state, i), out, route in zip(members, outs, routes):
                state.embeds[i] = out.to(self.embed_tokens.weight.device, dtype)
                if route is not None:
                    self._routes.append((state.label, route, out.shape[0]))

    # --- metrics -----------------------------------------------------------------------------------
    def take_routing_stats(self) -> dict[str | None, BankRoutingStats]:
        """The routes of the images embedded since the last call, per label (bank name; None: the
        model's own adapter): one decision per image at the site ("visual", "moe")."""
        out: dict[str | None, BankRoutingStats] = {}
        for label, route, n in self._routes:
            w = route.weights.detach().float().cpu()
            chosen = (w != 0).to(torch.int64)
            k = int(chosen.sum())
            s = out.setdefault(label, BankRoutingStats(selections={VISUAL_SITE: torch.zeros_like(chosen)},
                                                       experts_per_decision=torch.zeros(w.numel() + 1, dtype=torch.int64),
                                                       entropy_counts=entropy_bucket_counts(torch.zeros(0))))
            s.tokens += n
            s.decisions += 1
            s.broadcast += int(self.routing.mode == "dynmole" and k == w.numel())
            s.selections[VISUAL_SITE] += chosen
            s.experts_per_decision[k] += 1
            s.entropy_counts = s.entropy_counts + entropy_bucket_counts(torch.tensor([route.entropy]))
            s.entropy_sum += route.entropy
        self._routes.clear()
        return out
