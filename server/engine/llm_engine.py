"""The synchronous engine: requests in, one scheduled step at a time, events out.

``add_request`` validates and queues a request (one sequence per choice when ``n`` > 1); ``step``
schedules one flat batch, runs it, samples, and returns the events of that step; ``abort`` drops a
request and frees its blocks. Not
thread-safe: ``AsyncEngine`` drives it from one thread. Tests and benchmarks drive it directly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from server.model import LlamaModel, ModelConfig
from server.model.parrot import load_model_with_vision, release_stop_ids

from .block_manager import BlockManager
from .config import EngineConfig
from .host_memory import tune_malloc
from .kv_cache import KVCache, bytes_per_block, num_blocks_for_budget
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .protocol import (AdapterProvider, GenerationEvent, GenerationRequest, InvalidRequest, RequestStats,
                       StatsSink, StepStats, UnknownBank)
from .routing_stats import add_bank_stats
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus
from .structured_output import GrammarCompiler

log = logging.getLogger(__name__)


def load_tokenizer(path):
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import

    return AutoTokenizer.from_pretrained(str(path))


class LLMEngine:
    def __init__(self, config: EngineConfig, *, model: LlamaModel | None = None, tokenizer: Any = None,
                 vision: Any = None):
        """``model`` (and ``vision``, its ``server.model.parrot.ModelVision``): already loaded (tests)."""
        self.config = config
        device = config.resolved_device()
        dtype = config.resolved_dtype(device)
        if device.type == "cpu":
            tune_malloc()  # before the weights load: they and every step's activations use the heap
        if model is None:
            model, vision = load_model_with_vision(config.model, vision_tower=config.vision_tower,
                                                   device=device, dtype=dtype,
                                                   quantization=config.quantization)
        self.model, self.vision = model, vision
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        cfg = self.model_config
        device, dtype = self.model.device, self.model.dtype
        max_len = config.max_model_len or cfg.max_position_embeddings
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        bs = config.block_size
        useful = config.max_num_seqs * -(-max_len // bs)
        num_blocks = num_blocks_for_budget(cfg, bs, dtype, device, config.resolved_kv_cache_memory(device), useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} holds no KV block "
                             f"({bytes_per_block(cfg, bs, dtype)} bytes each)")
        if num_blocks * bs < max_len:
            # One sequence must always fit in the whole cache, or preemption could deadlock.
            log.warning("max_model_len lowered from %d to %d: the KV cache holds only %d tokens",
                        max_len, num_blocks * bs, num_blocks * bs)
            max_len = num_blocks * bs
        self.max_model_len = max_len
        self.eos_token_ids = tuple(cfg.eos_token_ids) + release_stop_ids(self.vision, self.tokenizer, cfg.eos_token_ids)
        self.cache = KVCache(cfg, num_blocks, bs, device, dtype)
        self.block_manager = BlockManager(num_blocks, bs, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.resolved_long_prefill_token_threshold())
        self.visual = self._visual_embedder()
        self.multimodal_spec = self._multimodal_spec()  # what the API layer builds image prompts with
        self.runner = ModelRunner(self.model, self.cache, self.eos_token_ids, visual=self.visual)
        self.runner.capture_block_ends = config.enable_prefix_caching
        if device.type == "cuda" and not config.enforce_eager:  # after the cache: graphs read its address
            self.runner.enable_graphs(min(config.cuda_graph_max_batch, config.max_num_seqs), max_len)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, max_len)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self.sequences: dict[str, list[Sequence]] = {}  # request id -> its choices (finished ones included)
        self.stats_sink: StatsSink | None = None
        self.adapter_provider: AdapterProvider | None = None
        self.num_steps = 0
        self._cache_counted = (0, 0)  # the block manager's prefix-cache counters at the last step's report
        torch.manual_seed(config.seed)  # unseeded sampling draws from the global generator

    def _visual_embedder(self) -> Any:
        if self.vision is None:
            return None
        from adapters.parrot import VisualRouting  # noqa: PLC0415
        from server.multimodal.embedder import VisualEmbedder  # noqa: PLC0415
        from server.multimodal.encoder_cache import EncoderCache  # noqa: PLC0415

        return VisualEmbedder(self.vision, self.model.embed_tokens, VisualRouting.parse(self.config.visual_routing),
                              EncoderCache(self.config.encoder_cache_memory))

    def _multimodal_spec(self) -> Any:
        """What the served model takes (``server.multimodal.MultiModalSpec``), None for a text-only model:
        placeholders per image, images per prompt, the placeholder id (any vocabulary id: those rows'
        embeddings are replaced), the tower folder's processor (Parrot's pad-to-square unless the
        checkpoint says ``square``); whether image requests must name a parrot bank."""
        if self.visual is None:
            return None
        from server.model.errors import ModelLoadError  # noqa: PLC0415
        from server.multimodal import MultiModalSpec  # noqa: PLC0415
        from server.multimodal.image_processor import ImageProcessor, ImageProcessorError  # noqa: PLC0415

        tower = self.vision.tower
        try:
            processor = ImageProcessor.from_folder(tower.folder, aspect_ratio=self.vision.config.image_aspect_ratio)
        except ImageProcessorError as exc:
            raise ModelLoadError(str(exc)) from None
        if processor.output_size != (tower.image_size, tower.image_size):
            raise ModelLoadError(f"{tower.folder}: the processor makes {processor.output_size} images; the tower "
                                 f"expects {tower.image_size}x{tower.image_size}")
        tok = self.tokenizer
        placeholder = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                            if isinstance(t, int) and 0 <= t < self.model_config.vocab_size), 0)
        return MultiModalSpec(tokens_per_image=self.visual.tokens_per_image, max_images=self.visual.max_images,
                              placeholder_token_id=placeholder, processor=processor,
                              needs_bank=self.vision.adapter is None)

    # --- properties the server reads -------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def set_stats_sink(self, sink: StatsSink | None) -> None:
        self.stats_sink = sink

    def set_adapter_provider(self, provider: AdapterProvider | None) -> None:
        attach = getattr(provider, "attach_model", None)  # banks built from the model's weights (factor)
        if attach is not None:
            attach(self.model)
        self.adapter_provider = provider

    # --- requests ----------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest when ``request`` cannot run here (thread-safe: reads config only)."""
        request.params.validate()
        if not 1 <= request.n <= self.config.max_num_seqs:
            raise InvalidRequest(f"n must be in [1, {self.config.max_num_seqs}] (max_num_seqs), got {request.n}",
                                 param="n")
        n = len(request.prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty")
        if n >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                                 f"tokens, which must also hold at least one generated token", param="prompt",
                                 code="context_length_exceeded")
        if n + request.params.max_tokens > self.max_model_len:
            raise InvalidRequest(f"the prompt ({n} tokens) plus max_tokens ({request.params.max_tokens}) "
                                 f"exceeds this model's context of {self.max_model_len} tokens", param="max_tokens",
                                 code="context_length_exceeded")
        vocab = self.model_config.vocab_size
        if min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        for param, ids in (("stop_token_ids", request.params.stop_token_ids),
                           ("logit_bias", list(request.params.logit_bias or ()))):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"{param}: token id {bad} is out of range [0, {vocab})", param=param)
        if request.request_id in self.sequences:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        if request.images:
            if self.visual is None:
                raise InvalidRequest("this model takes no images (it has no vision tower)")
            self.visual.validate(request)

    def check_images(self, request: GenerationRequest, handle: Any) -> Any:
        """(images state, spans) for ``request`` once its bank's handle is known, (None, ()) for a text
        prompt; raises InvalidRequest when no visual adapter fits (a tower-only base and no parrot bank)."""
        if not request.images:
            return None, ()
        return self.visual.bind(request, handle)

    def acquire_bank(self, bank: str | None) -> Any:
        """The adapter handle for ``bank`` (None for the base model); raises UnknownBank."""
        if bank is None:
            return None
        if self.adapter_provider is None:
            raise UnknownBank(f"bank {bank!r} not found: this server has no adapter banks")
        return self.adapter_provider.acquire(bank)

    def release_bank(self, handle: Any) -> None:
        if handle is not None and self.adapter_provider is not None:
            try:
                self.adapter_provider.release(handle)
            except Exception:  # noqa: BLE001 - a provider bug must not take the loop down
                log.exception("adapter provider: release failed")

    def add_request(self, request: GenerationRequest, *, adapter_handle: Any = None, acquired: bool = False) -> None:
        """Validate and queue ``request``. ``acquired``: the caller already holds its bank's handle."""
        self.validate(request)
        handle = adapter_handle if acquired else self.acquire_bank(request.bank)
        try:
            images, spans = self.check_images(request, handle)
        except Exception:
            self.release_bank(handle)
            raise
        # blocks computed with an adapter serve only the same bank version; a handle that cannot say
        # which version it pins shares nothing
        cache_key = () if handle is None else getattr(handle, "cache_key", None)
        seed = request.params.seed
        seqs = []
        for j in range(request.n):
            generator = None
            if seed is not None:  # choice j: seed + j (vLLM's), so choices differ and each is reproducible
                generator = torch.Generator(device=self.model.device).manual_seed((seed + j) % 2**64)
            seqs.append(Sequence(request, index=j, adapter_handle=handle, generator=generator, cache_key=cache_key,
                                 images=images, mm_spans=spans))
        try:
            for seq in seqs:  # each choice constrained by its own matcher
                if request.params.structured is not None:
                    seq.grammar = self.grammars.matcher(request.params.structured)
                self.outputs.start(seq)
        except Exception:
            self.release_bank(handle)
            raise
        for child in seqs[1:]:
            child.status = SequenceStatus.FORK_PENDING
        seqs[0].forks = seqs[1:]
        self.sequences[request.request_id] = seqs
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> list[GenerationEvent]:
        """Drop a request now (its blocks are freed at once); the final event of each of its unfinished
        choices (none if the request is unknown)."""
        return self._end_request(request_id, "abort")

    def fail_all(self, message: str) -> list[GenerationEvent]:
        """Finish every request with an error (last resort when the loop itself failed)."""
        return [e for rid in list(self.sequences) for e in self._end_request(rid, "error", message)]

    def _end_request(self, request_id: str, reason: str, error: str | None = None) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        for seq in self.sequences.get(request_id, ()):
            if seq.status is not SequenceStatus.FINISHED:  # (ending a choice may end those forking from it)
                events += self._finish(seq, GenerationEvent(request_id=request_id, index=seq.index), reason, error)
        return events

    def _finish(self, seq: Sequence, event: GenerationEvent, reason: str, error: str | None = None) -> list[GenerationEvent]:
        """End one choice: its final event, and those of the choices still waiting to fork from it
        (a choice that ends before its prompt is done ends them too)."""
        if not event.finished:
            OutputProcessor.finish(seq, event, reason, error)
        pending = list(seq.forks)
        self.scheduler.remove(seq)
        events = [event]
        for child in pending:
            child.status = SequenceStatus.FINISHED
            events.append(OutputProcessor.finish(child, GenerationEvent(request_id=seq.request_id, index=child.index),
                                                 reason, error))
        group = self.sequences.get(seq.request_id, [])
        if any(s.status is not SequenceStatus.FINISHED for s in group):
            return events
        self.sequences.pop(seq.request_id, None)
        self.release_bank(seq.adapter_handle)
        if self.stats_sink is not None:  # one report per request, its choices summed
            now = time.monotonic()
            arrival = seq.request.arrival_time
            first_scheduled = group[0].first_scheduled_time
            first_tokens = [s.first_token_time for s in group if s.first_token_time is not None]
            self._report(self.stats_sink.on_request_finished, RequestStats(
                request_id=seq.request_id, bank=seq.bank, prompt_tokens=seq.num_prompt_tokens,
                completion_tokens=sum(s.num_output_tokens for s in group), finish_reason=reason,
                queue_time_s=(first_scheduled or now) - arrival,
                ttft_s=min(first_tokens) - arrival if first_tokens else None,
                e2e_s=now - arrival, inter_token_s=[t for s in group for t in s.inter_token_s]))
        return events

    @staticmethod
    def _report(fn, stats) -> None:
        try:
            fn(stats)
        except Exception:  # noqa: BLE001 - metrics must not take the loop down
            log.exception("stats sink failed")

    # --- the step ----------------------------------------------------------------------------------
    def step(self) -> list[GenerationEvent]:
        """Schedule and run one step; the events it produced (one per sequence that sampled or ended)."""
        t0 = time.monotonic()
        batch = self.scheduler.schedule()
        events: list[GenerationEvent] = []
        adapters = None
        if batch.seqs:
            for seq in batch.seqs:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = t0
            self.cache.copy_blocks(batch.copies)  # shared blocks about to be written (forks), once per step
            adapters = self._run_contained(list(batch.seqs), list(batch.num_tokens), events)
        self.num_steps += 1
        bm = self.block_manager
        queries, hits = bm.num_queried_tokens - self._cache_counted[0], bm.num_hit_tokens - self._cache_counted[1]
        self._cache_counted = (bm.num_queried_tokens, bm.num_hit_tokens)
        visual_routes = self.visual.take_routing_stats() if self.visual is not None else None
        if self.stats_sink is not None:
            routing = add_bank_stats(self._routing_stats(adapters), visual_routes)
            self._report(self.stats_sink.on_step, StepStats(
                routing=routing,
                time=time.time(), duration_s=time.monotonic() - t0,
                num_prefill_tokens=batch.num_prefill_tokens, num_decode_tokens=batch.num_decode_tokens,
                num_running=self.num_running, num_waiting=self.num_waiting,
                kv_blocks_used=self.block_manager.num_used_blocks, kv_blocks_total=self.block_manager.num_blocks,
                num_preempted=len(batch.preempted), prefix_cache_queries=queries, prefix_cache_hits=hits,
                running_banks=tuple(sorted({s.bank for s in self.scheduler.running if s.bank is not None})),
                waiting_banks=tuple(sorted({s.bank for s in self.scheduler.waiting if s.bank is not None}))))
        return events

    def _forward(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[Any, list[Sequence], Any]:
        """Run ``seqs`` (their next ``num_tokens`` each) through the model: (adapter step, sampled, output)."""
        adapters = None
        if self.adapter_provider is not None:
            adapters = self.adapter_provider.build_step([s.adapter_handle for s in seqs], list(num_tokens))
        sampled, out = self.runner.run(ScheduledBatch(seqs=seqs, num_tokens=num_tokens), adapters)
        return adapters, sampled, out

    def _run_contained(self, seqs: list[Sequence], num_tokens: list[int], events: list[GenerationEvent]) -> Any:
        """Run ``seqs`` and append their events; a fault fails only the sequences at fault.

        When the forward raises, the step is re-run bank by bank (the tokens' cache slots are simply
        written again; nothing advanced): a bank whose sequences still fail alone is taken out of
        service (its sequences end with an error naming it), a base-model group is re-run one
        sequence at a time, and every other sequence gets its token as if nothing happened."""
        keep = [i for i, s in enumerate(seqs) if s.status is not SequenceStatus.FINISHED]  # a failed bank's, ended
        if len(keep) < len(seqs):
            seqs, num_tokens = [seqs[i] for i in keep], [num_tokens[i] for i in keep]
            if not seqs:
                return None
        try:
            adapters, sampled, out = self._forward(seqs, num_tokens)
        except Exception as exc:  # noqa: BLE001 - contained below; the engine keeps running
            groups: dict[str | None, list[int]] = {}
            for i, seq in enumerate(seqs):
                groups.setdefault(seq.bank, []).append(i)
            if len(groups) > 1:
                parts = list(groups.values())  # each bank alone, the base-model sequences together
            elif None in groups and len(seqs) > 1:
                parts = [[i] for i in range(len(seqs))]  # base model only: one request at a time
            else:
                parts = []
            if parts:
                log.warning("engine step failed (%s: %s); re-running its %d sequences apart",
                            type(exc).__name__, exc, len(seqs))
                for idx in parts:
                    self._run_contained([seqs[i] for i in idx], [num_tokens[i] for i in idx], events)
                return None
            self._fail_at_fault(seqs, exc, events)
            return None
        self._emit(seqs, num_tokens, sampled, out, events)
        return adapters

    def _fail_at_fault(self, seqs: list[Sequence], exc: Exception, events: list[GenerationEvent]) -> None:
        """``seqs`` (one bank's, or one base-model sequence) fail alone: end them with an error; a
        bank is taken out of service, and its other requests end too."""
        bank = seqs[0].bank
        detail = f"{type(exc).__name__}: {exc}"
        if bank is None:
            log.error("request %s failed in the model: %s", seqs[0].request_id, detail, exc_info=exc)
            msg = f"internal error while running the model: {detail}"
        else:
            log.error("bank %s failed in the model and is taken out of service: %s", bank, detail, exc_info=exc)
            msg = f"bank {bank!r} failed while running and was taken out of service (an admin may reload it): {detail}"
            fail = getattr(self.adapter_provider, "fail", None)
            if fail is not None:
                try:
                    fail(seqs[0].adapter_handle, detail)
                except Exception:  # noqa: BLE001 - the requests below fail either way
                    log.exception("adapter provider: fail() raised")
            failure = getattr(self.adapter_provider, "failure", None)
            others = [s for group in self.sequences.values() for s in group
                      if s not in seqs and s.status is not SequenceStatus.FINISHED and failure is not None
                      and s.adapter_handle is not None and failure(s.adapter_handle) is not None]
            seqs = seqs + others
        for seq in seqs:
            if seq.status is not SequenceStatus.FINISHED:  # (a choice ended with the one it forks from)
                events += self._finish(seq, GenerationEvent(request_id=seq.request_id, index=seq.index), "error", msg)

    def _emit(self, seqs: list[Sequence], num_tokens: list[int], sampled: list[Sequence], out: Any,
              events: list[GenerationEvent]) -> None:
        """Advance ``seqs`` after a forward and turn each sampled token into its sequence's event."""
        for seq, k in zip(seqs, num_tokens):
            seq.num_computed_tokens += k
            self.block_manager.cache_blocks(seq)
        for seq in sampled:  # choices waiting for this prompt start now, before any choice can end
            for child in list(seq.forks):
                self.scheduler.fork(seq, child)
        for j, seq in enumerate(sampled):
            if seq.fault is not None:  # non-finite logits: never a token sampled from them
                event = GenerationEvent(request_id=seq.request_id, index=seq.index)
                OutputProcessor.finish(seq, event, "error", seq.fault)
            else:
                try:
                    event = self.outputs.on_token(seq, out.token_ids[j], out.logprobs[j])
                    if seq.params.prompt_logprobs and seq.num_output_tokens == 1:
                        event.prompt_logprobs = list(seq.prompt_logprobs)
                        if seq.params.logprobs:
                            event.prompt_top = list(seq.prompt_top)
                except Exception as exc:  # noqa: BLE001 - one request's failure is that request's
                    log.exception("output processing failed for %s", seq.request_id)
                    event = GenerationEvent(request_id=seq.request_id, index=seq.index)
                    OutputProcessor.finish(seq, event, "error", f"{type(exc).__name__}: {exc}")
            if event.finished:
                events += self._finish(seq, event, event.finish_reason, event.error)
            else:
                events.append(event)

    def _routing_stats(self, adapters: Any) -> Any:
        """The step's routing statistics, reduced once after the forward (one host sync per step)."""
        reduce = getattr(adapters, "routing_stats", None)
        if reduce is None:
            return None
        used = getattr(self.adapter_provider, "pool_slots_used", None)
        try:
            return reduce(used() if callable(used) else None)
        except Exception:  # noqa: BLE001 - statistics never fail a step
            log.exception("routing statistics failed")
            return None

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[GenerationEvent]]:
        """Run ``requests`` to completion (tests, benchmarks): every request's events, in order (the
        choices of an n > 1 request interleaved; ``GenerationEvent.index`` tells them apart)."""
        result: dict[str, list[GenerationEvent]] = {}
        for r in requests:
            self.add_request(r)
            result[r.request_id] = []
        while self.has_unfinished():
            for e in self.step():
                result.setdefault(e.request_id, []).append(e)
        return result
