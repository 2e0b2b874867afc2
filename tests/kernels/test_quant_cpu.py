"""Our CPU weight-only int4 / int8 linear (kernels/quant_cpu.py, quant_cpu.cpp): equal to
F.linear(x, dequantize()) to fp32 rounding, every row bitwise independent of the batch and the
thread count, bias, the C entry point other C++ code calls, the portable (non-SIMD) build, and the
torch fallback when the library is off."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from kernels import quant_cpu
from server.model.quantization import Int4Weight, Int8Weight

pytestmark = pytest.mark.skipif(not quant_cpu.fast(), reason="quant_cpu library unavailable (no compiler) or without AVX-512")

ROWS = [1, 2, 7, 8, 33, 64]


def int4(n: int, k: int, group: int = 32, seed: int = 0) -> Int4Weight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return Int4Weight.quantize(w, group_size=group)


def int8(n: int, k: int, seed: int = 0) -> Int8Weight:
    return Int8Weight.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def assert_fp32_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    # fp32 rounding of a K-term sum: relative to sum |x| |w| per output
    scale = F.linear(x.double().abs(), w.double().abs())
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= 1e-5 * scale + 1e-6).all()


@pytest.mark.parametrize("n,k", [(48, 64), (200, 576), (48, 1536)])
@pytest.mark.parametrize("m", ROWS)
def test_int4_equals_its_dequantized_reference(n, k, m):
    q = int4(n, k, seed=n + k)
    assert q.cpu_kernel is not None and q.use_kernel and q.compute_dtype == torch.float32
    x = torch.randn(m, k)
    assert_fp32_close(q.linear(x), x, q.dequantize())


@pytest.mark.parametrize("group", [64, 128])
def test_int4_other_group_sizes(group):
    q = int4(200, 576 if group == 64 else 1536, group)
    x = torch.randn(9, q.in_features)
    assert_fp32_close(q.linear(x), x, q.dequantize())


@pytest.mark.parametrize("n,k", [(48, 64), (200, 576), (48, 1536)])
@pytest.mark.parametrize("m", ROWS)
def test_int8_equals_its_dequantized_reference(n, k, m):
    q = int8(n, k, seed=n * k)
    assert q.cpu_kernel is not None and q.use_kernel
    x = torch.randn(m, k)
    assert_fp32_close(q.linear(x), x, q.dequantize())


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (3072, 576)])  # SmolLM2-135M's q|k|v, down, gate|up
def test_smollm2_shapes(n, k):
    for q in (int4(n, k), int8(n, k)):
        for m in (1, 8, 33):
            x = torch.randn(m, k)
            assert_fp32_close(q.linear(x), x, q.dequantize())


@pytest.mark.parametrize("make", [int4, int8], ids=["int4", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_bitwise_independent_of_the_batch_and_the_threads(make, threads):
    q = make(200, 576)
    x = torch.randn(33, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        together = q.linear(x)
        alone = torch.cat([q.linear(x[i:i + 1]) for i in range(33)])  # the register schedule (M <= 4)
        pairs = torch.cat([q.linear(x[i:i + 3]) for i in range(0, 33, 3)])
        torch.set_num_threads(3 - threads)
        other_threads = q.linear(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, alone) and torch.equal(together, pairs) and torch.equal(together, other_threads)


@pytest.mark.parametrize("make", [int4, int8], ids=["int4", "int8"])
def test_bias(make):
    q = make(200, 64)
    bias = torch.randn(200)
    q.cpu_kernel.set_bias(bias)
    for m in (1, 9):
        x = torch.randn(m, 64)
        assert_fp32_close(q.cpu_kernel(x), x, q.dequantize(), bias)
        assert torch.equal(q.cpu_kernel(x)[:1], q.cpu_kernel(x[:1]))
    q.cpu_kernel.set_bias(None)
    x = torch.randn(2, 64)
    assert_fp32_close(q.cpu_kernel(x), x, q.dequantize())


def test_the_c_entry_point_through_a_function_pointer():
    """What another C++ kernel does: ms_qlinear(weight struct, x, M, y, threads) by address."""
    fn_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int)
    fn = fn_type(quant_cpu.qlinear_fn_address())
    for q in (int4(200, 576), int8(48, 64)):
        x = torch.randn(5, q.in_features)
        y = torch.empty(5, q.out_features)
        fn(q.c_handle, x.data_ptr(), 5, y.data_ptr(), 1)
        assert torch.equal(y, q.linear(x))


def test_a_deep_copy_owns_its_packed_weight():
    import copy

    q = int4(48, 64)
    q.cpu_kernel.set_bias(torch.ones(48))
    twin = copy.deepcopy(q)
    assert twin.c_handle != q.c_handle
    x = torch.randn(3, 64)
    want = q.cpu_kernel(x)
    del q
    assert torch.equal(twin.cpu_kernel(x), want)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_the_portable_build_computes_the_same(tmp_path):
    """quant_cpu.cpp without AVX-512 (the scalar path a machine without it builds)."""
    so = tmp_path / "quant_cpu_portable.so"
    subprocess.run(["g++", "-O2", "-mno-avx512f", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                    str(quant_cpu._SOURCE), "-o", str(so)], check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(so))
    assert lib.ms_qlinear_simd() == 0
    for name, fn in vars(quant_cpu.load_library()).items():  # the same signatures
        if name.startswith("ms_"):
            getattr(lib, name).argtypes, getattr(lib, name).restype = fn.argtypes, fn.restype
    q4, q8 = int4(40, 64), int8(40, 64)
    s, z = q4.scales.float().unbind(-1)
    portable = [quant_cpu.pack_int4(q4.codes, s.t(), z.t(), 32, lib=lib), quant_cpu.pack_int8(q8.codes, q8.scales, lib=lib)]
    x = torch.randn(7, 64)
    for p, q in zip(portable, (q4, q8)):
        got = p(x)
        assert_fp32_close(got, x, q.dequantize())
        assert torch.equal(got[3:4], p(x[3:4]))


def test_without_the_library_the_torch_kernels_serve(monkeypatch):
    monkeypatch.setenv("MOLESERVE_CPU_KERNEL", "0")
    quant_cpu.load_library.cache_clear()
    try:
        assert not quant_cpu.available() and not quant_cpu.fast() and quant_cpu.qlinear_fn_address() is None
        for q in (int4(48, 64), int8(48, 64)):
            assert q.cpu_kernel is None and q.c_handle is None and q.use_kernel
            assert q.compute_dtype == torch.bfloat16  # torch's CPU kernels take bf16
            x = torch.randn(3, 64)
            want = F.linear(x.bfloat16().float(), q.dequantize())
            torch.testing.assert_close(q.linear(x), want, rtol=2 ** -8, atol=1e-3 * want.abs().max().item())
    finally:
        monkeypatch.delenv("MOLESERVE_CPU_KERNEL")
        quant_cpu.load_library.cache_clear()
    assert quant_cpu.available()
