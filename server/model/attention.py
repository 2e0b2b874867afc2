"""Reference attention over a simple per-sequence KV cache.

The engine backs ``AttentionStep`` with its paged cache; this one keeps each sequence's keys and
values in growing per-layer tensors and is what tests (and the trainer's evaluation) use when no
engine runs. It is also the definition the paged implementations are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                     sliding_window: int | None = None) -> torch.Tensor:
    """One sequence: q [Tq, H, D] at positions q_start.., k/v [Tk, Hkv, D] at positions 0.. -> [Tq, H, D]."""
    tq, tk = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = None
    if tq > 1 or sliding_window is not None:
        qpos = torch.arange(q_start, q_start + tq, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        mask = allowed
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=kh.shape[0] != qh.shape[0])
    return out.transpose(0, 1)


class SequenceKVCache:
    """Keys/values per sequence id and layer, grown by concatenation. Not paged; for tests and tools."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.k: dict[object, list[torch.Tensor | None]] = {}
        self.v: dict[object, list[torch.Tensor | None]] = {}

    def length(self, seq_id: object) -> int:
        ks = self.k.get(seq_id)
        return 0 if ks is None or ks[0] is None else ks[0].shape[0]

    def free(self, seq_id: object) -> None:
        self.k.pop(seq_id, None)
        self.v.pop(seq_id, None)

    def step(self, seq_ids: list[object], query_lens: list[int]) -> "SequenceAttentionStep":
        """Bind one step: the flat batch holds query_lens[i] consecutive tokens of seq_ids[i]."""
        starts = []
        for sid in seq_ids:
            if sid not in self.k:
                self.k[sid] = [None] * self.cfg.num_hidden_layers
                self.v[sid] = [None] * self.cfg.num_hidden_layers
            starts.append(self.length(sid))
        return SequenceAttentionStep(self, list(seq_ids), list(query_lens), starts)


@dataclass
class SequenceAttentionStep:
    cache: SequenceKVCache
    seq_ids: list[object]
    query_lens: list[int]
    starts: list[int]  # context length of each sequence before this step

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.query_lens)])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, offset = [], 0
        for sid, n, start in zip(self.seq_ids, self.query_lens, self.starts):
            ks, vs = self.cache.k[sid], self.cache.v[sid]
            kn, vn = k[offset:offset + n], v[offset:offset + n]
            ks[layer] = kn if ks[layer] is None else torch.cat([ks[layer], kn])
            vs[layer] = vn if vs[layer] is None else torch.cat([vs[layer], vn])
            outs.append(causal_attention(q[offset:offset + n], ks[layer], vs[layer], start, self.cache.cfg.sliding_window))
            offset += n
        return torch.cat(outs)
