"""CUDA graphs for decode steps: static buffers, padding, copy-in, replay (or eager), slice out.

A decode step (every scheduled sequence adds one token) launches hundreds of small kernels; on a GPU
their launch cost, not the math, bounds batch-1..32 decode. As vLLM and SGLang do, the decode
forward is captured once per batch size of ``batch_sizes`` (1, 2, 4, 8, 16, 24, 32, ... up to
``--cuda-graph-max-batch``) and replayed:

- every tensor the graph reads lives at a fixed address: ``input_ids``, ``positions``,
  ``slot_mapping``, ``block_tables`` [B, max_blocks], ``ctx_lens`` (each row's context length), the
  row indices, the KV cache and the weights; a step copies its values into the first n rows;
- the batch is padded up to the smallest captured size >= n: padding rows write their key/value to
  the cache's ``scratch_block`` (never a block a sequence holds) and attend over that one slot;
- the attention's longest context is static (``max_blocks * block_size``), so the Triton kernel's
  split and the torch reference's gather do not depend on the step;
- the logits of all B rows land in one output buffer; the caller reads the first n.

Capture happens once, at start (``capture``), after a warm-up forward per size, largest size first,
with one memory pool shared by every size (a smaller graph reuses the larger one's blocks); it is
timed and logged. Off CUDA ``capture`` is a no-op and ``run`` executes the same static-buffer path
eagerly: what the tests check on the CPU (equal outputs to the plain path; no host sync inside the
region, see ``forbid_host_syncs``).

Banks in the batch. A ``BankStep`` (``adapters/runtime/step.py``) builds its per-step metadata (each
site's groups of rows, gather indices, routing parameter tables) on first use, with host syncs
(``nonzero``, ``unique``), then caches it; what remains per layer is routing on x, static-size pair
plans and routed-LoRA calls, none of which syncs. So a step with banks is captured per *bank
signature*: the padded size, each row's bank index, the banks (layout and pool offset) and the pool
state. The first time a signature is seen, the runner builds a ``BankStep`` over the padded rows
(padding rows: no bank; static plans, as on CUDA) and runs it eagerly, which builds and caches that
metadata, syncs included, outside any graph; the second time, it captures the forward through the
same step; later steps with the signature replay it. Signatures live in a small LRU
(``max_bank_graphs``). The replayed step's routing records are handed to the engine's step
(``BankStep.share_records``) for the metrics. Factor banks run eagerly.

What is not captured (``ModelRunner`` runs it eagerly): steps with prefill chunks, images, prompt
log-probabilities or hidden-state captures, factor banks, and batches larger than the largest size.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from server.model import LlamaModel, StepContext, step_context

from .kv_cache import KVCache
from .paged_attention import PagedAttentionMetadata, PagedAttentionStep

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (and ``max_batch`` itself): vLLM's list."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


class HostSyncError(RuntimeError):
    """A host sync (or data-dependent shape) inside a region a CUDA graph would capture."""


_SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "unique", "unique_consecutive", "masked_select",
            "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def forbid_host_syncs() -> Iterator[None]:
    """Make every Python-level host sync raise ``HostSyncError`` inside the block: reading a tensor's
    value on the host (``item``, ``tolist``, ``cpu``, ``bool(t)``, ``int(t)``, ``if t:``), ops whose
    output shape depends on values (``nonzero``, ``unique``, ``masked_select``, boolean-mask
    indexing), and tensors made from host data on a device (``torch.tensor(..., device=...)``). On CUDA these would stall the stream (or fail capture); on the CPU they are free,
    so this is how the CPU tests prove the decode region is graph-safe. Not thread-safe (patches
    ``torch.Tensor``): for tests and the GPU check's dry run."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    saved_fns = {name: getattr(torch, name) for name in ("nonzero", "unique", "unique_consecutive", "masked_select")}
    made = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    getitem = torch.Tensor.__getitem__

    def refuse(name):
        def fn(*args, **kwargs):
            raise HostSyncError(f"host sync inside a captured region: {name}")
        return fn

    def host_data(name):
        def fn(data, *args, **kwargs):  # host data put on the model's device: a host->device copy on CUDA
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                raise HostSyncError(f"host sync inside a captured region: torch.{name} from host data")
            return made[name](data, *args, **kwargs)
        return fn

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise HostSyncError("host sync inside a captured region: boolean-mask indexing")
        return getitem(self, index)

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in saved_fns:
            setattr(torch, name, refuse(f"torch.{name}"))
        for name in made:
            setattr(torch, name, host_data(name))
        torch.Tensor.__getitem__ = checked_getitem
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in (saved_fns | made).items():
            setattr(torch, name, fn)
        torch.Tensor.__getitem__ = getitem


