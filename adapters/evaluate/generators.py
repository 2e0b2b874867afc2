"""Where evaluation gets its tokens from: greedy generation and log-likelihood scoring, batched.

``Generator`` and ``ChoiceScorer`` are the two interfaces the evaluator needs. ``LocalRunner``
implements both on our ``LlamaModel`` with an optional bank run by the training adapter step in eval
mode (no dropout; every expert computed densely, weights as the server routes them).
``EngineGenerator`` sends the same greedy requests (and, for scoring, requests with prompt
log-probabilities) through the serving engine.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from server.model import LlamaModel, SequenceKVCache, StepContext, step_context


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], max_tokens: int,
                 done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt, stopping at EOS, ``max_tokens``, or once ``done``
        (called with the tokens generated so far) says the answer is already decided."""
        ...


class ChoiceScorer(Protocol):
    def score(self, prefix: list[list[int]], continuations: list[list[list[int]]]) -> list[list[float]]:
        """Sum of log p(continuation tokens | prefix + earlier continuation tokens) for every
        continuation of every item; prefix [items][tokens], continuations [items][choices][tokens]."""
        ...


class LocalRunner:
    """Generator and ChoiceScorer over our model in this process, ``batch_size`` sequences per forward."""

    def __init__(self, model: LlamaModel, bank=None, *, batch_size: int = 16):
        from adapters.train.modules import TrainableBank

        self.model = model
        self.bank = None if bank is None else TrainableBank.from_bank(bank).to(model.device).eval()
        self.batch_size = batch_size
        self.eos = tuple(model.config.eos_token_ids)

    def _adapters(self):
        from adapters.train.modules import TrainingAdapterStep

        return None if self.bank is None else TrainingAdapterStep(self.bank, training=False)

    @torch.inference_mode()
    def generate(self, prompts, max_tokens, done=None):
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            outputs.extend(self._generate_batch(prompts[start:start + self.batch_size], max_tokens, done))
        return outputs

    def _generate_batch(self, prompts, max_tokens, done):
        device = self.model.device
        cache = SequenceKVCache(self.model.config)
        outs: list[list[int]] = [[] for _ in prompts]
        feed = [list(p) for p in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_tokens):
            if not live:
                break
            lens = [len(feed[i]) for i in live]
            attn = cache.step(live, lens)
            ids = torch.tensor([t for i in live for t in feed[i]], dtype=torch.long, device=device)
            last = torch.tensor(lens, device=device).cumsum(0) - 1
            ctx = StepContext(positions=attn.positions().to(device), attention=attn, adapters=self._adapters(),
                              logits_indices=last)
            with step_context(ctx):
                nxt = self.model(ids).argmax(-1).tolist()
            still = []
            for i, tok in zip(live, nxt):
                outs[i].append(tok)
                feed[i] = [tok]
                if tok in self.eos or (done is not None and done(outs[i])):
                    cache.free(i)
                else:
                    still.append(i)
            live = still
        return outs

    @torch.inference_mode()
    def score(self, prefix, continuations):
        # Flatten (item, choice) into sequences; the common case (every choice one token after the
        # shared prefix) needs one sequence per item instead of one per choice.
        seqs: list[tuple[list[int], list[tuple[int, int]]]] = []  # tokens, [(position, target)]
        owners: list[list[tuple[int, int]]] = []  # per sequence: (item, choice) for each scored group
        for i, (pre, conts) in enumerate(zip(prefix, continuations)):
            if all(len(c) == 1 for c in conts):
                seqs.append((list(pre), [(len(pre) - 1, c[0]) for c in conts]))
                owners.append([(i, j) for j in range(len(conts))])
            else:
                for j, c in enumerate(conts):
                    toks = list(pre) + list(c)
                    seqs.append((toks, [(len(pre) - 1 + k, c[k]) for k in range(len(c))]))
                    owners.append([(i, j)] * len(c))
        scores = [[0.0] * len(c) for c in continuations]
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            rows, offset = [], 0
            for toks, targets in chunk:
                rows.extend(offset + p for p, _ in targets)
                offset += len(toks)
            cache = SequenceKVCache(self.model.config)
            attn = cache.step(list(range(len(chunk))), [len(t) for t, _ in chunk])
            device = self.model.device
            ids = torch.tensor([t for toks, _ in chunk for t in toks], dtype=torch.long, device=device)
            ctx = StepContext(positions=attn.positions().to(device), attention=attn, adapters=self._adapters(),
                              logits_indices=torch.tensor(rows, dtype=torch.long, device=device))
            with step_context(ctx):
                logp = F.log_softmax(self.model(ids).float(), dim=-1)
            r = 0
            for (toks, targets), own in zip(chunk, owners[start:start + self.batch_size]):
                for (_, target), (i, j) in zip(targets, own):
                    scores[i][j] += float(logp[r, target])
                    r += 1
        return scores


