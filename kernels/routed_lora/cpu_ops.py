"""The fast CPU path of routed LoRA: a segmented shrink/expand over the pair plan.

    h[p]            = lora_a[s_p] @ x[t_p]                         (shrink, [P, r] fp32)
    out[t_p]       += weight_p * scaling[s_p] * lora_b[s_p] @ h[p]  (expand, [T, d_out] fp32)

for the pairs p of the plan, grouped by slot s so each expert's weights are read once per call.

Two implementations, chosen by measurement (BENCHMARKS.md, "Kernels"):
- a small C++ kernel (`cpu_kernel.cpp`, OpenMP, fp32/bf16/fp16 weights) compiled once with g++ and
  loaded through ctypes: one foreign call per routed linear, which is what decode steps need, where
  Python/ATen dispatch per op would cost more than the arithmetic;
- a per-segment loop of ATen matmuls, used for other weight dtypes and whenever the C++ kernel is
  unavailable (no compiler, build failure, or MOLESERVE_CPU_KERNEL=0).  Measured slower than the
  C++ kernel at decode (5-9x) and at prefill (2-4x), so it is only the fallback.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from kernels.cpp_build import load_cpp_library
from kernels.pairs import PairPlan, plan_from_slots
from kernels.routed_lora.torch_ops import scaling_vector

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's weight types
INT8 = 3  # route_lora only: int8 weights with per-row scales (RouteLoraSites a_scale / b_scale)
INT8_PACKED = 4  # INT8 with lora_a and lora_b in the kernel's packed order (pack_int8_a / _b; packs_int8 says when)


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The C++ kernel (compiled once, cached on disk; see kernels.cpp_build); None if unavailable."""
    lib = load_cpp_library(_SOURCE, "routed_lora")
    if lib is None:
        return None
    fn = lib.routed_lora_cpu
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, p, i64, i64, ctypes.c_int, p, p, p, ctypes.c_float,
                   p, p, p, i64, p, p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    bp = lib.build_plan
    bp.argtypes = [ctypes.c_int, p, i64, p, i64, i64, i64, p, p, p, p, p, p, p, p, p]
    bp.restype = ctypes.c_int
    f32 = ctypes.c_float
    dr = lib.dynamic_route
    dr.argtypes = [p, i64, i64, i64, p, i64, p, i64, p, i64, p, i64, f32, p, p]
    dr.restype = ctypes.c_int
    rp = lib.route_plan
    rp.argtypes = [p, i64, i64, i64, i64, p, i64, i64, p, p, i64, p, i64, p, i64, p, i64, f32, p, p, p, p, p,
                   ctypes.c_int]
    rp.restype = ctypes.c_int
    rl = lib.route_lora
    rl.argtypes = [p, p, i64, p, p]
    rl.restype = ctypes.c_int
    lib.route_lora_check.argtypes = [p, p]
    lib.route_lora_check.restype = ctypes.c_int
    q8 = lib.routed_lora_cpu_int8
    q8.argtypes = [p, i64, i64, p, p, i64, i64, p, p, p, p, p, ctypes.c_float, p, p, p, i64, p, p, ctypes.c_int,
                   ctypes.c_int]
    q8.restype = ctypes.c_int
    lib.route_lora_packs_b.argtypes = []
    lib.route_lora_packs_b.restype = ctypes.c_int
    return lib


def packs_int8() -> bool:
    """Whether this machine's kernel build reads an int8 pool packed (``pack_int8_a``, ``pack_int8_b``):
    an AVX-512 VNNI build, whose expand multiplies int8 B by the int8-quantized rank-r intermediate
    (vpdpbusd) instead of widening B to fp32. An int8 pool stores its slots packed when this holds."""
    lib = load_library()
    return lib is not None and lib.route_lora_packs_b() == 1


