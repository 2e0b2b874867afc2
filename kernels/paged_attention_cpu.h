// Paged decode attention over the KV cache, shared by the kernels that need it (included, not
// linked): server/engine/paged_attention_cpu.cpp (one call per layer) and kernels/decode_cpu.cpp
// (the whole-model decode forward). fp32 throughout.
//
//   out[r, h, :] = sum_{p in window(r)} softmax_p(scale * q[r, h, :] . K[s, p, h / G, :]) V[s, p, h / G, :]
//
// for every row r in `rows`, where s = row_seq[i] picks the sequence's block table, p runs over the
// positions lo..ctx_len-1 of that sequence (lo = max(0, ctx_len - window) when window > 0), and K/V
// of position p live in cache block block_table[s, p / BS] at offset p % BS. Cache layout:
// [num_blocks, BS, HKV, D]. Each (row, kv head) pair's G query heads share every K/V row load.
//
// With AVX2+FMA (and D % 8 == 0, D <= 512, G <= 8) the three phases are vectorised: scores for 8
// positions at a time (8 independent FMA chains, one transposing horizontal sum), a vector exp,
// and the weighted sum of whole V rows, two rows per pass over the G x D accumulator.
// Otherwise a portable scalar loop computes the same thing.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MS_AVX2 1
#endif

namespace ms_attention {

struct Task {
    const float* qg;        // G query heads, D floats each
    float* out;             // G output heads
    const float* k_cache;
    const float* v_cache;
    const int64_t* bt;      // this sequence's block table
    int64_t BS, row_stride, kvh_off, lo, ctx, G, D;
    float scale;
};

// kp[j] / vp[j]: this head's K / V row of position lo + j, walking the block table once (no
// division per access: a 64-bit divide costs more than the row's dot product).
inline void row_ptrs(const Task& t, std::vector<const float*>& kp, std::vector<const float*>& vp) {
    const int64_t n = t.ctx - t.lo;
    kp.resize(n);
    vp.resize(n);
    int64_t p = t.lo;
    while (p < t.ctx) {
        const int64_t base = t.bt[p / t.BS] * t.BS;
        for (int64_t off = p % t.BS; off < t.BS && p < t.ctx; ++off, ++p) {
            const int64_t at = (base + off) * t.row_stride + t.kvh_off;
            kp[p - t.lo] = t.k_cache + at;
            vp[p - t.lo] = t.v_cache + at;
        }
    }
}

struct Scratch {
    std::vector<float> scores;
    std::vector<const float*> kp, vp;
};

inline void attend_scalar(const Task& t, Scratch& s) {
    const int64_t n = t.ctx - t.lo, G = t.G, D = t.D;
    row_ptrs(t, s.kp, s.vp);
    std::vector<float>& scores = s.scores;
    scores.resize(G * n);
    for (int64_t p = t.lo; p < t.ctx; ++p) {
        const float* k = s.kp[p - t.lo];
        for (int64_t g = 0; g < G; ++g) {
            const float* qv = t.qg + g * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qv[d] * k[d];
            scores[g * n + (p - t.lo)] = s * t.scale;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            sg[j] = std::exp(sg[j] - m);
            sum += sg[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
    }
    std::fill(t.out, t.out + G * D, 0.f);
    for (int64_t p = t.lo; p < t.ctx; ++p) {
        const float* v = s.vp[p - t.lo];
        for (int64_t g = 0; g < G; ++g) {
            const float w = scores[g * n + (p - t.lo)];
            float* a = t.out + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
    }
}

#ifdef MS_AVX2
// [sum(a0), ..., sum(a7)]
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (scores minus their max), Cephes' expf: ~1 ulp on [-87, 0]; below that, ~0.
inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline void attend_avx2(const Task& t, Scratch& sc) {
    const int64_t n = t.ctx - t.lo, G = t.G, D = t.D;
    const int64_t n8 = (n + 7) / 8 * 8;
    row_ptrs(t, sc.kp, sc.vp);
    std::vector<float>& scores = sc.scores;
    scores.resize(G * n8);
    // scores[g, j] = scale * q[g] . k[lo + j]
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const float* const* kp = sc.kp.data() + j;
        // the cache rows are scattered over blocks: ask for the next group's K (and this group's
        // V, read after the softmax) early, so DRAM latency overlaps the dot products
        for (int64_t u = j + 8; u < std::min(j + 16, n); ++u)
            for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(sc.kp[u] + d), _MM_HINT_T0);
        for (int64_t u = j; u < j + 8; ++u)
            for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(sc.vp[u] + d), _MM_HINT_T1);
        for (int64_t g = 0; g < G; ++g) {
            const float* qv = t.qg + g * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qd = _mm256_loadu_ps(qv + d);
                a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[0] + d), a0);
                a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[1] + d), a1);
                a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[2] + d), a2);
                a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[3] + d), a3);
                a4 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[4] + d), a4);
                a5 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[5] + d), a5);
                a6 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[6] + d), a6);
                a7 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kp[7] + d), a7);
            }
            _mm256_storeu_ps(scores.data() + g * n8 + j,
                             _mm256_mul_ps(hsum8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(t.scale)));
        }
    }
    for (; j < n; ++j) {
        const float* k = sc.kp[j];
        for (int64_t g = 0; g < G; ++g) {
            const float* qv = t.qg + g * D;
            __m256 a = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(k + d), a);
            scores[g * n8 + j] = hsum(a) * t.scale;
        }
    }
    // softmax numerators in place (padding lanes n..n8 set to 0); 1 / sum per head
    float inv[8];
    for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n8;
        float m = -INFINITY;
        for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
        const __m256 mv = _mm256_set1_ps(m);
        __m256 sum = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + i), mv));
            _mm256_storeu_ps(sg + i, e);
            sum = _mm256_add_ps(sum, e);
        }
        float s = hsum(sum);
        for (; i < n; ++i) {
            sg[i] = std::exp(sg[i] - m);
            s += sg[i];
        }
        inv[g] = 1.f / s;
    }
    // out[g, :] = inv[g] * sum_j scores[g, j] v[lo + j]: each V row read once, whole (reading it
    // in column slices, one pass per slice, stalls on cache misses), two rows per accumulator update.
    alignas(32) float acc[8 * 512];
    std::fill(acc, acc + G * D, 0.f);
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const float* v0 = sc.vp[i];
        const float* v1 = sc.vp[i + 1];
        for (int64_t g = 0; g < G; ++g) {
            const __m256 w0 = _mm256_broadcast_ss(scores.data() + g * n8 + i);
            const __m256 w1 = _mm256_broadcast_ss(scores.data() + g * n8 + i + 1);
            float* a = acc + g * D;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 x = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v0 + d), _mm256_load_ps(a + d));
                _mm256_store_ps(a + d, _mm256_fmadd_ps(w1, _mm256_loadu_ps(v1 + d), x));
            }
        }
    }
    for (; i < n; ++i) {
        const float* v0 = sc.vp[i];
        for (int64_t g = 0; g < G; ++g) {
            const __m256 w0 = _mm256_broadcast_ss(scores.data() + g * n8 + i);
            float* a = acc + g * D;
            for (int64_t d = 0; d < D; d += 8)
                _mm256_store_ps(a + d, _mm256_fmadd_ps(w0, _mm256_loadu_ps(v0 + d), _mm256_load_ps(a + d)));
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        const __m256 s = _mm256_set1_ps(inv[g]);
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(t.out + g * D + d, _mm256_mul_ps(_mm256_load_ps(acc + g * D + d), s));
    }
}
#endif

