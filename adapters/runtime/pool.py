"""The device slot pool: every resident bank's experts in one slot space, per (layer, target).

A bank with N experts occupies the consecutive slots ``[offset, offset + N)`` in *every* pooled
(layer, target), so a token's expert e is slot ``offset + e`` everywhere and one ``routed_lora``
call per linear serves all banks of a batch. Per (layer, target) the pool holds

    lora_a  [S, R, in]    model dtype (or the pool's storage dtype), zero beyond a bank's rank
    lora_b  [S, R, out]   contiguous; kernels get the transposed view [S, out, R]
    router  [S, in] fp32  one row per slot (an expert's router row), for per-linear mixtures

plus ``block_router [S, hidden]`` fp32 per layer (MixLoRA) and ``scaling [S]`` fp32. R is the
largest rank of any bank loaded so far (smaller ranks are zero-padded). S grows by doubling.

An int8 pool (``--bank-dtype int8``, CPU only) stores lora_a and lora_b as int8 with one fp32 scale
per row (``lora_a_scale``, ``lora_b_scale`` [S, R]: weight = value * its row's scale, symmetric,
rows over ``in`` for A and over ``out`` for B). ``route_lora`` and the general path's kernel
(``routed_lora_int8_cpu``) read them as they are (the scales fold into the rank-r intermediate);
without an AVX-512 build the general path dequantizes the slots a call uses. Where the kernel build
has the VNNI expand (``packs_int8``), the slots are stored in the kernel's packed order
(``pack_int8_a`` / ``pack_int8_b``: same shapes and bytes; ``PoolState.packed``): A's rank rows in
fours read as one stream, B in 16-column tiles for the expand; R is then a multiple of 4.

Tensors are swapped, never resized in place: a step holds the ``PoolState`` it was built with,
so growth while a step runs cannot move memory under it. Writes only touch free slots, which no
running step reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kernels.pairs import PairPlan
from kernels.routed_lora.cpu_ops import pack_int8_a, pack_int8_b, packs_int8, unpack_int8_a, unpack_int8_b
from server.model import ModelConfig

Site = tuple[int, str]  # (layer, target)


def linear_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of ``target`` in one decoder layer of ``cfg``."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[target]


@dataclass
class PackedBank:
    """A bank's tensors in the pool's layout, on the host, ready to copy into a slot range.

    linears: site -> (lora_a [n, r, in], lora_b [n, r, out] (transposed, contiguous), router [n, in] fp32 | None)
    blocks: layer -> block router [n, hidden] fp32 (MixLoRA)
    row_scales: site -> (lora_a's, lora_b's row scales [n, r] fp32) when lora_a / lora_b are int8
    """

    num_slots: int  # N: the most experts of any router in the bank
    rank: int
    scaling: float
    linears: dict[Site, tuple[Tensor, Tensor, Tensor | None]]
    blocks: dict[int, Tensor] = field(default_factory=dict)
    row_scales: dict[Site, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for a, b, r in self.linears.values() for t in (a, b, r) if t is not None)
        total += sum(t.numel() * t.element_size() for pair in self.row_scales.values() for t in pair)
        return total + sum(t.numel() * t.element_size() for t in self.blocks.values())


@dataclass(frozen=True)
class PoolState:
    """The pool's tensors at one moment (see the module docstring for shapes)."""

    capacity: int
    rank: int
    lora_a: dict[Site, Tensor]
    lora_b: dict[Site, Tensor]
    router: dict[Site, Tensor]
    block_router: dict[int, Tensor]
    scaling: Tensor
    lora_a_scale: dict[Site, Tensor] = field(default_factory=dict)  # int8 pools: row scales [S, R] fp32
    lora_b_scale: dict[Site, Tensor] = field(default_factory=dict)
    packed: bool = False  # int8 pools: lora_a's and lora_b's slots in pack_int8_a's / pack_int8_b's order
    # values derived from this state's tensors (the C++ decode path's argument tables); a new state
    # (growth, compaction) starts empty, installs into the same tensors keep it valid
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def lora_b_view(self, site: Site) -> Tensor:
        return self.lora_b[site].transpose(1, 2)

    def dequantized(self, site: Site, plan: PairPlan) -> tuple[Tensor, Tensor, Tensor, PairPlan]:
        """An int8 site's slots that ``plan`` uses, as fp32 (lora_a [G, R, in], lora_b [G, R, out],
        scaling [G]), and ``plan`` renumbered onto them: the general path's arguments, at the cost of
        the G slots a call reads, not of the pool."""
        used = plan.seg_slot
        a, b = self.lora_a[site][used], self.lora_b[site][used]
        if self.packed:
            a, b = unpack_int8_a(a), unpack_int8_b(b)
        a = a.float() * self.lora_a_scale[site][used].unsqueeze(-1)
        b = b.float() * self.lora_b_scale[site][used].unsqueeze(-1)
        remap = torch.full((self.capacity,), -1, dtype=torch.int64, device=used.device)
        remap[used] = torch.arange(used.numel(), device=used.device)
        slots = torch.where(plan.slots >= 0, remap[plan.slots.clamp(min=0)], plan.slots)
        return a, b, self.scaling[used], replace(plan, slots=slots, pair_slot=remap[plan.pair_slot],
                                                 seg_slot=torch.arange(used.numel(), device=used.device))


