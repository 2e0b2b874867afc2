"""The paged KV cache tensors and how many blocks fit in a memory budget."""

from __future__ import annotations

from pathlib import Path

import torch

from server.model import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys + values of one block in every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def available_memory(device: torch.device) -> int:
    """Bytes free now: CUDA free device memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume 4 GiB free


def num_blocks_for_budget(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                          kv_cache_memory: int | float, max_blocks_useful: int) -> int:
    """Blocks that fit in the budget (bytes, or a fraction of free memory), at most ``max_blocks_useful``."""
    if isinstance(kv_cache_memory, float):
        budget = int(available_memory(device) * kv_cache_memory)
    else:
        budget = int(kv_cache_memory)
    return max(0, min(budget // bytes_per_block(cfg, block_size, dtype), max_blocks_useful))


class KVCache:
    """Per layer, keys and values of every block: ``k[layer]`` / ``v[layer]`` are [num_blocks, block_size, Hkv, D].

    A token at position p of a sequence lives in block ``block_table[p // block_size]`` at offset
    ``p % block_size``; its flat slot is ``block * block_size + offset``.

    One more block, ``scratch_block`` (index ``num_blocks``), is never handed out: the padding rows of
    a decode step padded up to a captured CUDA-graph size (``cuda_graphs.py``) write there.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        shape = (cfg.num_hidden_layers, num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: a never-written slot must not hold NaN (it is masked, but 0 * NaN = NaN)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer: a shared block about to be written."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.k.device)
            dst = torch.tensor([d for _, d in copies], device=self.k.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
