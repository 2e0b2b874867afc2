// A whole Llama-family decoder forward for a decode step, in one call (see server/model/fused_decode.py).
// Plain C ABI, called through ctypes; fp32 activations throughout.
//
// M rows, each one new token of its own sequence. h [M, hidden] holds the token embeddings on entry
// and the final normed hidden states on return. Per layer:
//
//   x = rms_norm(h) * norm1;  qkv = qkv_linear(x) (+ bias);  RoPE (rotate-half) on q's and k's heads
//   with cos/sin [M, D];  k, v -> the paged cache at slot_mapping[r];  a = paged decode attention of
//   q over each row's context (kernels/paged_attention_cpu.h, the kernel the Python path calls);
//   h += o_linear(a) (+ bias);  x = rms_norm(h) * norm2;  [g | u] = gate_up_linear(x) (+ bias);
//   h += down_linear(silu(g) * u) (+ bias)
//
// then h = rms_norm(h) * final_norm. Every linear is a (function, weight handle) pair, so any
// weight format with a C kernel plugs in:
//
//   y [M, N] = x [M, K] @ W^T    fn(weight, x, M, y, nthreads)
//
// This file's own ms_f32linear serves a plain fp32 W [N, K] (handle: MsF32Weight).
//
// A step with bank rows passes one optional hook per linear (hooks [num_layers * 4]: qkv, o, gate_up,
// down of each layer; fn null: none), called right after the linear and its bias, as the Python
// path's TargetLinear.forward calls the step's adapters after its base:
//
//   out [M, ld] += the step's bank deltas of x [M, in]    fn(x, out, ld, a, b), 0 on success
//
// kernels/routed_lora/cpu_kernel.cpp's route_lora is one (a: its sites, b: the step's routing group).
// Elementwise work runs on the calling thread (it is ~1% of a step); GEMMs and attention use nthreads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paged_attention_cpu.h"

extern "C" {

typedef void (*ms_linear_fn)(const void* weight, const float* x, int64_t M, float* y, int nthreads);

typedef int (*ms_hook_fn)(const float* x, float* out, int64_t ld, const void* a, const void* b);

struct MsHook {
    ms_hook_fn fn;  // null: no adapter work on this linear this step
    const void* a;
    const void* b;
};

struct MsLinear {
    ms_linear_fn fn;
    const void* weight;  // the handle fn reads
    const float* bias;   // [out] or null
    int64_t out;         // N
};

struct MsLayer {
    const float* norm1;  // input_layernorm [hidden]
    const float* norm2;  // post_attention_layernorm [hidden]
    MsLinear qkv, o, gate_up, down;
};

struct MsModel {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
    const float* final_norm;  // [hidden]
    const MsLayer* layers;    // [num_layers]
};

struct MsF32Weight {
    const float* w;  // [n, k] row-major
    int64_t n, k;
};

}  // extern "C"

namespace {

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w
void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t n, float eps) {
    for (int64_t r = 0; r < M; ++r) {
        const float* xr = x + r * n;
        float* yr = y + r * n;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * w[i];
    }
}

// y = x @ W^T (+ bias), then the hook's deltas (hook null or its fn null: none); false when the hook failed.
bool linear(const MsLinear& l, const float* x, int64_t M, float* y, int nt, const MsHook* hook) {
    l.fn(l.weight, x, M, y, nt);
    if (l.bias != nullptr)
        for (int64_t r = 0; r < M; ++r) {
            float* yr = y + r * l.out;
#pragma omp simd
            for (int64_t i = 0; i < l.out; ++i) yr[i] += l.bias[i];
        }
    return hook == nullptr || hook->fn == nullptr || hook->fn(x, y, l.out, hook->a, hook->b) == 0;
}

// x [nh heads of D] of one row, rotated in place: x1' = x1 c1 - x2 s1, x2' = x2 c2 + x1 s2 (halves 1, 2).
void rope(float* x, int64_t nh, int64_t D, const float* cos, const float* sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < nh; ++h) {
        float* xh = x + h * D;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
            const float a = xh[d], b = xh[d + half];
            xh[d] = a * cos[d] - b * sin[d];
            xh[d + half] = b * cos[d + half] + a * sin[d + half];
        }
    }
}

// The step's intermediate buffers, per calling thread, grown as needed and kept across calls.
struct Buffers {
    std::vector<float> x, qkv, attn, gu, act, tmp;
    void fit(const MsModel& m, int64_t M) {
        const int64_t q = m.heads * m.head_dim, kv = m.kv_heads * m.head_dim;
        x.resize(M * m.hidden);
        qkv.resize(M * (q + 2 * kv));
        attn.resize(M * q);
        gu.resize(M * 2 * m.intermediate);
        act.resize(M * m.intermediate);
        tmp.resize(M * m.hidden);
    }
};

#if defined(__AVX512F__)
constexpr int V = 16;
#else
constexpr int V = 8;
#endif
typedef float vf __attribute__((vector_size(V * 4), aligned(4)));  // unaligned loads allowed

// y[i, j] (i < MM rows of x, j < nn of the 4 weight rows w) = x[i] . w[j]; rows of y ldy apart.
template <int MM>
inline void f32_tile(const float* const* w, int64_t nn, const float* x, int64_t K, float* y, int64_t ldy) {
    const int64_t Kv = K / V * V;
    vf acc[MM][4] = {};
    for (int64_t k = 0; k < Kv; k += V) {
        vf wv[4];
        for (int j = 0; j < 4; ++j) wv[j] = *reinterpret_cast<const vf*>(w[j] + k);
        for (int i = 0; i < MM; ++i) {
            const vf xv = *reinterpret_cast<const vf*>(x + i * K + k);
            for (int j = 0; j < 4; ++j) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < MM; ++i)
        for (int64_t j = 0; j < nn; ++j) {
            float s = 0.f;
            for (int l = 0; l < V; ++l) s += acc[i][j][l];
            for (int64_t k = Kv; k < K; ++k) s += x[i * K + k] * w[j][k];
            y[i * ldy + j] = s;
        }
}

}  // namespace