class EngineGenerator:
    """Generator and ChoiceScorer over the serving engine (``server.engine.LLMEngine`` + ``adapters.runtime.BankRegistry``):
    every prompt is a greedy request, all submitted at once and run in the engine's continuous batch.

    ``done`` is not a callback here: the engine stops a request at any of ``stop`` strings (the
    answer labels), which ends it at the same token the local runner's check would.
    """

    def __init__(self, model: LlamaModel, tokenizer, bank=None, *, model_path: str = "<in memory>",
                 max_num_seqs: int = 16, kv_cache_memory: int | None = 256 << 20, vision=None,
                 bank_dtype=None):
        """``vision``: the model's ``server.model.parrot.ModelVision`` (image prompts), None for text only.
        ``bank_dtype``: the pool's storage dtype for the bank's expert weights (None: the model's)."""
        from adapters.runtime.registry import BankRegistry
        from server.engine.config import EngineConfig
        from server.engine.llm_engine import LLMEngine

        config = EngineConfig(model=model_path, max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory,
                              max_num_batched_tokens=max(512, 256 * max_num_seqs))
        self.engine = LLMEngine(config, model=model, tokenizer=tokenizer, vision=vision)
        self.bank_name = None
        if bank is not None:
            from adapters.parrot.bank import TowerSpec

            tower = TowerSpec.of(vision.tower) if vision is not None else None  # parrot banks check they fit it
            registry = BankRegistry(model.config, device=model.device, dtype=bank_dtype or model.dtype, tower=tower)
            registry.add(bank)
            self.engine.set_adapter_provider(registry)
            self.bank_name = bank.name
        self._ids = 0

    def generate(self, prompts, max_tokens, done=None, stop: list[str] | None = None, images=None):
        """``images``: per prompt, its ``ImageInput`` list (``server.multimodal.prompt``), or None."""
        from server.engine.protocol import GenerationRequest, SamplingParams

        requests = []
        for k, p in enumerate(prompts):
            self._ids += 1
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop or []),
                                    include_stop_str_in_output=True)
            requests.append(GenerationRequest(f"eval-{self._ids}", list(p), params, bank=self.bank_name,
                                              images=list(images[k]) if images is not None else []))
        events = self._run(requests)
        return [[t for e in events[r.request_id] for t in e.token_ids] for r in requests]

    def score(self, prefix, continuations):
        """``ChoiceScorer`` through the engine: one request per (item, choice) with the choice appended
        to the prompt, one token generated, the prompt's log-probabilities returned; a choice's score
        is the sum over its own tokens."""
        from server.engine.protocol import GenerationRequest, SamplingParams

        requests, owners = [], []
        for i, (pre, conts) in enumerate(zip(prefix, continuations)):
            for j, c in enumerate(conts):
                self._ids += 1
                params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True, ignore_eos=True)
                requests.append(GenerationRequest(f"score-{self._ids}", list(pre) + list(c), params,
                                                  bank=self.bank_name))
                owners.append((i, j, len(c)))
        events = self._run(requests)
        scores = [[0.0] * len(c) for c in continuations]
        for r, (i, j, n) in zip(requests, owners):
            lp = events[r.request_id][0].prompt_logprobs
            scores[i][j] = float(sum(lp[-n:])) if n else 0.0
        return scores

    def _run(self, requests):
        events = self.engine.generate(requests)
        for r in requests:
            errors = [e.error for e in events[r.request_id] if e.finish_reason == "error"]
            if errors:
                raise RuntimeError(f"engine failed request {r.request_id}: {errors[0]}")
        return events