def pack_int8_a(a: Tensor) -> Tensor:
    """An int8 lora_a [k, r, d_in] (r % 4 == 0, d_in % 16 == 0) in the shrink's packed order, same shape:
    each slot's rank rows in groups of four, a group's four rows chunk by chunk,
    ``packed[g][i16][jj][c] = a[4 g + jj][16 i16 + c]``: a pass over four rank rows reads one stream."""
    k, r, d_in = a.shape
    return a.reshape(k, r // 4, 4, d_in // 16, 16).transpose(2, 3).contiguous().view(k, r, d_in)


def unpack_int8_a(a: Tensor) -> Tensor:
    """``pack_int8_a``'s inverse: lora_a [k, r, d_in] in row order."""
    k, r, d_in = a.shape
    return a.reshape(k, r // 4, d_in // 16, 4, 16).transpose(2, 3).reshape(k, r, d_in)


def pack_int8_b(b: Tensor) -> Tensor:
    """An int8 lora_b [k, r, d_out] (r % 4 == 0, d_out % 16 == 0) in the packed order of the VNNI expand,
    same shape: each slot's 16-column tiles in turn, a tile's rank rows in groups of four with a
    column's four values adjacent, ``packed[c16][g][c][jj] = b[4 g + jj][16 c16 + c]``."""
    k, r, d_out = b.shape
    return b.reshape(k, r // 4, 4, d_out // 16, 16).permute(0, 3, 1, 4, 2).contiguous().view(k, r, d_out)


def unpack_int8_b(b: Tensor) -> Tensor:
    """``pack_int8_b``'s inverse: lora_b [k, r, d_out] in row order."""
    k, r, d_out = b.shape
    return b.reshape(k, d_out // 16, r // 4, 16, 4).permute(0, 2, 4, 1, 3).reshape(k, r, d_out)


_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _RLSites(ctypes.Structure):  # cpu_kernel.cpp RLSites
    _fields_ = [("M", _I64), ("d_in", _I64), ("S", _I64), ("r", _I64), ("wtype", _I64), ("routers", _P), ("A", _P),
                ("B", _P), ("d_out", _P), ("col", _P), ("stat_row", _P), ("scale", _P), ("A_scale", _P),
                ("B_scale", _P)]


class _RLStep(ctypes.Structure):  # cpu_kernel.cpp RLStep
    _fields_ = [("T", _I64), ("n", _I64), ("offset", _P), ("top_p", _P), ("s_top_p", _I64), ("keep_k", _P),
                ("s_keep_k", _I64), ("thr", _P), ("s_thr", _I64), ("q", _P), ("s_q", _I64), ("eps", _F32),
                ("nt", ctypes.c_int32), ("sel", _P), ("acc", _P), ("esum", _P), ("edges", _P), ("n_edges", _I64),
                ("logits", _P), ("w", _P), ("ent", _P)]


def _param(v, t: int, keep: list) -> tuple[int, int]:
    """A routing parameter for the C++ calls: (address, stride) of one value or one per row."""
    if isinstance(v, Tensor) and v.dtype == torch.float32 and v.dim() == 1 and v.is_contiguous():
        a = v
    elif isinstance(v, Tensor):
        a = v.to(dtype=torch.float32).reshape(-1).contiguous()
    else:
        a = torch.tensor([float(v)])
    if a.numel() not in (1, t):
        raise ValueError(f"dynamic_route: a per-token parameter has {a.numel()} values for {t} tokens")
    keep.append(a)  # alive through the call
    return a.data_ptr(), int(a.numel() == t and t > 1)


def _params(t: int, keep: list, *values) -> list[int]:
    """The DynMoLE parameters (top_p, keep_top_k, entropy_threshold, q) as the C++ calls take them."""
    return [v for value in values for v in _param(value, t, keep)]


def _offsets(offset: Tensor) -> Tensor:
    return offset if offset.dtype == torch.int64 and offset.is_contiguous() else offset.long().contiguous()


def route_plan_cpu(x: Tensor, routers: tuple[Tensor, ...], offset: Tensor, num_experts: int, *, top_p, keep_top_k,
                   entropy_threshold, q, eps: float) -> tuple[Tensor, Tensor, Tensor, list[PairPlan]] | None:
    """DynMoLE routing and the pair plans of M sites sharing the input, in one C++ call.

    x [T, d_in] (CPU, no autograd); routers: M pooled routers [S, d_in] fp32 contiguous; offset [T]
    int64: each row's bank slot offset (-1: not routed here); each row is routed over the n =
    ``num_experts`` router rows of its own bank (the logits of ``x @ router.T`` read at
    offset..offset+n), as ``dynamic_route`` with the given parameters (scalars or [T] tensors).
    Returns (logits [M, T, n], weights [M, T, n], entropy [M, T], one plan per router, as
    ``build_plan_cpu``'s dense mode), or None when the library or the shapes do not allow it.
    """
    lib = load_library()
    n, m = num_experts, len(routers)
    if lib is None or not 1 <= n <= 64 or x.dim() != 2 or x.device.type != "cpu":
        return None
    t, d_in = x.shape
    s = routers[0].shape[0]
    if any(r.dtype != torch.float32 or not r.is_contiguous() or r.shape != (s, d_in) for r in routers):
        return None
    xf = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.float().contiguous()
    keep: list = []
    args = _params(t, keep, top_p, keep_top_k, entropy_threshold, q)
    offs = _offsets(offset)
    addrs = torch.tensor([r.data_ptr() for r in routers], dtype=torch.int64)
    tn = t * n
    blk = 3 * tn + 3 * s + 3
    fb = torch.empty(m * (4 * tn + t), dtype=torch.float32)  # logits, w, fbuf [M, 2Tn], ent
    logits, w = fb[:m * tn].view(m, t, n), fb[m * tn:2 * m * tn].view(m, t, n)
    fbuf, ent = fb[2 * m * tn:4 * m * tn].view(m, 2 * tn), fb[4 * m * tn:].view(m, t)
    ibuf = torch.empty(m, blk, dtype=torch.int64)
    rc = lib.route_plan(xf.data_ptr(), xf.stride(0), t, d_in, m, addrs.data_ptr(), s, n, offs.data_ptr(), *args,
                        float(eps), logits.data_ptr(), w.data_ptr(), ent.data_ptr(), ibuf.data_ptr(),
                        fbuf.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"route_plan failed with code {rc}")
    plans = []
    seg = 3 * tn
    for i, (p, g, mx) in enumerate(ibuf[:, blk - 3:].tolist()):
        ib, fi = ibuf[i], fbuf[i]
        plans.append(PairPlan(slots=ib[2 * tn:seg].view(t, n), weights=fi[tn:].view(t, n), pair_token=ib[:p],
                              pair_slot=ib[tn:tn + p], pair_weight=fi[:p], seg_slot=ib[seg:seg + g],
                              seg_start=ib[seg + s:seg + s + g], seg_len=ib[seg + 2 * s:seg + 2 * s + g],
                              max_seg_len=mx))
    return logits, w, ent, plans


class RouteLoraSites:
    """The constant arguments of ``route_lora`` for M sites sharing an input: their pooled routers
    [S, d_in] fp32 (None: plain LoRA sites, each row's one slot with weight 1), lora_a [S, r, d_in]
    and lora_b stored [S, r, d_out] (fp32, bf16 or fp16; or int8 with ``a_scale`` / ``b_scale``, each
    site's row scales [S, r] fp32: weight = int8 value * its row's scale; ``packed``: int8 lora_a and
    lora_b in ``pack_int8_a``'s / ``pack_int8_b``'s order), scaling [S] fp32, each
    site's first column in the output and its row in the step's selection counts
    (``RouteLoraStats``). Built once per pool state and cached (adapters.runtime.step)."""

    def __init__(self, routers, lora_a, lora_b_rows, scaling: Tensor, cols: list[int], stat_rows: list[int] | None = None,
                 a_scale=None, b_scale=None, packed: bool = False):
        self.m = len(lora_a)
        self.plain = routers is None
        self.num_slots, self.rank, self.d_in = lora_a[0].shape
        int8 = lora_a[0].dtype == torch.int8
        self.wtype = (INT8_PACKED if packed else INT8) if int8 else WTYPES.get(lora_a[0].dtype, -1)
        self.d_out = [b.shape[2] for b in lora_b_rows]
        self.stat_rows = list(stat_rows) if stat_rows is not None else [0] * self.m
        addr = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
        self._tables = (None if self.plain else addr(routers), addr(lora_a), addr(lora_b_rows),
                        torch.tensor(self.d_out, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64),
                        torch.tensor(self.stat_rows, dtype=torch.int64),
                        addr(a_scale) if int8 and a_scale is not None else None,
                        addr(b_scale) if int8 and b_scale is not None else None)
        self.keep = (routers, lora_a, lora_b_rows, scaling, a_scale, b_scale)  # the addresses above stay valid
        row_scales = (not int8 or (a_scale is not None and b_scale is not None and all(
            sc.dtype == torch.float32 and sc.is_contiguous() and sc.shape == (self.num_slots, self.rank)
            for sc in (*a_scale, *b_scale))))
        self.ok = ((self.plain or all(r.dtype == torch.float32 and r.is_contiguous()
                                      and r.shape == (self.num_slots, self.d_in) for r in routers))
                   and all((a.dtype in WTYPES or a.dtype == torch.int8) and a.dtype == b.dtype and a.is_contiguous()
                           and b.is_contiguous() and a.shape[2] == self.d_in and a.shape[1] == self.rank
                           and b.shape[1] == self.rank and a.shape[0] == b.shape[0] == self.num_slots
                           for a, b in zip(lora_a, lora_b_rows))
                   and row_scales
                   and scaling.dtype == torch.float32 and scaling.is_contiguous() and scaling.numel() == self.num_slots)
        t = self._tables
        self.struct = _RLSites(self.m, self.d_in, self.num_slots, self.rank, self.wtype,
                               None if self.plain else t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr(),
                               t[3].data_ptr(), t[4].data_ptr(), t[5].data_ptr(), scaling.data_ptr(),
                               t[6].data_ptr() if t[6] is not None else None,
                               t[7].data_ptr() if t[7] is not None else None)
        self.addr = ctypes.addressof(self.struct)


STAT_WIDTH = 2 + 65  # RouteLoraStats.acc columns before the entropy buckets


class RouteLoraStats:
    """One step's routing statistics, accumulated by the ``route_lora`` calls (cpu_kernel.cpp RLStep):
    ``sel [rows, S]``: decisions that selected each pool slot, one row per site; per bank slot offset
    o, ``acc[o]`` = (decisions, broadcasts, decisions by experts used 0..64, decisions by normalised
    Shannon entropy bucket) and ``esum[o]`` the entropies' sum."""

    def __init__(self, rows: int, num_slots: int, edges: tuple[float, ...]):
        self.num_slots, self.edges = num_slots, torch.tensor(edges, dtype=torch.float32)
        self.width = STAT_WIDTH + len(edges) + 1
        self.sel = torch.zeros(rows, num_slots, dtype=torch.int64)
        self.acc = torch.zeros(num_slots, self.width, dtype=torch.int64)
        self.esum = torch.zeros(num_slots, dtype=torch.float64)


class RouteLoraStep:
    """One step's routing group for ``route_lora``: T rows' bank slot offsets ([T] int64, -1: not
    routed by this group), the number of experts n, the DynMoLE parameters (scalars or [T] tensors)
    and where the statistics go (None: nowhere). Built once per step and group; ``__call__`` runs
    one routed linear."""

    def __init__(self, offset: Tensor, num_experts: int, *, top_p, keep_top_k, entropy_threshold, q, eps: float,
                 stats: RouteLoraStats | None = None, outputs: tuple[Tensor, Tensor, Tensor] | None = None):
        t = offset.shape[0]
        self.t, self.n = t, num_experts
        self.keep: list = [_offsets(offset), stats, outputs]
        prm = _params(t, self.keep, top_p, keep_top_k, entropy_threshold, q)
        st = stats
        out = outputs or (None, None, None)
        self.struct = _RLStep(t, num_experts, self.keep[0].data_ptr(), *prm, float(eps), torch.get_num_threads(),
                              st.sel.data_ptr() if st else None, st.acc.data_ptr() if st else None,
                              st.esum.data_ptr() if st else None, st.edges.data_ptr() if st else None,
                              st.edges.numel() if st else 0, *(o.data_ptr() if o is not None else None for o in out))
        self.addr = ctypes.addressof(self.struct)
        self.lib = load_library()

    def c_hook(self, sites: RouteLoraSites) -> tuple[int, int, int] | None:
        """(address of ``route_lora``, ``sites``' and this group's struct addresses): the call as a C
        caller makes it, ``route_lora(x, out, ld, sites, step)`` on x [T, sites.d_in] fp32 contiguous
        (the fused decode forward's per-linear hook); None when ``__call__`` would not run it (the
        caller must then take its Python path: a C caller cannot fall back after the call)."""
        if (self.lib is None or not sites.ok or not 1 <= self.n <= 64
                or self.lib.route_lora_check(sites.addr, self.addr) != 0):
            return None
        return ctypes.cast(self.lib.route_lora, ctypes.c_void_p).value, sites.addr, self.addr

    def __call__(self, x: Tensor, sites: RouteLoraSites, out: Tensor) -> bool:
        """out[:, cols of each site] += the sites' routed LoRA of x [T, d_in] (fp32, contiguous; out fp32
        with unit column stride). False (nothing done) when the library or the shapes do not allow it."""
        if (self.lib is None or not sites.ok or not 1 <= self.n <= 64 or x.dtype != torch.float32 or x.dim() != 2
                or not x.is_contiguous() or x.device.type != "cpu" or x.shape != (self.t, sites.d_in)
                or out.dtype != torch.float32 or out.stride(1) != 1 or out.shape[0] != self.t):
            return False
        rc = self.lib.route_lora(x.data_ptr(), out.data_ptr(), out.stride(0), sites.addr, self.addr)
        if rc == 4:
            return False
        if rc != 0:
            raise RuntimeError(f"route_lora failed with code {rc}")
        return True


def dynamic_route_cpu(logits: Tensor, top_p, keep_top_k, entropy_threshold, q, eps: float
                      ) -> tuple[Tensor, Tensor] | None:
    """``kernels.routing.dynamic_route`` in one C++ call (fp32 CPU logits [T, n], n <= 64, no autograd);
    None when it does not apply (the caller then runs the torch ops)."""
    lib = load_library()
    if lib is None or logits.dim() != 2 or logits.shape[1] > 64 or logits.shape[1] < 1:
        return None
    x = logits.float()
    if x.stride(1) != 1:
        x = x.contiguous()
    t, n = x.shape
    keep: list = []
    args = _params(t, keep, top_p, keep_top_k, entropy_threshold, q)
    w = torch.empty(t, n, dtype=torch.float32)
    ent = torch.empty(t, dtype=torch.float32)
    if t and lib.dynamic_route(x.data_ptr(), x.stride(0), t, n, *args, float(eps), w.data_ptr(), ent.data_ptr()):
        return None
    return w, ent


def build_plan_cpu(weights: Tensor, bank_offset: Tensor | None, num_slots: int, *,
                   slots: Tensor | None = None) -> PairPlan | None:
    """The pair plan in one C++ call (None when the library is unavailable: use `kernels.pairs`).

    Dense mode (``slots`` None): ``weights [T, n]`` fp32 dense routing weights (row stride may
    differ from n) and ``bank_offset [T]`` int64 (-1 = no bank) -> the plan of `plan_from_dense`,
    except that its ``slots``/``weights`` are [T, n] (-1 / 0 padded) rather than [T, max pairs].
    Slots mode: ``slots``/``weights [T, K]`` -> exactly `plan_from_slots`. All slots < num_slots.
    """
    lib = load_library()
    if lib is None or weights.device.type != "cpu":
        return None
    t, n = weights.shape
    dense = slots is None
    w = weights if weights.dtype == torch.float32 else weights.float()
    if w.stride(1) != 1:
        w = w.contiguous()
    ibuf = torch.empty(4 * t * n + 3 * num_slots + 3 if dense else 3 * t * n + 3 * num_slots + 3, dtype=torch.int64)
    fbuf = torch.empty((2 if dense else 1) * t * n, dtype=torch.float32)
    tn = t * n
    if dense:
        offs = bank_offset if bank_offset.dtype == torch.int64 else bank_offset.long()
        offs = offs.contiguous()
        sl, wk = ibuf[2 * tn + 3 * num_slots: 3 * tn + 3 * num_slots], fbuf[tn:]
    else:
        sl = slots.reshape(-1) if slots.dtype == torch.int64 and slots.is_contiguous() else slots.long().contiguous().reshape(-1)
        wk = w.contiguous().reshape(-1)
        offs = None
    seg = ibuf[2 * tn: 2 * tn + 3 * num_slots]
    counts = ibuf[ibuf.numel() - 3:]
    rc = lib.build_plan(int(dense), w.data_ptr() if dense else None, w.stride(0) if dense else 0,
                        offs.data_ptr() if dense else None, t, n, num_slots, sl.data_ptr(), wk.data_ptr(),
                        ibuf.data_ptr(), ibuf[tn:].data_ptr(), fbuf.data_ptr(), seg.data_ptr(),
                        seg[num_slots:].data_ptr(), seg[2 * num_slots:].data_ptr(), counts.data_ptr())
    if rc != 0:
        raise RuntimeError(f"build_plan failed with code {rc}")
    p, g, m = counts.tolist()
    return PairPlan(slots=sl.view(t, n), weights=wk.view(t, n), pair_token=ibuf[:p], pair_slot=ibuf[tn: tn + p],
                    pair_weight=fbuf[:p], seg_slot=seg[:g], seg_start=seg[num_slots: num_slots + g],
                    seg_len=seg[2 * num_slots: 2 * num_slots + g], max_seg_len=m)


def routed_lora_cpu(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    weights: Tensor,
    scaling: float | Tensor,
    *,
    plan: PairPlan | None = None,
) -> Tensor:
    """Same contract as `routed_lora_torch`; CPU tensors.  Uses `plan` when given (it must describe
    `slots`/`weights`), otherwise builds it."""
    if plan is None:
        plan = plan_from_slots(slots, weights)
    lib = load_library()
    if (
        lib is None
        or lora_a.dtype not in WTYPES
        or lora_b.dtype != lora_a.dtype
        or not lora_a.is_contiguous()
        or not (lora_b.is_contiguous() or lora_b.transpose(1, 2).is_contiguous())
    ):
        return segment_loop(x, lora_a, lora_b, plan, scaling)
    return _call_kernel(lib, x, lora_a, lora_b, plan, scaling)


def _call_kernel(lib, x, lora_a, lora_b, plan: PairPlan, scaling) -> Tensor:
    t, d_in = x.shape
    _, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    xf = x.float().contiguous()
    if isinstance(scaling, Tensor):
        scale = scaling.float().contiguous()
        scale_ptr, scale_scalar = scale.data_ptr(), 0.0
    else:
        scale_ptr, scale_scalar = None, float(scaling)
    h = torch.empty(plan.num_pairs, r, dtype=torch.float32)
    out = torch.empty(t, d_out, dtype=torch.float32)
    rc = lib.routed_lora_cpu(
        xf.data_ptr(), t, d_in, lora_a.data_ptr(), lora_b.data_ptr(), r, d_out,
        WTYPES[lora_a.dtype],
        plan.pair_token.data_ptr(), plan.pair_weight.data_ptr(), scale_ptr, scale_scalar,
        plan.seg_slot.data_ptr(), plan.seg_start.data_ptr(), plan.seg_len.data_ptr(),
        plan.num_segments, h.data_ptr(), out.data_ptr(), int(not lora_b.is_contiguous()),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"routed_lora_cpu kernel failed with code {rc}")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def routed_lora_int8_cpu(x: Tensor, lora_a: Tensor, a_scale: Tensor, lora_b: Tensor, b_scale: Tensor,
                         plan: PairPlan, scaling: Tensor, packed: bool = False) -> Tensor | None:
    """`routed_lora_cpu` on an int8 pool's site as stored: lora_a [S, r, d_in] and lora_b [S, r, d_out]
    int8 with row scales a_scale, b_scale [S, r] fp32 (weight = value * its row's scale), scaling [S];
    the routed delta [T, d_out] fp32 (``packed``: lora_a and lora_b in ``pack_int8_a``'s / ``pack_int8_b``'s
    order). None when the kernel does not take it (no AVX-512 build, shapes not multiples of 16, a packed
    pool without a VNNI build): the caller then dequantizes the slots it uses."""
    lib = load_library()
    if (lib is None or lora_a.dtype != torch.int8 or lora_b.dtype != torch.int8 or not lora_a.is_contiguous()
            or not lora_b.is_contiguous() or a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32
            or not a_scale.is_contiguous() or not b_scale.is_contiguous() or x.device.type != "cpu"):
        return None
    t, d_in = x.shape
    r, d_out = lora_a.shape[1], lora_b.shape[2]
    xf = x.float().contiguous()
    scale = scaling.float().contiguous()
    h = torch.empty(plan.num_pairs, r, dtype=torch.float32)
    out = torch.empty(t, d_out, dtype=torch.float32)
    rc = lib.routed_lora_cpu_int8(
        xf.data_ptr(), t, d_in, lora_a.data_ptr(), lora_b.data_ptr(), r, d_out, a_scale.data_ptr(),
        b_scale.data_ptr(), plan.pair_token.data_ptr(), plan.pair_weight.data_ptr(), scale.data_ptr(), 0.0,
        plan.seg_slot.data_ptr(), plan.seg_start.data_ptr(), plan.seg_len.data_ptr(), plan.num_segments,
        h.data_ptr(), out.data_ptr(), int(packed), torch.get_num_threads())
    if rc != 0:
        return None
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def segment_loop(x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: PairPlan, scaling) -> Tensor:
    """One gather + two GEMMs + one scatter-add per segment (slot).  Any dtype, any device."""
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)
    xs = x.index_select(0, plan.pair_token).float()  # [P, d_in], rows in slot order
    coef = plan.pair_weight * scale[plan.pair_slot]  # [P]
    ys = torch.empty(plan.num_pairs, lora_b.shape[1], dtype=torch.float32, device=x.device)
    starts, lens, segs = plan.seg_start.tolist(), plan.seg_len.tolist(), plan.seg_slot.tolist()
    for s, p0, n in zip(segs, starts, lens):
        h = xs[p0 : p0 + n] @ lora_a[s].float().t()  # [n, r]
        h.mul_(coef[p0 : p0 + n, None])
        torch.mm(h, lora_b[s].float().t(), out=ys[p0 : p0 + n])
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, plan.pair_token, ys)
    return out.to(x.dtype)