// q row r at q + r * q_stride (its H heads contiguous), out row r at out + r * out_stride.
// Returns 0, or 1 when H is not a multiple of HKV.
inline int attend_rows(
    const float* q, int64_t q_stride, float* out, int64_t out_stride, int64_t H, int64_t HKV, int64_t D,
    const float* k_cache, const float* v_cache, int64_t BS,
    const int64_t* rows, const int64_t* row_seq, const int64_t* ctx_lens, int64_t N,
    const int64_t* block_tables, int64_t max_blocks, float scale, int64_t window, int nt) {
    if (H % HKV != 0) return 1;
    const int64_t G = H / HKV;
    // One task per row when there are enough rows to share out: its kv heads then read each cache
    // block's rows in turn, the second and third from L2; per (row, kv head) otherwise (latency).
    const bool per_row = N >= 4 * static_cast<int64_t>(nt);
    const int64_t tasks = per_row ? N : N * HKV;
#ifdef MS_AVX2
    const bool vec = D % 8 == 0 && G <= 8 && D <= 512;
#endif
#pragma omp parallel num_threads(nt)
    {
        static thread_local Scratch scratch;  // per thread, kept across calls (no allocation per layer)
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t i = per_row ? task : task / HKV;
            const int64_t r = rows[i];
            const int64_t ctx = ctx_lens[i];
            for (int64_t kvh = per_row ? 0 : task % HKV; kvh < (per_row ? HKV : task % HKV + 1); ++kvh) {
                Task t{q + r * q_stride + kvh * G * D, out + r * out_stride + kvh * G * D, k_cache, v_cache,
                       block_tables + row_seq[i] * max_blocks, BS, HKV * D, kvh * D,
                       window > 0 ? std::max<int64_t>(0, ctx - window) : 0, ctx, G, D, scale};
#ifdef MS_AVX2
                if (vec) {
                    attend_avx2(t, scratch);
                    continue;
                }
#endif
                attend_scalar(t, scratch);
            }
        }
    }
    return 0;
}

}  // namespace ms_attention
