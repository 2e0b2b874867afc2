"""LM fine-tuning of a factor bank's expert slices (FactorLLM's optional second stage).

After calibration the model runs each FFN as the sum of its top-k experts (binary gates, scale s),
which loses what the unchosen experts contributed. Fine-tuning trains the experts' weights — the
gate|up rows and down columns of every factorised FFN, in the expert-packed layout the server runs
— with the next-token loss of the *factorised* model on calibration text, so the chosen experts
learn to cover for the others. The routers, permutations and scales stay as calibrated (a top-k
choice has no gradient), the rest of the model stays frozen.

The result is the same bank with ``gate_up`` / ``down`` stored per layer in the original neuron
order (adapters/factor/bank.py), which ``load_factor_weights`` packs instead of the model's own.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from server.model import SequenceKVCache, StepContext, step_context

from ..bank import ExpertBank
from .bank import SCALE, build_factor_bank, layer_permutation
from .serving import FactorStep, load_factor_weights


def finetune_factor_bank(model, bank: ExpertBank, sequences: list[list[int]], *, steps: int, seqs_per_step: int,
                         lr: float = 1e-4, weight_decay: float = 0.0,
                         log: Callable[[str], None] = lambda s: None) -> tuple[ExpertBank, dict]:
    """Train ``bank``'s expert slices for ``steps`` AdamW steps of ``seqs_per_step`` sequences each
    (cycling through ``sequences``) with the LM loss of the model served through the bank. Returns
    (the fine-tuned bank, a report: steps, tokens, minutes, first and last step's loss)."""
    if steps < 1 or seqs_per_step < 1 or not sequences:
        raise ValueError("need steps >= 1, seqs_per_step >= 1 and some sequences")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    weights = load_factor_weights(bank, model)
    params = []
    for layer in weights.layers:
        if layer is not None:
            layer.w_gate_up = torch.nn.Parameter(layer.w_gate_up.detach().float().clone())
            layer.w_down = torch.nn.Parameter(layer.w_down.detach().float().clone())
            params += [layer.w_gate_up, layer.w_down]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    adapters = FactorStep(weights)
    losses, tokens, start = [], 0, time.perf_counter()
    try:
        for s in range(steps):
            batch = [sequences[(s * seqs_per_step + i) % len(sequences)] for i in range(seqs_per_step)]
            with torch.enable_grad():
                loss = lm_loss(model, batch, adapters)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += sum(len(b) for b in batch)
            if s % 10 == 0 or s == steps - 1:
                log(f"finetune step {s + 1}/{steps} loss {losses[-1]:.4f} [{time.perf_counter() - start:.0f}s]")
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    gate_up, down = [], []
    for adapters_layer, layer in zip(bank.layers, weights.layers):
        if layer is None:
            gate_up.append(None)
            down.append(None)
            continue
        e = layer.num_experts
        perm = layer_permutation(adapters_layer)
        g, d = unpack_experts(layer.w_gate_up.detach(), layer.w_down.detach(), perm, e)
        gate_up.append(g)
        down.append(d)
    tuned = build_factor_bank(
        bank.name, bank.base, top_k=bank.routing.top_k,
        routers=[la.block_router for la in bank.layers],
        permutations=[None if la.block_router is None else layer_permutation(la) for la in bank.layers],
        scales=[float(la.extra[SCALE]) if la.block_router is not None else 1.0 for la in bank.layers],
        gate_up=gate_up, down=down, version=bank.version)
    report = {"steps": steps, "tokens": tokens, "lr": lr, "minutes": round((time.perf_counter() - start) / 60, 2),
              "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)], "loss": losses}
    return tuned, report


def lm_loss(model, seqs: list[list[int]], adapters) -> torch.Tensor:
    """Mean next-token cross-entropy over a flat batch of whole sequences, served through ``adapters``."""
    cache = SequenceKVCache(model.config)
    step = cache.step(list(range(len(seqs))), [len(s) for s in seqs])
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=model.device)
    with step_context(StepContext(positions=step.positions().to(model.device), attention=step, adapters=adapters)):
        logits = model(ids).float()
    starts = torch.tensor([0] + [len(s) for s in seqs], device=model.device).cumsum(0)
    pred = torch.cat([torch.arange(int(a), int(b) - 1, device=model.device) for a, b in zip(starts[:-1], starts[1:])])
    return F.cross_entropy(logits.index_select(0, pred), ids.index_select(0, pred + 1))


def unpack_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, permutation: torch.Tensor,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``kernel.pack_experts``: w_gate_up [E, 2m, H], w_down [E, m, H] -> the dense
    gate_up [2I, H] (gate rows then up rows) and down [H, I] in the original neuron order."""
    from .kernel import gate_up_columns

    e, two_m, hidden = w_gate_up.shape
    inter = e * two_m // 2
    gate_up = torch.empty(2 * inter, hidden, dtype=w_gate_up.dtype, device=w_gate_up.device)
    gate_up[gate_up_columns(permutation, num_experts)] = w_gate_up.reshape(2 * inter, hidden)
    down = torch.empty(hidden, inter, dtype=w_down.dtype, device=w_down.device)
    down[:, permutation] = w_down.reshape(inter, hidden).t()
    return gate_up, down
