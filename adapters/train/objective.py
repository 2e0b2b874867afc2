"""One micro-batch through the frozen base model with a trainable bank: the loss and routing stats.

``BankObjective`` is the module DDP wraps: its only parameters are the bank's; the base model is
held outside the module tree so DDP neither broadcasts nor watches its (frozen) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from server.model import LlamaModel, SequenceKVCache, StepContext, step_context

from .data import Example
from .losses import dynmole_balance_loss, entropy_loss, lm_loss, mixtral_balance_loss
from .modules import TrainableBank, TrainingAdapterStep


@dataclass
class FlatBatch:
    """Sequences laid end to end. input_ids/positions [T]; predict_rows [L] rows whose logits
    predict targets [L]; mask [T] bool marks real tokens (all, here: there is no padding)."""

    input_ids: Tensor
    positions: Tensor
    seq_lens: list[int]
    predict_rows: Tensor
    targets: Tensor
    mask: Tensor

    @classmethod
    def of(cls, examples: list[Example], device: torch.device | str = "cpu") -> "FlatBatch":
        ids, pos, rows, targets = [], [], [], []
        offset = 0
        for ex in examples:
            n = len(ex.input_ids)
            ids.extend(ex.input_ids)
            pos.extend(range(n))
            for j in range(1, n):
                if ex.is_target[j]:
                    rows.append(offset + j - 1)
                    targets.append(ex.input_ids[j])
            offset += n
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(ids), as_long(pos), [len(ex.input_ids) for ex in examples], as_long(rows),
                   as_long(targets), torch.ones(offset, dtype=torch.bool, device=device))


@dataclass
class StepOutput:
    loss: Tensor  # scalar, with grad
    lm: float
    entropy: float  # mean normalised router entropy (dynmole; 0 otherwise)
    balance: float
    broadcast: float  # fraction of (router, token) pairs that kept every expert (dynmole)
    load: list[float]  # per expert: fraction of (router, token) pairs that selected it
    tokens: int


class BankObjective(nn.Module):
    def __init__(self, base: LlamaModel, bank: TrainableBank, *, dropout: float = 0.05,
                 entropy_coef: float = 0.01, balance_coef: float = 0.001):
        super().__init__()
        self.bank = bank
        object.__setattr__(self, "base", base)  # not a submodule: frozen, never synchronised
        self.dropout = dropout
        self.entropy_coef = entropy_coef
        self.balance_coef = balance_coef

    def forward(self, batch: FlatBatch) -> StepOutput:
        cache = SequenceKVCache(self.base.config)
        attention = cache.step(list(range(len(batch.seq_lens))), batch.seq_lens)
        adapters = TrainingAdapterStep(self.bank, training=self.training, dropout=self.dropout)
        ctx = StepContext(positions=batch.positions, attention=attention, adapters=adapters,
                          logits_indices=batch.predict_rows)
        with step_context(ctx):
            logits = self.base(batch.input_ids)
        lm = lm_loss(logits, batch.targets)
        loss = lm
        records = adapters.records
        entropy = balance = broadcast = torch.zeros(())
        load: list[float] = []
        kind = self.bank.spec.kind
        if records and kind in ("dynmole", "mola"):
            weights = torch.stack([r.weights for r in records])  # [R, T, N]
            probs = torch.stack([r.probs for r in records])
            balance = dynmole_balance_loss(weights, probs, batch.mask)
            loss = loss + self.balance_coef * balance
            if kind == "dynmole":
                ent = torch.stack([r.entropy for r in records])  # [R, T]
                entropy = entropy_loss(ent, batch.mask)
                loss = loss + self.entropy_coef * entropy
                thr = self.bank.spec.routing.entropy_threshold
                broadcast = (ent > thr).float().mean() if self.bank.spec.routing.entropy_index > 0 and thr < 1 else broadcast
            load = (weights > 0).float().mean((0, 1)).tolist()
        elif records and kind == "mixlora":
            logits_r = torch.stack([r.logits for r in records])  # [L, T, N]
            balance = mixtral_balance_loss(logits_r, self.bank.spec.routing.top_k, batch.mask)
            loss = loss + self.balance_coef * balance
            load = (torch.stack([r.weights for r in records]) > 0).float().mean((0, 1)).tolist()
        return StepOutput(loss=loss, lm=float(lm.detach()), entropy=float(entropy.detach()),
                          balance=float(balance.detach()), broadcast=float(broadcast), load=load,
                          tokens=int(batch.input_ids.numel()))
