// Attention of single query tokens over the paged KV cache, for the CPU (see paged_attention_cpu.py).
// Plain C ABI, called through ctypes; fp32 throughout. The math and the kernel live in
// kernels/paged_attention_cpu.h (shared with the whole-model decode forward, kernels/decode_cpu.cpp).
#include "paged_attention_cpu.h"

// q/out [T, H, D] contiguous: fills out[rows].
extern "C" int paged_attention_cpu(
    const float* q, float* out, int64_t H, int64_t HKV, int64_t D,
    const float* k_cache, const float* v_cache, int64_t BS,
    const int64_t* rows, const int64_t* row_seq, const int64_t* ctx_lens, int64_t N,
    const int64_t* block_tables, int64_t max_blocks, float scale, int64_t window, int nt) {
    return ms_attention::attend_rows(q, H * D, out, H * D, H, HKV, D, k_cache, v_cache, BS, rows, row_seq, ctx_lens,
                                     N, block_tables, max_blocks, scale, window, nt);
}