extern "C" {

// The decoder stack over M decode rows (see the top of the file). k_cache / v_cache: every layer's
// cache [num_layers, num_blocks, BS, HKV, D] (fp32, contiguous); slot_mapping [M]: each row's flat
// cache slot; rows / row_seq / ctx_lens [M]: the attention's decode rows (as paged_attention_cpu):
// flat row, its sequence's row of block_tables [S, max_blocks], its context length (position + 1).
// hooks: null, or [num_layers * 4] adapter calls (see the top of the file).
// Returns 0, 1 when the shapes do not fit, 2 when a hook failed (h and the cache then hold a partial step).
int ms_decode_forward(const MsModel* model, float* h, int64_t M, const float* cos, const float* sin,
                      float* k_cache, float* v_cache, int64_t num_blocks, int64_t BS, const int64_t* slot_mapping,
                      const int64_t* rows, const int64_t* row_seq, const int64_t* ctx_lens,
                      const int64_t* block_tables, int64_t max_blocks, int64_t window, const MsHook* hooks, int nt) {
    const MsModel& m = *model;
    const int64_t H = m.heads, HKV = m.kv_heads, D = m.head_dim, hid = m.hidden, I = m.intermediate;
    const int64_t q_size = H * D, kv_size = HKV * D, qkv_size = q_size + 2 * kv_size;
    if (H % HKV != 0 || D % 2 != 0 || M <= 0) return 1;
    static thread_local Buffers buf;
    buf.fit(m, M);
    float *x = buf.x.data(), *qkv = buf.qkv.data(), *attn = buf.attn.data(), *gu = buf.gu.data(),
          *act = buf.act.data(), *tmp = buf.tmp.data();
    const int64_t layer_stride = num_blocks * BS * kv_size;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    for (int64_t li = 0; li < m.num_layers; ++li) {
        const MsLayer& L = m.layers[li];
        const MsHook* hk = hooks != nullptr ? hooks + 4 * li : nullptr;
        const auto hook = [hk](int j) { return hk != nullptr ? hk + j : nullptr; };
        float* kc = k_cache + li * layer_stride;
        float* vc = v_cache + li * layer_stride;
        rms_norm(h, L.norm1, x, M, hid, m.eps);
        if (!linear(L.qkv, x, M, qkv, nt, hook(0))) return 2;
        for (int64_t r = 0; r < M; ++r) {
            float* row = qkv + r * qkv_size;
            rope(row, H + HKV, D, cos + r * D, sin + r * D);  // q's heads then k's, contiguous
            const int64_t slot = slot_mapping[r];
            std::copy(row + q_size, row + q_size + kv_size, kc + slot * kv_size);
            std::copy(row + q_size + kv_size, row + qkv_size, vc + slot * kv_size);
        }
        if (ms_attention::attend_rows(qkv, qkv_size, attn, q_size, H, HKV, D, kc, vc, BS, rows, row_seq, ctx_lens,
                                      M, block_tables, max_blocks, scale, window, nt) != 0)
            return 1;
        if (!linear(L.o, attn, M, tmp, nt, hook(1))) return 2;
        for (int64_t i = 0; i < M * hid; ++i) h[i] += tmp[i];
        rms_norm(h, L.norm2, x, M, hid, m.eps);
        if (!linear(L.gate_up, x, M, gu, nt, hook(2))) return 2;
        for (int64_t r = 0; r < M; ++r) {
            const float* g = gu + r * 2 * I;
            const float* u = g + I;
            float* a = act + r * I;
            for (int64_t i = 0; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
        }
        if (!linear(L.down, act, M, tmp, nt, hook(3))) return 2;
        for (int64_t i = 0; i < M * hid; ++i) h[i] += tmp[i];
    }
    rms_norm(h, m.final_norm, h, M, hid, m.eps);
    return 0;
}

// y [M, n] = x [M, k] @ W^T for a plain fp32 W [n, k] (weight: an MsF32Weight). Threads take W's
// rows in tiles of 4, 8 tiles at a time in turn (as quant_cpu.cpp's blocks); each tile is read once
// from memory and, from L1, multiplied with the rows of x up to 4 at a time: up to 16 dot products in
// vector registers, summed across lanes at the end.
void ms_f32linear(const void* weight, const float* x, int64_t M, float* y, int nt) {
    const MsF32Weight& W = *static_cast<const MsF32Weight*>(weight);
    const int64_t N = W.n, K = W.k;
    const int64_t tiles = (N + 3) / 4;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 8)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * 4, nn = std::min<int64_t>(4, N - n0);
        const float* w[4];
        for (int j = 0; j < 4; ++j) w[j] = W.w + (n0 + std::min<int64_t>(j, nn - 1)) * K;  // short tile: repeat
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) f32_tile<4>(w, nn, x + m0 * K, K, y + m0 * N + n0, N);
        switch (M - m0) {
            case 3: f32_tile<3>(w, nn, x + m0 * K, K, y + m0 * N + n0, N); break;
            case 2: f32_tile<2>(w, nn, x + m0 * K, K, y + m0 * N + n0, N); break;
            case 1: f32_tile<1>(w, nn, x + m0 * K, K, y + m0 * N + n0, N); break;
            default: break;
        }
    }
}

}  // extern "C"