@dataclass
class BankGraph:
    """A decode graph with banks: the padded ``BankStep`` it runs (its cached metadata and records
    live as long as the graph), the graph (None off CUDA: the step runs eagerly) and its logits."""

    step: Any
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None
    keep: tuple = ()  # the objects the signature names by id (layouts, pool state): kept alive
    failed: bool = False  # its capture failed: it runs eagerly


def bank_signature(step: Any, size: int) -> tuple:
    """What a captured graph with banks depends on: the padded size, each row's bank (padding: -1),
    each bank's layout and pool offset, the pool state, and how the step routes and records."""
    rows = step.token_bank.tolist()  # the one host read of a step with banks (before the region)
    return (size, tuple(rows + [-1] * (size - len(rows))), tuple((id(b.layout), b.offset) for b in step.banks),
            id(step.state), step.collect_stats, step.backend)


class DecodeGraphRunner:
    """Decode steps of up to ``max(batch_sizes)`` sequences through static buffers (see the module
    docstring). ``max_blocks``: block-table width (a sequence's most blocks: ceil(max_model_len /
    block_size)). ``run`` works before and without ``capture`` (eagerly, same buffers)."""

    def __init__(self, model: LlamaModel, cache: KVCache, backend: str, *, batch_sizes: list[int], max_blocks: int,
                 max_bank_graphs: int = 8):
        if not batch_sizes:
            raise ValueError("batch_sizes is empty")
        self.model = model
        self.cache = cache
        self.backend = backend
        self.window = model.config.sliding_window
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = max_blocks
        self.max_ctx = max_blocks * cache.block_size
        b, dev = self.max_batch, model.device
        self.device = dev
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(b, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(b, max_blocks, dtype=torch.long, device=dev)
        self.ctx_lens = torch.zeros(b, dtype=torch.long, device=dev)
        self.rows = torch.arange(b, device=dev)  # decode row i is sequence row i of the block tables
        self._pad(0)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the graph's logits [size, vocab]
        self.pool = None
        self.capture_seconds = 0.0
        self.captured = False  # capture() ran on CUDA: bank graphs are captured too
        self.max_bank_graphs = max_bank_graphs
        self.bank_graphs: OrderedDict[tuple, BankGraph] = OrderedDict()

    def size_for(self, n: int) -> int | None:
        """The smallest captured size that holds ``n`` rows, or None (n is past the largest)."""
        for size in self.batch_sizes:
            if size >= n:
                return size
        return None

    def _pad(self, start: int) -> None:
        """Rows ``start``.. become padding: token 0 at position 0, writing and reading the scratch slot."""
        scratch = self.cache.scratch_block
        self.input_ids[start:] = 0
        self.positions[start:] = 0
        self.slot_mapping[start:] = scratch * self.cache.block_size
        self.block_tables[start:] = scratch
        self.ctx_lens[start:] = 1

    def _forward(self, size: int, adapters: Any = None) -> torch.Tensor:
        """The region a graph captures: the model over the first ``size`` rows of the static buffers
        (with ``adapters``: a ``BankStep`` over those ``size`` rows)."""
        rows = self.rows[:size]
        ctx_lens = self.ctx_lens[:size]
        meta = PagedAttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                      decode_rows=rows, decode_seq=rows, decode_ctx_lens=ctx_lens, prefills=[],
                                      decode_max_ctx=self.max_ctx)
        if self.backend == "triton":
            meta.paged_rows, meta.paged_seq, meta.paged_ctx_lens, meta.paged_max_ctx = rows, rows, ctx_lens, self.max_ctx
        ctx = StepContext(positions=self.positions[:size],
                          attention=PagedAttentionStep(self.cache, meta, self.backend, self.window), adapters=adapters)
        with step_context(ctx):
            return self.model(self.input_ids[:size])

    def copy_in(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> int:
        """Write one decode step (row i: its token, its position, its sequence's block table) into the
        static buffers, padded up to the captured size; that size."""
        n = len(token_ids)
        size = self.size_for(n)
        if size is None:
            raise ValueError(f"{n} rows exceed the largest captured size {self.max_batch}")
        bs, scratch = self.cache.block_size, self.cache.scratch_block
        pos = torch.tensor(positions + [0] * (size - n), dtype=torch.long)
        bt = torch.full((size, self.max_blocks), scratch, dtype=torch.long)
        for i, table in enumerate(block_tables):
            bt[i, :len(table)] = torch.tensor(table, dtype=torch.long)
        slots = bt[torch.arange(size), pos // bs] * bs + pos % bs  # padding rows: the scratch block's slot 0
        ids = torch.tensor(token_ids + [0] * (size - n), dtype=torch.long)
        host = torch.stack([ids, pos, slots, pos + 1])  # one host->device copy for the four row vectors
        dev = host.to(self.device, non_blocking=True)
        self.input_ids[:size].copy_(dev[0])
        self.positions[:size].copy_(dev[1])
        self.slot_mapping[:size].copy_(dev[2])
        self.ctx_lens[:size].copy_(dev[3])
        self.block_tables[:size].copy_(bt.to(self.device, non_blocking=True))
        return size

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
            adapters: Any = None) -> torch.Tensor:
        """The step's logits [n, vocab]: replayed when ``size`` (with ``adapters``: the step's bank
        signature) was captured, else the same region eagerly."""
        n = len(token_ids)
        size = self.copy_in(token_ids, positions, block_tables)
        if adapters is not None:
            return self._run_banks(size, adapters)[:n]
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            return self.outputs[size][:n]
        return self._forward(size)[:n]

    def _run_banks(self, size: int, adapters: Any) -> torch.Tensor:
        """A step with banks (see the module docstring): replay its signature's graph, capturing it
        the second time the signature is seen; the first time (and off CUDA) the signature's padded
        step runs eagerly."""
        key = bank_signature(adapters, size)
        entry = self.bank_graphs.get(key)
        if entry is None:
            entry = self._bank_graph(key, size, adapters)
        elif entry.graph is None and self.captured and not entry.failed:  # metadata built by the first run
            t0 = time.perf_counter()
            entry.step._records.clear()
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a bank load copying into the pool from another thread must not break it
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    entry.output = self._forward(size, entry.step)
                entry.graph = graph
                log.debug("captured a decode graph with banks (size %d) in %.3f s", size, time.perf_counter() - t0)
            except RuntimeError:
                entry.failed = True  # this signature stays eager
                log.exception("capturing a decode graph with banks failed; those steps run eagerly")
        self.bank_graphs.move_to_end(key)
        if entry.graph is not None:
            entry.graph.replay()
            out = entry.output
        else:  # the padded step eagerly, as a replay would run it (its records afresh)
            entry.step._records.clear()
            out = self._forward(size, entry.step)
        adapters.share_records(entry.step)
        return out

    def _bank_graph(self, key: tuple, size: int, adapters: Any) -> BankGraph:
        """A new LRU entry: the ``BankStep`` of ``adapters`` over ``size`` rows (padding: no bank),
        with static plans and no CPU fast path (what runs on CUDA)."""
        from adapters.runtime.step import BankStep

        pad = torch.full((size - adapters.num_tokens,), -1, dtype=torch.long, device=adapters.token_bank.device)
        step = BankStep(adapters.cfg, adapters.state, adapters.banks, torch.cat([adapters.token_bank, pad]),
                        collect_stats=adapters.collect_stats, backend=adapters.backend, static_plans=True)
        entry = BankGraph(step, keep=(adapters.state, *(b.layout for b in adapters.banks)))
        for stale in [k for k in self.bank_graphs if k[3] != key[3]]:  # another pool state: never again,
            del self.bank_graphs[stale]  # and its graphs would keep the old pool's memory alive
        self.bank_graphs[key] = entry
        while len(self.bank_graphs) > self.max_bank_graphs:
            self.bank_graphs.popitem(last=False)
        return entry

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size (CUDA only; a no-op returning 0 elsewhere): the seconds it took."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        self._pad(0)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.batch_sizes):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for size in reversed(self.batch_sizes):  # largest first: the smaller graphs reuse its pool blocks
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.captured = True
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured CUDA graphs for decode batch sizes %s in %.2f s", self.batch_sizes, self.capture_seconds)
        return self.capture_seconds