class SlotPool:
    """Slot ranges, allocation and the device tensors. Not thread-safe: the registry locks it."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        if dtype == torch.int8 and self.device.type != "cpu":
            raise ValueError("an int8 expert pool runs on the CPU only (route_lora reads int8 rows with their "
                             "scales); use --bank-dtype auto on this device")
        self.dtype = dtype
        self.int8 = dtype == torch.int8
        # int8 slots packed for the kernel: the build has its VNNI expand and every linear's in and out
        # are in 16-column tiles
        self.packed = self.int8 and packs_int8() and all(
            d % 16 == 0 for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            for d in linear_shape(cfg, t))
        self.state = self._empty()
        self._ranges: dict[int, int] = {}  # offset -> n of every allocated range

    def _empty(self) -> PoolState:
        return PoolState(0, 0, {}, {}, {}, {}, torch.zeros(0, device=self.device), packed=self.packed)

    def _rank(self, rank: int) -> int:
        """The pool's R for banks of rank up to ``rank``: a packed pool's rank rows go in fours."""
        return -(-rank // 4) * 4 if self.packed else rank

    # -- accounting ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.state.capacity

    @property
    def slots_used(self) -> int:
        return sum(self._ranges.values())

    def bytes_per_slot(self, rank: int | None = None, sites=(), routed=(), blocks=()) -> int:
        """Device bytes one slot costs with the pool's (plus the given extra) sites at ``rank``."""
        r = self._rank(self.state.rank if rank is None else rank)
        elem = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for site in set(self.state.lora_a) | set(sites):
            i, o = linear_shape(self.cfg, site[1])
            total += r * (i + o) * elem + (2 * r * 4 if self.int8 else 0)
        for site in set(self.state.router) | set(routed):
            total += linear_shape(self.cfg, site[1])[0] * 4
        total += len(set(self.state.block_router) | set(blocks)) * self.cfg.hidden_size * 4
        return total + 4

    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_slot()

    def bytes_with(self, packed: PackedBank, capacity: int) -> int:
        """Device bytes of the pool grown to hold ``packed`` at ``capacity`` slots."""
        routed = [s for s, (_, _, r) in packed.linears.items() if r is not None]
        per_slot = self.bytes_per_slot(max(self.state.rank, packed.rank), packed.linears, routed, packed.blocks)
        return capacity * per_slot

    # -- allocation ---------------------------------------------------------------------------

    def find(self, n: int) -> int | None:
        """Offset of the first free range of ``n`` slots within the current capacity, or None."""
        pos = 0
        for off in sorted(self._ranges):
            if off - pos >= n:
                return pos
            pos = off + self._ranges[off]
        return pos if self.capacity - pos >= n else None

    def end(self) -> int:
        """One past the last allocated slot."""
        return max((off + k for off, k in self._ranges.items()), default=0)

    def install(self, packed: PackedBank, offset: int, capacity: int | None = None) -> int:
        """Copy ``packed`` into the free range at ``offset`` (after growing to ``capacity`` slots
        and to its rank and sites); return the offset."""
        n = packed.num_slots
        self._reshape(packed, max(capacity or 0, self.capacity))
        assert offset + n <= self.capacity and all(
            off + k <= offset or offset + n <= off for off, k in self._ranges.items()), "slot range in use"
        st = self.state
        with torch.no_grad():
            for site, (a, b, router) in packed.linears.items():
                k, r = a.shape[0], a.shape[1]
                if st.packed:  # whole slots, zero beyond the bank's rank, in the packed order
                    for pool, w, pack in ((st.lora_a[site], a, pack_int8_a), (st.lora_b[site], b, pack_int8_b)):
                        full = torch.zeros_like(pool[offset:offset + k])
                        full[:, :r] = w
                        pool[offset:offset + k].copy_(pack(full))
                else:
                    st.lora_a[site][offset:offset + k, :r].copy_(a)
                    st.lora_b[site][offset:offset + k, :r].copy_(b)
                if self.int8:
                    sa, sb = packed.row_scales[site]
                    st.lora_a_scale[site][offset:offset + k, :r].copy_(sa)
                    st.lora_b_scale[site][offset:offset + k, :r].copy_(sb)
                if router is not None:
                    st.router[site][offset:offset + k].copy_(router)
            for layer, router in packed.blocks.items():
                st.block_router[layer][offset:offset + router.shape[0]].copy_(router)
            st.scaling[offset:offset + n] = packed.scaling
        self._ranges[offset] = n
        return offset

    def free(self, offset: int) -> None:
        """Release a range and zero it, so that a later bank with a smaller rank or fewer sites
        never reads stale weights."""
        n = self._ranges.pop(offset)
        st = self.state
        with torch.no_grad():
            for t in (*st.lora_a.values(), *st.lora_b.values(), *st.router.values(), *st.block_router.values(),
                      *st.lora_a_scale.values(), *st.lora_b_scale.values()):
                t[offset:offset + n].zero_()
            st.scaling[offset:offset + n] = 0

    def _reshape(self, packed: PackedBank, capacity: int) -> None:
        """Publish a new state with ``capacity`` slots, the larger rank and ``packed``'s sites."""
        st = self.state
        rank = self._rank(max(st.rank, packed.rank))
        new_sites = [s for s in packed.linears if s not in st.lora_a]
        new_routed = [s for s, (_, _, r) in packed.linears.items() if r is not None and s not in st.router]
        new_blocks = [b for b in packed.blocks if b not in st.block_router]
        if capacity == st.capacity and rank == st.rank and not (new_sites or new_routed or new_blocks):
            return
        dev, dt = self.device, self.dtype

        def grown(old: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, order=None) -> Tensor:
            if old is not None and tuple(old.shape) == shape:
                return old
            new = torch.zeros(shape, device=dev, dtype=dtype)
            if old is not None and order is not None and old.shape[1] != shape[1]:  # a packed slot's order
                pack, unpack = order                                                 # depends on R
                new[:old.shape[0], :old.shape[1]].copy_(unpack(old))
                return pack(new)
            if old is not None:
                new[tuple(slice(0, d) for d in old.shape)].copy_(old)
            return new

        lora_a, lora_b, router, block, a_scale, b_scale = {}, {}, {}, {}, {}, {}
        for site in [*st.lora_a, *new_sites]:
            i, o = linear_shape(self.cfg, site[1])
            lora_a[site] = grown(st.lora_a.get(site), (capacity, rank, i), dt,
                                 (pack_int8_a, unpack_int8_a) if st.packed else None)
            lora_b[site] = grown(st.lora_b.get(site), (capacity, rank, o), dt,
                                 (pack_int8_b, unpack_int8_b) if st.packed else None)
            if self.int8:
                a_scale[site] = grown(st.lora_a_scale.get(site), (capacity, rank), torch.float32)
                b_scale[site] = grown(st.lora_b_scale.get(site), (capacity, rank), torch.float32)
        for site in [*st.router, *new_routed]:
            router[site] = grown(st.router.get(site), (capacity, linear_shape(self.cfg, site[1])[0]), torch.float32)
        for layer in [*st.block_router, *new_blocks]:
            block[layer] = grown(st.block_router.get(layer), (capacity, self.cfg.hidden_size), torch.float32)
        self.state = replace(st, capacity=capacity, rank=rank, lora_a=lora_a, lora_b=lora_b, router=router,
                             block_router=block, scaling=grown(st.scaling, (capacity,), torch.float32),
                             lora_a_scale=a_scale, lora_b_scale=b_scale)

    def compact(self, keep: dict[int, PackedBank]) -> dict[int, int]:
        """Rebuild the pool holding only ``keep`` (offset -> packed) packed from slot 0; returns
        old offset -> new offset. Running steps keep the old tensors (states are swapped)."""
        self.state = self._empty()
        self._ranges = {}
        cap = sum(p.num_slots for p in keep.values())
        moved, pos = {}, 0
        for old, p in sorted(keep.items()):
            moved[old] = self.install(p, pos, cap)
            pos += p.num_slots
        return moved
