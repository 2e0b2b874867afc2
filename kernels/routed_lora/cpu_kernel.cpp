// Segmented routed-LoRA shrink and expand for the CPU (see cpu_ops.py for the math and shapes).
// Plain C ABI, called through ctypes: no torch headers, so it compiles in about a second.
// Weights are fp32, bf16 or fp16 (W = float / bf16w / f16w; wtype 0 / 1 / 2 at the C ABI);
// activations and accumulation are fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

struct bf16w { uint16_t bits; };  // bfloat16: the top half of an fp32
struct f16w { uint16_t bits; };   // IEEE half
struct i8w { int8_t v; };         // int8 with a per-row scale beside it (route_lora only: RLSites::A_scale / B_scale)

static inline float to_f32(float v) { return v; }
static inline float to_f32(i8w v) { return static_cast<float>(v.v); }
static inline float to_f32(bf16w v) {
    uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline float to_f32(f16w v) {
#if defined(__F16C__)
    return _cvtsh_ss(v.bits);
#else
    const uint32_t h = v.bits, sign = (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0 && man == 0) {
        bits = sign;
    } else if (exp == 0) {  // subnormal: normalise
        int e = -1;
        do {
            ++e;
            man <<= 1;
        } while (!(man & 0x400u));
        bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

// Calls fn(type tag) with a null pointer of the weight type of wtype (0 fp32, 1 bf16, 2 fp16); 1 if unknown.
template <typename Fn>
static inline int with_wtype(int64_t wtype, Fn&& fn) {
    switch (wtype) {
        case 0: fn(static_cast<const float*>(nullptr)); return 0;
        case 1: fn(static_cast<const bf16w*>(nullptr)); return 0;
        case 2: fn(static_cast<const f16w*>(nullptr)); return 0;
        case 3:
        case 4: fn(static_cast<const i8w*>(nullptr)); return 0;  // 4: int8, A and B packed (MS_ROUTED_VNNI)
        default: return 1;
    }
}

// The shrink's walk over one segment g (slot s): its pairs four at a time (the last group may be
// short: nb < 4, missing x rows repeat the first), calling
//   block(a = A[slot], x0, x1, x2, x3, nb, hp = &h[first pair of the group, 0])
// so that each pass over a row of A serves four pairs: A is read from memory once per segment.
template <typename W, typename Block>
static inline void shrink_segment(const float* x, int64_t d_in, const W* A, int64_t r, const int64_t* pair_token,
                                  int64_t slot, int64_t p0, int64_t n, float* h, Block& block) {
    const W* a = A + slot * r * d_in;
    for (int64_t pb = 0; pb < n; pb += 4) {
        const int64_t nb = std::min<int64_t>(4, n - pb);
        const float* x0 = x + pair_token[p0 + pb] * d_in;
        const float* x1 = nb > 1 ? x + pair_token[p0 + pb + 1] * d_in : x0;
        const float* x2 = nb > 2 ? x + pair_token[p0 + pb + 2] * d_in : x0;
        const float* x3 = nb > 3 ? x + pair_token[p0 + pb + 3] * d_in : x0;
        block(a, x0, x1, x2, x3, nb, h + (p0 + pb) * r);
    }
}

template <typename W, typename Block>
static void for_pair_groups(const float* x, int64_t d_in, const W* A, int64_t r, const int64_t* pair_token,
                            const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                            int64_t G, float* h, int nt, Block block) {
#pragma omp parallel for num_threads(nt) schedule(static)  // contiguous slot ranges: one stream per thread
    for (int64_t g = 0; g < G; ++g)
        shrink_segment(x, d_in, A, r, pair_token, seg_slot[g], seg_start[g], seg_len[g], h, block);
}

// h[p, j] = sum_i A[slot(p), j, i] * x[token(p), i] for every pair p, segment by segment.
template <typename W>
static void shrink(const float* x, int64_t d_in, const W* A, int64_t r, const int64_t* pair_token,
                   const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                   int64_t G, float* h, int nt) {
    for_pair_groups(x, d_in, A, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt,
                    [=](const W* a, const float* x0, const float* x1, const float* x2, const float* x3,
                        int64_t nb, float* hg) {
        for (int64_t j = 0; j < r; ++j) {
            const W* row = a + j * d_in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < d_in; ++i) {
                const float av = to_f32(row[i]);
                s0 += av * x0[i];
                s1 += av * x1[i];
                s2 += av * x2[i];
                s3 += av * x3[i];
            }
            float* hp = hg + j;
            hp[0] = s0;
            if (nb > 1) hp[r] = s1;
            if (nb > 2) hp[2 * r] = s2;
            if (nb > 3) hp[3 * r] = s3;
        }
    });
}

// out[token(p), o] += weight(p) * scale[slot(p)] * sum_j B[slot(p), o, j] * h[p, j].
// Threads own disjoint column blocks of out, so there are no races.  The inner loop is an axpy over
// o, so it wants B as [S, r, d_out] (b_rows_are_r = 1: the caller passed a transposed view); with
// the PEFT layout [S, d_out, r] each segment's [BO, r] tile is first transposed into a buffer.
template <typename W>
static void expand(const float* h, const W* B, int64_t r, int64_t d_out, int64_t T,
                   const int64_t* pair_token, const float* pair_weight, const float* scale,
                   float scale_scalar, const int64_t* seg_slot, const int64_t* seg_start,
                   const int64_t* seg_len, int64_t G, float* out, int b_rows_are_r, int nt) {
    constexpr int64_t BO = 64;
    const int64_t nblocks = (d_out + BO - 1) / BO;
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> bt(static_cast<size_t>(r) * BO);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t o0 = blk * BO, bw = std::min(BO, d_out - o0);
            for (int64_t t = 0; t < T; ++t) std::memset(out + t * d_out + o0, 0, bw * sizeof(float));
            for (int64_t g = 0; g < G; ++g) {
                const int64_t s = seg_slot[g];
                if (!b_rows_are_r) {
                    const W* b = B + (s * d_out + o0) * r;
                    for (int64_t o = 0; o < bw; ++o)
                        for (int64_t j = 0; j < r; ++j) bt[j * BO + o] = to_f32(b[o * r + j]);
                }
                const W* bs = B + s * r * d_out + o0;  // row j at bs + j * d_out (b_rows_are_r)
                const float sc = scale ? scale[s] : scale_scalar;
                const int64_t p0 = seg_start[g], n = seg_len[g];
                for (int64_t p = p0; p < p0 + n; ++p) {
                    float* dst = out + pair_token[p] * d_out + o0;
                    const float c = sc * pair_weight[p];
                    for (int64_t j = 0; j < r; ++j) {
                        const float hj = c * h[p * r + j];
                        if (b_rows_are_r) {
                            const W* src = bs + j * d_out;
#pragma omp simd
                            for (int64_t o = 0; o < bw; ++o) dst[o] += hj * to_f32(src[o]);
                        } else {
                            const float* src = bt.data() + j * BO;
#pragma omp simd
                            for (int64_t o = 0; o < bw; ++o) dst[o] += hj * src[o];
                        }
                    }
                }
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// AVX2 paths (d_in % 8 == 0, d_out % 8 == 0, B laid out [S, r, d_out]): register-blocked so each
// weight vector loaded feeds several FMA chains, and bf16 weights widen in registers (a shift),
// so a bf16 pool reads half the bytes at the same arithmetic cost.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const bf16w* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline __m256 load8(const i8w* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline __m256 load8(const f16w* p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    alignas(32) float v[8];
    for (int i = 0; i < 8; ++i) v[i] = to_f32(p[i]);
    return _mm256_load_ps(v);
#endif
}
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// h[p, j]: pairs four at a time, rank rows two at a time (8 FMA chains per pass over d_in).
template <typename W>
struct ShrinkAvx2 {
    int64_t d_in, r;
    void operator()(const W* a, const float* x0, const float* x1, const float* x2, const float* x3, int64_t nb,
                    float* hg) const {
        for (int64_t j = 0; j < r; j += 2) {
            const W* ra = a + j * d_in;
            const W* rb = j + 1 < r ? ra + d_in : ra;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
            // the next two rows of A, ahead of use: a segment's A spans several pages, where the
            // hardware prefetcher stops (measured: the shrink ran at ~6 GB/s from memory without this)
            const char* pa = reinterpret_cast<const char*>(rb + d_in);
            const char* pb = reinterpret_cast<const char*>(rb + (j + 3 < r ? 2 * d_in : d_in));
            for (int64_t i = 0; i < d_in; i += 8) {
                if ((i & 15) == 0 && j + 2 < r) {
                    _mm_prefetch(pa + i * sizeof(W), _MM_HINT_T0);
                    _mm_prefetch(pb + i * sizeof(W), _MM_HINT_T0);
                }
                const __m256 va = load8(ra + i), vb = load8(rb + i);
                const __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i);
                const __m256 v2 = _mm256_loadu_ps(x2 + i), v3 = _mm256_loadu_ps(x3 + i);
                s0 = _mm256_fmadd_ps(va, v0, s0);
                s1 = _mm256_fmadd_ps(va, v1, s1);
                s2 = _mm256_fmadd_ps(va, v2, s2);
                s3 = _mm256_fmadd_ps(va, v3, s3);
                u0 = _mm256_fmadd_ps(vb, v0, u0);
                u1 = _mm256_fmadd_ps(vb, v1, u1);
                u2 = _mm256_fmadd_ps(vb, v2, u2);
                u3 = _mm256_fmadd_ps(vb, v3, u3);
            }
            alignas(32) float res[8];  // s0..s3 (row j, pairs 0..3), u0..u3 (row j + 1)
            _mm256_store_ps(res, hsum8(s0, s1, s2, s3, u0, u1, u2, u3));
            for (int64_t k = 0; k < nb; ++k) {
                float* hp = hg + k * r + j;
                hp[0] = res[k];
                if (j + 1 < r) hp[1] = res[4 + k];
            }
        }
    }
};

template <typename W>
static void shrink_avx2(const float* x, int64_t d_in, const W* A, int64_t r, const int64_t* pair_token,
                        const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                        int64_t G, float* h, int nt) {
    for_pair_groups(x, d_in, A, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt, ShrinkAvx2<W>{d_in, r});
}

// A region's cache lines spread over a loop's iterations (step() once per iteration): the weights
// the thread reads next come in while it computes on the current ones. A segment's weights span
// several pages, where the hardware prefetcher stops, and each segment starts a new region.
struct Prefetcher {
    const char* p = nullptr;
    int64_t lines = 0, next = 0, per = 0;
    void arm(const void* base, int64_t bytes, int64_t iters) {
        p = static_cast<const char*>(base);
        lines = base != nullptr ? (bytes + 63) / 64 : 0;
        next = 0;
        per = iters > 0 ? (lines + iters - 1) / iters : lines;
    }
    inline void step() {
        for (int64_t l = 0; l < per && next < lines; ++l, ++next) _mm_prefetch(p + 64 * next, _MM_HINT_T0);
    }
};

// The expand's vector width: V8 (AVX2) here, V16 (AVX-512) below.  L lanes; NV[np]: the tile width in
// vectors for np pairs, the widest whose np * NV accumulators fit the registers.
struct V8 {
    using T = __m256;
    static constexpr int L = 8;
    static constexpr int NV[5] = {0, 8, 4, 3, 3};
    static T zero() { return _mm256_setzero_ps(); }
    template <typename W>
    static T load(const W* p) { return load8(p); }
    static T set1(float v) { return _mm256_set1_ps(v); }
    static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static void add_to(float* d, T v) { _mm256_storeu_ps(d, _mm256_add_ps(v, _mm256_loadu_ps(d))); }
};

// One register tile of the expand: NP pairs of one segment x NV vectors (V::L columns each):
//   dst[k][cols] += sum_j hs[k, j] * B[s, j, cols]    (hs: each pair's h already scaled by c_k)
// Each B vector loaded feeds NP FMA chains (the NP * NV accumulators stay in registers).
// pf: stepped once per rank row j (null: prefetch this row a little ahead instead).
template <typename V, int NP, int NV, typename W>
static inline void expand_tile(const W* bs, int64_t d_out, int64_t r, const float* hs, float* const* dst,
                               Prefetcher* pf) {
    typename V::T acc[NP][NV];
    for (int k = 0; k < NP; ++k)
        for (int v = 0; v < NV; ++v) acc[k][v] = V::zero();
    for (int64_t j = 0; j < r; ++j) {
        const W* row = bs + j * d_out;
        if (pf != nullptr)
            pf->step();
        else
            _mm_prefetch(reinterpret_cast<const char*>(row + V::L * NV) + 256, _MM_HINT_T0);  // 16 row streams
        typename V::T b[NV];
        for (int v = 0; v < NV; ++v) b[v] = V::load(row + V::L * v);
        for (int k = 0; k < NP; ++k) {
            const typename V::T hv = V::set1(hs[k * r + j]);
            for (int v = 0; v < NV; ++v) acc[k][v] = V::fmadd(hv, b[v], acc[k][v]);
        }
    }
    for (int k = 0; k < NP; ++k)
        for (int v = 0; v < NV; ++v) V::add_to(dst[k] + V::L * v, acc[k][v]);
}

// Columns v0..v1 (in vectors) for NP pairs: tiles of NV vectors, then single vectors.
template <typename V, int NP, typename W>
static inline void expand_pairs(const W* bs, int64_t d_out, int64_t r, const float* hs, float* const* rows,
                                int64_t v0, int64_t v1, Prefetcher* pf) {
    constexpr int NV = V::NV[NP];
    float* dst[NP];
    int64_t v = v0;
    for (; v + NV <= v1; v += NV) {
        for (int k = 0; k < NP; ++k) dst[k] = rows[k] + V::L * v;
        expand_tile<V, NP, NV>(bs + V::L * v, d_out, r, hs, dst, pf);
    }
    for (; v < v1; ++v) {
        for (int k = 0; k < NP; ++k) dst[k] = rows[k] + V::L * v;
        expand_tile<V, NP, 1>(bs + V::L * v, d_out, r, hs, dst, pf);
    }
}

// out[token(p), cols] += c_p * sum_j h[p, j] B[s, j, cols] for the columns v0..v1 (in vectors of V::L)
// of every segment (out rows ld apart; zero: clear those columns of out's T rows first, else
// accumulate into what is there), segment by segment, up to four pairs of a segment at a time, so
// each B[s] value loaded from memory serves four pairs from registers (the previous one-pair loop was
// bound by loads: one per FMA).  hs: scratch [4 r].  A thread owns one column range: no races.
// pf (null: none): stepped once per rank row of every tile.  bscale (null: none): int8 B's row scales
// [S, r], folded into hs.
// The expand's walk over the segments: each segment's pairs four at a time, hs [np, r] = each pair's h
// times its weight and its slot's scaling (and int8 B's row scales, bscale: null none), rows = their
// out rows (ld apart); fn(slot, np, rows) then adds them.
template <typename Fn>
static inline void for_pair_quads(const float* h, int64_t r, const int64_t* pair_token, const float* pair_weight,
                                  const float* scale, float scale_scalar, const int64_t* seg_slot,
                                  const int64_t* seg_start, const int64_t* seg_len, int64_t G, float* out, int64_t ld,
                                  float* hs, const float* bscale, Fn&& fn) {
    for (int64_t g = 0; g < G; ++g) {
        const int64_t s = seg_slot[g];
        const float sc = scale ? scale[s] : scale_scalar;
        const int64_t p0 = seg_start[g], n = seg_len[g];
        for (int64_t pb = 0; pb < n; pb += 4) {
            const int np = static_cast<int>(std::min<int64_t>(4, n - pb));
            float* rows[4];
            for (int k = 0; k < np; ++k) {
                const int64_t p = p0 + pb + k;
                const float c = sc * pair_weight[p];
                if (bscale != nullptr)
                    for (int64_t j = 0; j < r; ++j) hs[k * r + j] = c * h[p * r + j] * bscale[s * r + j];
                else
                    for (int64_t j = 0; j < r; ++j) hs[k * r + j] = c * h[p * r + j];
                rows[k] = out + pair_token[p] * ld;
            }
            fn(s, np, rows);
        }
    }
}

template <typename V, typename W>
static void expand_cols(const float* h, const W* B, int64_t r, int64_t d_out, int64_t T, const int64_t* pair_token,
                        const float* pair_weight, const float* scale, float scale_scalar, const int64_t* seg_slot,
                        const int64_t* seg_start, const int64_t* seg_len, int64_t G, float* out, int64_t ld,
                        bool zero, int64_t v0, int64_t v1, float* hs, Prefetcher* pf = nullptr,
                        const float* bscale = nullptr) {
    if (zero)
        for (int64_t t = 0; t < T; ++t) std::memset(out + t * ld + V::L * v0, 0, (v1 - v0) * V::L * sizeof(float));
    if (v1 <= v0) return;
    for_pair_quads(h, r, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len, G, out, ld, hs,
                   bscale, [&](int64_t s, int np, float* const* rows) {
                       const W* bs = B + s * r * d_out;
                       switch (np) {
                           case 4: expand_pairs<V, 4>(bs, d_out, r, hs, rows, v0, v1, pf); break;
                           case 3: expand_pairs<V, 3>(bs, d_out, r, hs, rows, v0, v1, pf); break;
                           case 2: expand_pairs<V, 2>(bs, d_out, r, hs, rows, v0, v1, pf); break;
                           default: expand_pairs<V, 1>(bs, d_out, r, hs, rows, v0, v1, pf); break;
                       }
                   });
}

// expand_cols over all columns, one contiguous column range per thread.
template <typename V, typename W>
static void expand_par(const float* h, const W* B, int64_t r, int64_t d_out, int64_t T,
                       const int64_t* pair_token, const float* pair_weight, const float* scale,
                       float scale_scalar, const int64_t* seg_slot, const int64_t* seg_start,
                       const int64_t* seg_len, int64_t G, float* out, int nt, int64_t ld, bool zero,
                       const float* bscale = nullptr) {
    const int64_t nvec = d_out / V::L;
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(nt, nvec / 4));
#pragma omp parallel for num_threads(nth) schedule(static, 1)
    for (int64_t th = 0; th < nth; ++th) {
        std::vector<float> hs(static_cast<size_t>(4 * r));
        expand_cols<V>(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len,
                       G, out, ld, zero, nvec * th / nth, nvec * (th + 1) / nth, hs.data(), nullptr, bscale);
    }
}
#define MS_ROUTED_AVX2 1
#endif

#if defined(MS_ROUTED_AVX2) && defined(__AVX512F__)
// AVX-512 paths (d_in % 16 == 0, d_out % 16 == 0, B laid out [S, r, d_out]), the AVX2 ones' shapes at
// twice the width and with more accumulators: the shrink keeps four pairs x four rank rows (16 chains,
// half a load per FMA), the expand four pairs x four vectors. fp16 / bf16 / int8 weights widen in registers.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16w* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __m512 load16(const i8w* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline __m512 load16(const f16w* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m256 fold16(__m512 v) {  // the two halves added: 16 lanes -> 8, for hsum8
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// h[p, j] for four pairs (x0..x3; nb of them real) and every rank row of the segment's A, four rows a pass.
// pf (null: none): stepped once per inner iteration; a segment of n pairs makes ceil(n / 4) calls of
// ceil(r / 4) * d_in / 16 iterations each.  packed: A in pack_int8_a's order (r % 4 == 0): each group of
// four rank rows [d_in / 16][4][16], so a pass reads its four rows as one stream, in order.
template <typename W>
struct ShrinkAvx512 {
    int64_t d_in, r;
    Prefetcher* pf = nullptr;
    bool packed = false;
    void operator()(const W* a, const float* x0, const float* x1, const float* x2, const float* x3, int64_t nb,
                    float* hg) const {
        const int64_t step = packed ? 4 : 1;  // elements of a row's 16-value chunk i / 16 start at rw[k] + step * i
        for (int64_t j = 0; j < r; j += 4) {
            const W* rw[4];
            for (int k = 0; k < 4; ++k)
                rw[k] = packed ? a + j * d_in + 16 * k : a + std::min<int64_t>(j + k, r - 1) * d_in;
            __m512 acc[4][4];
            for (int k = 0; k < 4; ++k)
                for (int q = 0; q < 4; ++q) acc[k][q] = _mm512_setzero_ps();
            for (int64_t i = 0; i < d_in; i += 16) {
                if (pf != nullptr) pf->step();
                const __m512 v0 = _mm512_loadu_ps(x0 + i), v1 = _mm512_loadu_ps(x1 + i);
                const __m512 v2 = _mm512_loadu_ps(x2 + i), v3 = _mm512_loadu_ps(x3 + i);
                for (int k = 0; k < 4; ++k) {
                    const __m512 w = load16(rw[k] + step * i);
                    acc[k][0] = _mm512_fmadd_ps(w, v0, acc[k][0]);
                    acc[k][1] = _mm512_fmadd_ps(w, v1, acc[k][1]);
                    acc[k][2] = _mm512_fmadd_ps(w, v2, acc[k][2]);
                    acc[k][3] = _mm512_fmadd_ps(w, v3, acc[k][3]);
                }
            }
            alignas(32) float res[16];  // res[8 * (k / 2) + 4 * (k % 2) + q]: row j + k, pair q
            _mm256_store_ps(res, hsum8(fold16(acc[0][0]), fold16(acc[0][1]), fold16(acc[0][2]), fold16(acc[0][3]),
                                       fold16(acc[1][0]), fold16(acc[1][1]), fold16(acc[1][2]), fold16(acc[1][3])));
            _mm256_store_ps(res + 8, hsum8(fold16(acc[2][0]), fold16(acc[2][1]), fold16(acc[2][2]), fold16(acc[2][3]),
                                           fold16(acc[3][0]), fold16(acc[3][1]), fold16(acc[3][2]), fold16(acc[3][3])));
            for (int64_t q = 0; q < nb; ++q)
                for (int64_t k = 0; k < 4 && j + k < r; ++k) hg[q * r + j + k] = res[8 * (k / 2) + 4 * (k % 2) + q];
        }
    }
};

struct V16 {
    using T = __m512;
    static constexpr int L = 16;
    static constexpr int NV[5] = {0, 12, 8, 6, 4};
    static T zero() { return _mm512_setzero_ps(); }
    template <typename W>
    static T load(const W* p) { return load16(p); }
    static T set1(float v) { return _mm512_set1_ps(v); }
    static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static void add_to(float* d, T v) { _mm512_storeu_ps(d, _mm512_add_ps(v, _mm512_loadu_ps(d))); }
};
#define MS_ROUTED_AVX512 1
#endif

#if defined(MS_ROUTED_AVX512) && defined(__AVX512VNNI__)
// An int8 pool packed for this kernel (wtype 4, INT8_PACKED in cpu_ops.py; r % 4 == 0, d_in and d_out
// multiples of 16).  A for the shrink (ShrinkAvx512's packed), each group of four rank rows chunk by chunk,
//   Ap[g][i16][jj][c] = A[4 g + jj][16 i16 + c]
// so a pass over four rank rows reads one stream in order (a bank's n slots are then the packed
// [n r, d_in] of a dense unit); B for the VNNI expand, each slot's [r, d_out] values in 16-column
// tiles, each tile's rank rows in groups of four with the four values of a column adjacent,
//   Bp[c16][g][c][jj] = B[4 g + jj][16 c16 + c]    (r * d_out bytes a slot)
// so one 64-byte load is a [16 columns x 4 rank rows] operand of vpdpbusd, and a tile's bytes (and
// four tiles') are contiguous: a segment's B streams in order, where the row layout read 16 rows in
// pieces.  The rank-r intermediate h is quantized per pair (symmetric int8 over the pair's r values,
// stored + 128 as vpdpbusd's unsigned operand; the + 128 comes off through the column sums of B):
// one vpdpbusd does 4 rank rows x 16 columns for a pair where the fp32 expand widened each int8 row
// (two uops) and spent an FMA per rank row.  h's rounding adds ~0.3% of a pair's delta (rms) to the
// pool's own int8 rounding.
#define MS_ROUTED_VNNI 1

// A pair group's h as vpdpbusd operands: hq[k][j] = round(hs[k, j] / sk[k]) + 128, sk[k] = max|hs[k, :]| / 127
// for its np pairs (rr values a pair; vnni_cols<np> reads no others).
static inline void quantize_h(const float* hs, int64_t rr, int np, uint8_t* hq, float* sk) {
    for (int k = 0; k < np; ++k) {
        const float* h = hs + k * rr;
        float m = 0.f;
        for (int64_t j = 0; j < rr; ++j) m = std::max(m, std::fabs(h[j]));
        sk[k] = m / 127.f;
        const float inv = m > 0.f ? 127.f / m : 0.f;
        for (int64_t j = 0; j < rr; ++j) hq[k * rr + j] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(h[j] * inv)) + 128);
    }
}

// dst[k][16 (c16 + v) + c] += sk[k] * sum over the parts e and rank rows j of hq'[k][e r + j] * B_e[j][..]
// for NV tiles from c16 (hq' = hq - 128): parts are slots (one for a segment, a bank's n experts for a
// dense unit), each a packed [r, d_out] slot.  pf (null: none): stepped once per rank-row group.
template <int NP, int NV>
static inline void vnni_tile(const int8_t* const* parts, int64_t nparts, int64_t r, int64_t c16, const uint8_t* hq,
                             int64_t rr, const float* sk, float* const* dst, Prefetcher* pf) {
    __m512i acc[NP][NV], cs[NV];
    for (int v = 0; v < NV; ++v) {
        cs[v] = _mm512_setzero_si512();
        for (int k = 0; k < NP; ++k) acc[k][v] = _mm512_setzero_si512();
    }
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t tile = r * 16;  // bytes of one slot's 16-column tile
    for (int64_t e = 0; e < nparts; ++e) {
        const int8_t* p = parts[e] + c16 * tile;
        const uint8_t* he = hq + e * r;
        for (int64_t j = 0; j < r; j += 4, p += 64) {
            if (pf != nullptr) pf->step();
            __m512i q[NV];
            for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_si512(p + v * tile);
            for (int v = 0; v < NV; ++v) cs[v] = _mm512_dpbusd_epi32(cs[v], ones, q[v]);
            for (int k = 0; k < NP; ++k) {
                int32_t hv4;
                std::memcpy(&hv4, he + k * rr + j, 4);
                const __m512i hv = _mm512_set1_epi32(hv4);
                for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_dpbusd_epi32(acc[k][v], hv, q[v]);
            }
        }
    }
    for (int k = 0; k < NP; ++k) {
        const __m512 s = _mm512_set1_ps(sk[k]);
        for (int v = 0; v < NV; ++v) {
            float* d = dst[k] + 16 * v;
            const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[k][v], _mm512_slli_epi32(cs[v], 7)));
            _mm512_storeu_ps(d, _mm512_fmadd_ps(s, f, _mm512_loadu_ps(d)));
        }
    }
}

// Tiles v0..v1 (16 columns each) of NP pairs' rows: four tiles at a time, then one.
template <int NP>
static inline void vnni_cols(const int8_t* const* parts, int64_t nparts, int64_t r, const uint8_t* hq, int64_t rr,
                             const float* sk, float* const* rows, int64_t v0, int64_t v1, Prefetcher* pf) {
    float* dst[NP];
    int64_t v = v0;
    for (; v + 4 <= v1; v += 4) {
        for (int k = 0; k < NP; ++k) dst[k] = rows[k] + 16 * v;
        vnni_tile<NP, 4>(parts, nparts, r, v, hq, rr, sk, dst, pf);
    }
    for (; v < v1; ++v) {
        for (int k = 0; k < NP; ++k) dst[k] = rows[k] + 16 * v;
        vnni_tile<NP, 1>(parts, nparts, r, v, hq, rr, sk, dst, pf);
    }
}

// Up to four pairs (np) of hs [np, rr] (each pair's h already scaled) into their out rows, columns v0..v1.
static inline void vnni_pairs(const int8_t* const* parts, int64_t nparts, int64_t r, const float* hs, int np,
                              float* const* rows, int64_t v0, int64_t v1, Prefetcher* pf) {
    const int64_t rr = nparts * r;
    thread_local std::vector<uint8_t> hqv;
    hqv.resize(static_cast<size_t>(4 * rr));
    float sk[4];
    quantize_h(hs, rr, np, hqv.data(), sk);
    switch (np) {
        case 4: vnni_cols<4>(parts, nparts, r, hqv.data(), rr, sk, rows, v0, v1, pf); break;
        case 3: vnni_cols<3>(parts, nparts, r, hqv.data(), rr, sk, rows, v0, v1, pf); break;
        case 2: vnni_cols<2>(parts, nparts, r, hqv.data(), rr, sk, rows, v0, v1, pf); break;
        default: vnni_cols<1>(parts, nparts, r, hqv.data(), rr, sk, rows, v0, v1, pf); break;
    }
}

// expand_cols (V16) for a packed int8 B: the same arguments, B packed (see above), columns v0..v1 in
// tiles of 16.
static void expand_cols_packed(const float* h, const i8w* B, int64_t r, int64_t d_out, int64_t T,
                               const int64_t* pair_token, const float* pair_weight, const float* scale,
                               float scale_scalar, const int64_t* seg_slot, const int64_t* seg_start,
                               const int64_t* seg_len, int64_t G, float* out, int64_t ld, bool zero, int64_t v0,
                               int64_t v1, float* hs, Prefetcher* pf, const float* bscale) {
    if (zero)
        for (int64_t t = 0; t < T; ++t) std::memset(out + t * ld + 16 * v0, 0, (v1 - v0) * 16 * sizeof(float));
    if (v1 <= v0) return;
    for_pair_quads(h, r, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len, G, out, ld, hs,
                   bscale, [&](int64_t s, int np, float* const* rows) {
                       const int8_t* part = reinterpret_cast<const int8_t*>(B + s * r * d_out);
                       vnni_pairs(&part, 1, r, hs, np, rows, v0, v1, pf);
                   });
}
#endif

template <typename W>
static void routed(const float* x, int64_t T, int64_t d_in, const W* A, const W* B, int64_t r, int64_t d_out,
                   const int64_t* pair_token, const float* pair_weight, const float* scale, float scale_scalar,
                   const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len, int64_t G, float* h,
                   float* out, int b_rows_are_r, int nt) {
#ifdef MS_ROUTED_AVX512
    if (b_rows_are_r && d_in % 16 == 0 && d_out % 16 == 0) {
        for_pair_groups(x, d_in, A, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt, ShrinkAvx512<W>{d_in, r});
        expand_par<V16>(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len,
                      G, out, nt, d_out, true);
        return;
    }
#endif
#ifdef MS_ROUTED_AVX2
    if (b_rows_are_r && d_in % 8 == 0 && d_out % 8 == 0) {
        shrink_avx2(x, d_in, A, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt);
        expand_par<V8>(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len,
                    G, out, nt, d_out, true);
        return;
    }
#endif
    shrink(x, d_in, A, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt);
    expand(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len, G, out,
           b_rows_are_r, nt);
}

// idx[0, k) sorted by key descending, ties in their order (a stable insertion sort: k <= 64 here, where
// std::stable_sort's temporary buffer, a heap allocation per call, costs more than the sort).
template <typename Key>
static inline void sort_desc(int64_t* idx, int64_t k, Key key) {
    for (int64_t i = 1; i < k; ++i) {
        const int64_t v = idx[i];
        const float kv = key(v);
        int64_t j = i;
        for (; j > 0 && key(idx[j - 1]) < kv; --j) idx[j] = idx[j - 1];
        idx[j] = v;
    }
}

// One row of DynMoLE hybrid routing (see dynamic_route below); returns the row's entropy.  With
// shannon non-null, also the normalised Shannon entropy of p (the routing statistics' entropy) there,
// and whether the row broadcast in *bcast.
static float route_row(const float* l, int64_t n, float tp, float kk, float th, float q, float eps, float* wr,
                       float* shannon = nullptr, bool* bcast = nullptr) {
    float p[64];
    int64_t idx[64];
    float m = -INFINITY;
    for (int64_t e = 0; e < n; ++e) m = std::max(m, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < n; ++e) sum += (p[e] = std::exp(l[e] - m));
    const float inv = 1.f / sum;
    for (int64_t e = 0; e < n; ++e) p[e] *= inv;
    float h = 0.f;
    float hs = 0.f;
    if (n > 1 && (q == 1.f || shannon)) {
        for (int64_t e = 0; e < n; ++e)
            if (p[e] > 0.f) hs -= p[e] * std::log(p[e]);
        hs /= std::log(static_cast<float>(n));
    }
    if (shannon) *shannon = std::min(std::max(hs, 0.f), 1.f);
    if (n > 1) {
        if (q == 1.f) {
            h = hs;
        } else {
            float acc = 0.f;
            for (int64_t e = 0; e < n; ++e) acc += std::pow(p[e] + eps, q);
            h = (1.f - acc) / (1.f - std::pow(static_cast<float>(n), 1.f - q));
        }
    }
    const bool all = q > 0.f && th < 1.f && h > th;
    if (bcast) *bcast = all;
    if (all) {
        for (int64_t e = 0; e < n; ++e) wr[e] = p[e];
        return h;
    }
    for (int64_t e = 0; e < n; ++e) idx[e] = e;
    sort_desc(idx, n, [&p](int64_t e) { return p[e]; });
    float cum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t e = idx[j];
        cum += p[e];
        wr[e] = (cum <= tp || static_cast<float>(j) < kk) ? p[e] : 0.f;
    }
    return h;
}

static inline float dot(const float* a, const float* b, int64_t d) {
    int64_t i = 0;
    float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    const __m256 v = _mm256_add_ps(s0, s1);
    __m128 q4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q4 = _mm_hadd_ps(q4, q4);
    s = _mm_cvtss_f32(_mm_hadd_ps(q4, q4));
#endif
    for (; i < d; ++i) s += a[i] * b[i];
    return s;
}

// lr[e] = x . R[e] for the n router rows R [n, d] of one row's bank.  With AVX-512, NE rows at a time:
// each x vector loaded once feeds NE independent FMA chains (one dot at a time leaves the FMA units
// waiting on its chain's latency).
template <int NE>
static inline void dots_ne(const float* x, const float* R, int64_t d, float* lr) {
#ifdef MS_ROUTED_AVX512
    __m512 acc[NE];
    for (int k = 0; k < NE; ++k) acc[k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int k = 0; k < NE; ++k) acc[k] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(R + k * d + i), acc[k]);
    }
    for (int k = 0; k < NE; ++k) {
        float s = _mm512_reduce_add_ps(acc[k]);
        for (int64_t j = i; j < d; ++j) s += x[j] * R[k * d + j];
        lr[k] = s;
    }
#else
    for (int k = 0; k < NE; ++k) lr[k] = dot(x, R + k * d, d);
#endif
}

static void dots(const float* x, const float* R, int64_t d, int64_t n, float* lr) {
    for (int64_t e = 0; e < n;) {
        const int64_t k = std::min<int64_t>(n - e, 8);
        const float* Re = R + e * d;
        switch (k) {
            case 8: dots_ne<8>(x, Re, d, lr + e); break;
            case 7: dots_ne<7>(x, Re, d, lr + e); break;
            case 6: dots_ne<6>(x, Re, d, lr + e); break;
            case 5: dots_ne<5>(x, Re, d, lr + e); break;
            case 4: dots_ne<4>(x, Re, d, lr + e); break;
            case 3: dots_ne<3>(x, Re, d, lr + e); break;
            case 2: dots_ne<2>(x, Re, d, lr + e); break;
            default: dots_ne<1>(x, Re, d, lr + e); break;
        }
        e += k;
    }
}

// int8 A: h[p, :] *= the slot's row scales, for the len pairs from p0 (scale null: nothing to do).
static inline void scale_h(float* h, int64_t r, int64_t p0, int64_t len, const float* scale) {
    if (scale == nullptr) return;
    for (int64_t p = p0; p < p0 + len; ++p)
        for (int64_t j = 0; j < r; ++j) h[p * r + j] *= scale[j];
}

#ifdef MS_ROUTED_AVX512
// A dense unit of route_lora (split_by_bank chose it): the bank at slot offset off as one segment of
// rank n * r over all its rows (offset[t] == off), each row's unselected experts weighted 0, so a
// row's deltas sum in registers and reach out once (not once per expert) and the bank's A and B
// stream once, n * r rows each.  A, B: the site's whole lora_a [S, r, d_in] and lora_b [S, r, d_out];
// w: the site's routing weights [T, n]; scale [S]; a_scale / b_scale: int8 row scales [S, r] or null;
// hs: scratch [4 n r].  packed: B is a packed int8 pool's (expand_cols_packed).
template <typename W>
static void dense_unit(const float* x, int64_t d_in, const W* A, const W* B, int64_t r, int64_t n, int64_t d_out,
                       int64_t off, const int64_t* offset, int64_t T, const float* w, const float* scale,
                       const float* a_scale, const float* b_scale, float* out, int64_t ld, float* hs,
                       bool packed) {
    thread_local std::vector<float> hd, ones;
    thread_local std::vector<int64_t> tb;
    const int64_t rr = n * r;
    tb.clear();
    for (int64_t t = 0; t < T; ++t)
        if (offset[t] == off) tb.push_back(t);
    const int64_t tbn = static_cast<int64_t>(tb.size());
    hd.resize(static_cast<size_t>(tbn * rr));
    ones.assign(static_cast<size_t>(tbn), 1.f);
    ShrinkAvx512<W> blk16{d_in, rr, nullptr, packed};  // packed slots in a row are the packed [n r, d_in]
    shrink_segment(x, d_in, A + off * r * d_in, rr, tb.data(), 0, 0, tbn, hd.data(), blk16);
    for (int64_t k = 0; k < tbn; ++k)  // the routing weight, slot scaling and int8 row scales, folded into h
        for (int64_t e = 0; e < n; ++e) {
            const float c = scale[off + e] * w[tb[k] * n + e];
            float* hr = hd.data() + k * rr + e * r;
            const int64_t sr = (off + e) * r;
            for (int64_t j = 0; j < r; ++j)
                hr[j] *= c * (a_scale != nullptr ? a_scale[sr + j] : 1.f)
                         * (b_scale != nullptr ? b_scale[sr + j] : 1.f);
        }
#ifdef MS_ROUTED_VNNI
    if constexpr (std::is_same_v<W, i8w>)
        if (packed) {  // the n experts' slots as the parts of one rank-n r operand, four rows at a time
            const int8_t* parts[64];
            for (int64_t e = 0; e < n; ++e) parts[e] = reinterpret_cast<const int8_t*>(B + (off + e) * r * d_out);
            for (int64_t k0 = 0; k0 < tbn; k0 += 4) {
                const int np = static_cast<int>(std::min<int64_t>(4, tbn - k0));
                float* rows[4];
                for (int k = 0; k < np; ++k) rows[k] = out + tb[k0 + k] * ld;
                vnni_pairs(parts, n, r, hd.data() + k0 * rr, np, rows, 0, d_out / 16, nullptr);
            }
            return;
        }
#endif
    (void)packed;
    const int64_t zero = 0;
    expand_cols<V16>(hd.data(), B + off * r * d_out, rr, d_out, T, tb.data(), ones.data(), nullptr, 1.f, &zero, &zero,
                     &tbn, 1, out, ld, false, 0, d_out / 16, hs);
}

// expand_cols<V16>, or expand_cols_packed when B is a packed int8 pool's (wtype 4).
template <typename W>
static inline void expand16(bool packed, const float* h, const W* B, int64_t r, int64_t d_out, int64_t T,
                            const int64_t* pair_token, const float* pair_weight, const float* scale, float scale_scalar,
                            const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len, int64_t G,
                            float* out, int64_t ld, bool zero, int64_t v0, int64_t v1, float* hs, Prefetcher* pf,
                            const float* bscale) {
#ifdef MS_ROUTED_VNNI
    if constexpr (std::is_same_v<W, i8w>)
        if (packed) {
            expand_cols_packed(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start,
                               seg_len, G, out, ld, zero, v0, v1, hs, pf, bscale);
            return;
        }
#endif
    (void)packed;
    expand_cols<V16>(h, B, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len, G,
                     out, ld, zero, v0, v1, hs, pf, bscale);
}
#endif

#ifdef MS_ROUTED_AVX512
struct RLSites;
struct RLStep;
static int64_t split_by_bank(const RLSites* s, const RLStep* st, const int64_t* ibp, int64_t blk, const int64_t* wk,
                             int64_t nwork, int nt, int64_t* ustart, int64_t* uitems, int64_t* udense);
#endif

extern "C" {

// wtype: 0 fp32, 1 bf16, 2 fp16 weights.  b_rows_are_r: B is laid out [S, r, d_out].  h: scratch [P, r] fp32.
// out: [T, d_out] fp32.
int routed_lora_cpu(const float* x, int64_t T, int64_t d_in, const void* A, const void* B,
                    int64_t r, int64_t d_out, int wtype, const int64_t* pair_token,
                    const float* pair_weight, const float* scale, float scale_scalar,
                    const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                    int64_t G, float* h, float* out, int b_rows_are_r, int nt) {
    if (wtype >= 3) return 1;  // int8 weights need their row scales: route_lora, routed_lora_cpu_int8
    return with_wtype(wtype, [&](auto tag) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        routed(x, T, d_in, static_cast<const W*>(A), static_cast<const W*>(B), r, d_out, pair_token, pair_weight,
               scale, scale_scalar, seg_slot, seg_start, seg_len, G, h, out, b_rows_are_r, nt);
    });
}

// routed_lora_cpu for an int8 pool (B laid out [S, r, d_out], as the pool stores it): A and B int8 with
// per-row scales a_scale, b_scale [S, r] (weight = value * its row's scale), read as stored, the scales
// folded into the rank-r intermediate h (the general path's MixLoRA / MoLA calls, which route_lora does
// not take).  AVX-512 and d_in, d_out multiples of 16 only: returns 1 otherwise (the caller then
// dequantizes the slots it uses).  packed: A and B packed (ShrinkAvx512, expand_cols_packed; VNNI builds,
// r % 4 == 0).
int routed_lora_cpu_int8(const float* x, int64_t T, int64_t d_in, const void* A, const void* B, int64_t r,
                         int64_t d_out, const float* a_scale, const float* b_scale, const int64_t* pair_token,
                         const float* pair_weight, const float* scale, float scale_scalar, const int64_t* seg_slot,
                         const int64_t* seg_start, const int64_t* seg_len, int64_t G, float* h, float* out, int packed,
                         int nt) {
#ifdef MS_ROUTED_AVX512
    if (d_in % 16 != 0 || d_out % 16 != 0 || a_scale == nullptr || b_scale == nullptr) return 1;
    const i8w* a = static_cast<const i8w*>(A);
    const i8w* b = static_cast<const i8w*>(B);
#ifndef MS_ROUTED_VNNI
    if (packed) return 1;
#endif
    if (packed && r % 4 != 0) return 1;
    for_pair_groups(x, d_in, a, r, pair_token, seg_slot, seg_start, seg_len, G, h, nt,
                    ShrinkAvx512<i8w>{d_in, r, nullptr, packed != 0});
    for (int64_t g = 0; g < G; ++g) scale_h(h, r, seg_start[g], seg_len[g], a_scale + seg_slot[g] * r);
    if (packed) {
#ifdef MS_ROUTED_VNNI
        const int64_t nvec = d_out / 16, nth = std::max<int64_t>(1, std::min<int64_t>(nt, nvec / 4));
#pragma omp parallel for num_threads(nth) schedule(static, 1)
        for (int64_t th = 0; th < nth; ++th) {
            std::vector<float> hs(static_cast<size_t>(4 * r));
            expand_cols_packed(h, b, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start,
                               seg_len, G, out, d_out, true, nvec * th / nth, nvec * (th + 1) / nth, hs.data(), nullptr,
                               b_scale);
        }
        return 0;
#else
        return 1;
#endif
    }
    expand_par<V16>(h, b, r, d_out, T, pair_token, pair_weight, scale, scale_scalar, seg_slot, seg_start, seg_len, G,
                    out, nt, d_out, true, b_scale);
    return 0;
#else
    (void)packed;
    (void)x, (void)T, (void)d_in, (void)A, (void)B, (void)r, (void)d_out, (void)a_scale, (void)b_scale;
    (void)pair_token, (void)pair_weight, (void)scale, (void)scale_scalar, (void)seg_slot, (void)seg_start;
    (void)seg_len, (void)G, (void)h, (void)out, (void)nt;
    return 1;
#endif
}

// The pair plan (kernels/pairs.py) in one call, for the decode path where a dozen small torch ops
// (sort, unique, three host syncs) cost more than the routed GEMMs they prepare.
// dense = 1: w is dense routing weights [T, n] (row stride ws); a token's pairs are its experts e
//   with w != 0 and offset[t] >= 0, slot offset[t] + e; slots/weights [T, n] are written in
//   decreasing weight (ties: lower expert first), padded with -1 / 0 (K = n, no host sync for K).
// dense = 0: slots/weights [T, n] are inputs (slot -1 = no pair; kept even when the weight is 0).
// Pairs are grouped by slot (a counting sort over [0, S)), tokens ascending within a slot, as
// plan_from_slots' stable sort.  counts = {P, G, max segment length}.  Returns 2 when a slot >= S.
int build_plan(int dense, const float* w, int64_t ws, const int64_t* offset, int64_t T, int64_t n,
               int64_t S, int64_t* slots, float* weights, int64_t* pair_token, int64_t* pair_slot,
               float* pair_weight, int64_t* seg_slot, int64_t* seg_start, int64_t* seg_len,
               int64_t* counts) {
    if (dense) {
        int64_t idx[64];
        if (n > 64) return 3;
        for (int64_t t = 0; t < T; ++t) {
            const float* wr = w + t * ws;
            int64_t* sr = slots + t * n;
            float* wo = weights + t * n;
            int64_t k = 0;
            if (offset[t] >= 0)
                for (int64_t e = 0; e < n; ++e)
                    if (wr[e] != 0.f) idx[k++] = e;
            sort_desc(idx, k, [wr](int64_t e) { return wr[e]; });
            for (int64_t j = 0; j < k; ++j) {
                sr[j] = offset[t] + idx[j];
                wo[j] = wr[idx[j]];
            }
            for (int64_t j = k; j < n; ++j) {
                sr[j] = -1;
                wo[j] = 0.f;
            }
        }
    }
    const int64_t tk = T * n;
    thread_local std::vector<int64_t> cnt;  // no allocation per call
    cnt.assign(static_cast<size_t>(S) + 1, 0);
    for (int64_t i = 0; i < tk; ++i) {
        const int64_t s = slots[i];
        if (s >= S) return 2;
        if (s >= 0) ++cnt[s + 1];
    }
    int64_t g = 0, maxlen = 0;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t c = cnt[s + 1];
        if (c) {
            seg_slot[g] = s;
            seg_start[g] = cnt[s];
            seg_len[g] = c;
            maxlen = std::max(maxlen, c);
            ++g;
        }
        cnt[s + 1] += cnt[s];  // cnt[s] = first pair of slot s
    }
    const int64_t p = cnt[S];
    for (int64_t i = 0; i < tk; ++i) {  // token-major order: tokens ascend within each slot
        const int64_t s = slots[i];
        if (s < 0) continue;
        const int64_t q = cnt[s]++;
        pair_token[q] = i / n;
        pair_slot[q] = s;
        pair_weight[q] = weights[i];
    }
    counts[0] = p;
    counts[1] = g;
    counts[2] = maxlen;
    return 0;
}

// DynMoLE hybrid routing (kernels/routing.py `dynamic_route`, ALGORITHMS.md §2) for one batch of
// router logits [T, n] (row stride ls), n <= 64: per row, p = softmax(logits); entropy = normalised
// Tsallis H_q(p + eps) (Shannon when q == 1); keep experts in descending-p order (ties: lower index
// first) while the running sum <= top_p, always the keep_top_k most probable, all of them when
// q > 0, threshold < 1 and entropy > threshold.  w = p * keep.  Each parameter is a pointer with
// stride 0 (one value) or 1 (one per row).  Replaces ~15 small torch ops per routed linear.
int dynamic_route(const float* logits, int64_t ls, int64_t T, int64_t n, const float* top_p, int64_t s_top_p,
                  const float* keep_k, int64_t s_keep_k, const float* thr, int64_t s_thr, const float* qv,
                  int64_t s_q, float eps, float* w, float* ent) {
    if (n > 64 || n < 1) return 3;
    for (int64_t t = 0; t < T; ++t)
        ent[t] = route_row(logits + t * ls, n, top_p[t * s_top_p], keep_k[t * s_keep_k], thr[t * s_thr],
                           qv[t * s_q], eps, w + t * n);
    return 0;
}

// Routing and pair plans of M sites that share the input x [T, d_in] (row stride xs) and one
// DynMoLE routing (gate and up: M = 2), in one call: the step's hot path calls this once per
// (layer, input) instead of a router GEMM, a gather, a routing call and M plan builds.
//   routers: M addresses of pooled routers [S, d_in] fp32.  offset [T]: a row's bank slot offset
//   (-1: not routed here; its logits, weights and entropy are 0 and it has no pairs).
//   Only each row's own bank's n router rows are evaluated: logits[m, t, j] = routers[m][offset[t] + j] . x[t].
//   Parameters as in dynamic_route (stride 0 or 1 over the T rows).
// Outputs: logits, w [M, T, n] and ent [M, T] (for the routing statistics); per site m, the plan of
// build_plan(dense = 1) in ibuf + m * (3Tn + 3S + 3) = {pair_token [Tn], pair_slot [Tn], slots [Tn],
// seg_slot [S], seg_start [S], seg_len [S], counts [3]} and fbuf + m * 2Tn = {pair_weight [Tn], weights [Tn]}.
int route_plan(const float* x, int64_t xs, int64_t T, int64_t d_in, int64_t M, const int64_t* routers, int64_t S,
               int64_t n, const int64_t* offset, const float* top_p, int64_t s_top_p, const float* keep_k,
               int64_t s_keep_k, const float* thr, int64_t s_thr, const float* qv, int64_t s_q, float eps,
               float* logits, float* w, float* ent, int64_t* ibuf, float* fbuf, int nt) {
    if (n > 64 || n < 1) return 3;
    for (int64_t t = 0; t < T; ++t)
        if (offset[t] + n > S) return 2;
    const int64_t rows = M * T, tn = T * n;
    const bool par = nt > 1 && rows * n * d_in >= (int64_t{1} << 18);
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t m = i / T, t = i - m * T;
        float* lr = logits + i * n;
        float* wr = w + i * n;
        if (offset[t] < 0) {
            for (int64_t e = 0; e < n; ++e) lr[e] = wr[e] = 0.f;
            ent[i] = 0.f;
            continue;
        }
        const float* R = reinterpret_cast<const float*>(routers[m]) + offset[t] * d_in;
        const float* xr = x + t * xs;
        dots(xr, R, d_in, n, lr);
        ent[i] = route_row(lr, n, top_p[t * s_top_p], keep_k[t * s_keep_k], thr[t * s_thr], qv[t * s_q], eps, wr);
    }
    for (int64_t m = 0; m < M; ++m) {
        int64_t* ib = ibuf + m * (3 * tn + 3 * S + 3);
        float* fb = fbuf + m * 2 * tn;
        const int rc = build_plan(1, w + m * tn, n, offset, T, n, S, ib + 2 * tn, fb + tn, ib, ib + tn, fb,
                                  ib + 3 * tn, ib + 3 * tn + S, ib + 3 * tn + 2 * S, ib + 3 * tn + 3 * S);
        if (rc) return rc;
    }
    return 0;
}

// route_lora's arguments.  RLSites: M sites sharing one input (gate and up: M = 2; down: M = 1),
// constant while the pool's tensors live (built once, cached by the caller).  RLStep: one step's
// routing group (its rows' bank offsets and DynMoLE parameters) and where its statistics go.
struct RLSites {
    int64_t M, d_in, S, r, wtype;  // wtype: 0 fp32, 1 bf16, 2 fp16 weights
    const int64_t* routers;        // M addresses of [S, d_in] fp32 routers; null: plain LoRA (n = 1, weight 1)
    const int64_t* A;              // M addresses of lora_a [S, r, d_in]
    const int64_t* B;              // M addresses of lora_b stored [S, r, d_out]
    const int64_t* d_out;          // [M]
    const int64_t* col;            // [M] each site's first column in out
    const int64_t* stat_row;       // [M] each site's row in RLStep::sel
    const float* scale;            // [S] per-slot scaling
    const int64_t* A_scale;        // wtype 3 (int8): M addresses of lora_a's row scales [S, r] fp32; else null
    const int64_t* B_scale;        // wtype 3: M addresses of lora_b's row scales [S, r] fp32; else null
};
struct RLStep {
    int64_t T, n;                  // rows; experts per bank at these sites (n <= 64)
    const int64_t* offset;         // [T] a row's bank slot offset, -1: not routed here
    const float* top_p;
    int64_t s_top_p;               // parameters: one value (stride 0) or one per row (stride 1)
    const float* keep_k;
    int64_t s_keep_k;
    const float* thr;
    int64_t s_thr;
    const float* q;
    int64_t s_q;
    float eps;
    int32_t nt;                    // threads
    // statistics (sel null: none): sel [rows, S] decisions that selected each slot, per site;
    // acc [S, 2 + 65 + NE] per bank offset: decisions, broadcasts, decisions by experts used (0..64),
    // decisions by normalised Shannon entropy bucket (NE = n_edges + 1: value <= edges[i] -> i);
    // esum [S]: the entropies' sum.
    int64_t* sel;
    int64_t* acc;
    double* esum;
    const float* edges;
    int64_t n_edges;
    // optional [M, T, n] logits and weights, [M, T] routing entropy (null: not written)
    float* logits;
    float* w;
    float* ent;
};

// A whole DynMoLE-routed (or plain LoRA: RLSites::routers null) linear of the sites `s` in one call and one
// parallel region: per row, the
// router dot products of its own bank's n experts only (logits[m, t, j] = routers[m][offset[t] + j] . x[t]),
// dynamic_route's routing, then (one thread) the plans and the statistics, then every site's segmented
// shrink (slot ranges per thread) and expand (column ranges per thread), added straight into
// out[:, col[m] : col[m] + d_out[m]] (rows ld apart).  x [T, d_in] contiguous fp32.
// Returns 4 when the shapes are not the AVX2 path's (d_in, d_out % 8): nothing is done, the caller falls back.
// What route_lora(.., s, st) would return before doing any work: 0 when it runs (a caller that cannot
// fall back afterwards, the fused decode forward, asks first), else its error code.
int route_lora_check(const RLSites* s, const RLStep* st) {
#ifdef MS_ROUTED_AVX2
    const int64_t M = s->M, T = st->T, n = st->n, S = s->S;
    if (s->d_in % 8 || s->wtype < 0 || s->wtype > 4) return 4;
    if (s->wtype >= 3 && (s->A_scale == nullptr || s->B_scale == nullptr)) return 4;
    if (s->wtype == 4) {  // packed B: the VNNI expand, on 16-column tiles and rank rows in fours
#ifdef MS_ROUTED_VNNI
        if (s->d_in % 16 || s->r % 4) return 4;
        for (int64_t m = 0; m < s->M; ++m)
            if (s->d_out[m] % 16) return 4;
#else
        return 4;
#endif
    }
    for (int64_t m = 0; m < M; ++m)
        if (s->d_out[m] % 8) return 4;
    if (n > 64 || n < 1 || (s->routers == nullptr && n != 1)) return 3;
    for (int64_t t = 0; t < T; ++t)
        if (st->offset[t] + n > S) return 2;
    return 0;
#else
    (void)s;
    (void)st;
    return 4;
#endif
}

// 1 when this build has the packed int8 expand (AVX-512 VNNI): an int8 pool then stores B packed.
int route_lora_packs_b() {
#ifdef MS_ROUTED_VNNI
    return 1;
#else
    return 0;
#endif
}

int route_lora(const float* x, float* out, int64_t ld, const RLSites* s, const RLStep* st) {
#ifdef MS_ROUTED_AVX2
    const int64_t M = s->M, T = st->T, n = st->n, S = s->S, d_in = s->d_in, r = s->r;
    if (const int rc = route_lora_check(s, st)) return rc;
    const bool plain = s->routers == nullptr;
    const bool packed = s->wtype == 4;  // int8, B packed for the VNNI expand (route_lora_check: wide shapes)
    const int64_t tn = T * n, blk = 3 * tn + 3 * S + 3;
    // int8 weights: site m's row scales [S, r] (null: none)
    const auto a_scale = [s](int64_t m) -> const float* {
        return s->A_scale != nullptr ? reinterpret_cast<const float*>(s->A_scale[m]) : nullptr;
    };
    const auto b_scale = [s](int64_t m) -> const float* {
        return s->B_scale != nullptr ? reinterpret_cast<const float*>(s->B_scale[m]) : nullptr;
    };
    bool wide = false;  // every shape a multiple of 16: the AVX-512 shrink and expand
#ifdef MS_ROUTED_AVX512
    wide = d_in % 16 == 0;
    for (int64_t m = 0; m < M; ++m) wide = wide && s->d_out[m] % 16 == 0;
#endif
    thread_local std::vector<int64_t> ibuf;
    thread_local std::vector<float> fbuf, h, lgb, wb, eb, shb;
    thread_local std::vector<uint8_t> bcb;
    thread_local std::vector<int64_t> work;  // shrink items: (m, g)
    ibuf.resize(static_cast<size_t>(M * blk));
    fbuf.resize(static_cast<size_t>(M * 2 * tn));
    h.resize(static_cast<size_t>(M * tn * r));
    float* lg = st->logits;
    float* wv = st->w;
    float* en = st->ent;
    if (!lg) { lgb.resize(static_cast<size_t>(M * tn)); lg = lgb.data(); }
    if (!wv) { wb.resize(static_cast<size_t>(M * tn)); wv = wb.data(); }
    if (!en) { eb.resize(static_cast<size_t>(M * T)); en = eb.data(); }
    shb.resize(static_cast<size_t>(M * T));
    bcb.resize(static_cast<size_t>(M * T));
    work.resize(static_cast<size_t>(M * S));
    const bool stats = st->sel != nullptr;
    // thread_local buffers are the calling thread's: the parallel region below reads them via these
    int64_t* const ibp = ibuf.data();
    float* const fbp = fbuf.data();
    float* const hp = h.data();
    int64_t* const wk = work.data();
    float* const sh = shb.data();
    uint8_t* const bc = bcb.data();
    int64_t nwork = 0;
    int rc = 0;
    const int nt = std::max(1, static_cast<int>(st->nt));
    int64_t units = 0;  // > 0: (site, bank) units taken by the threads in turn (split_by_bank), else slot ranges
                        // then column ranges
    thread_local std::vector<int64_t> ustart_v, uitems_v;
    thread_local std::vector<int64_t> udense_v;
    ustart_v.resize(static_cast<size_t>(M * S) + 1);
    uitems_v.resize(static_cast<size_t>(M * S));
    udense_v.resize(static_cast<size_t>(M * S));
    int64_t* const udense = udense_v.data();
    int64_t* const ustart = ustart_v.data();
    int64_t* const uitems = uitems_v.data();
    // the rows in bank order (a counting sort by slot offset, stable): the routing loop's threads then
    // take whole banks, each reading its banks' routers once (a bank's n rows stay in L1 for its rows)
    thread_local std::vector<int64_t> rord_v, rcnt_v;
    rord_v.resize(static_cast<size_t>(T));
    rcnt_v.assign(static_cast<size_t>(S) + 2, 0);
    int64_t* const rord = rord_v.data();
    const auto rkey = [st, S](int64_t t) {
        return static_cast<size_t>(std::clamp<int64_t>(st->offset[t], -1, S - 1) + 1);
    };
    for (int64_t t = 0; t < T; ++t) ++rcnt_v[rkey(t) + 1];
    for (int64_t k = 1; k < S + 2; ++k) rcnt_v[k] += rcnt_v[k - 1];
    for (int64_t t = 0; t < T; ++t) rord[rcnt_v[rkey(t)]++] = t;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < M * T; ++j) {
            const int64_t m = j / T, t = rord[j - m * T], i = m * T + t;
            float* lr = lg + i * n;
            float* wr = wv + i * n;
            const int64_t off = st->offset[t];
            if (off < 0 || plain) {  // plain LoRA: the row's one slot, weight 1
                for (int64_t e = 0; e < n; ++e) lr[e] = wr[e] = 0.f;
                if (off >= 0) wr[0] = 1.f;
                en[i] = sh[i] = 0.f;
                bc[i] = 0;
                continue;
            }
            const float* R = reinterpret_cast<const float*>(s->routers[m]) + off * d_in;
            const float* xr = x + t * d_in;
            dots(xr, R, d_in, n, lr);
            bool b = false;
            en[i] = route_row(lr, n, st->top_p[t * st->s_top_p], st->keep_k[t * st->s_keep_k], st->thr[t * st->s_thr],
                              st->q[t * st->s_q], st->eps, wr, stats ? sh + i : nullptr, &b);
            bc[i] = b;
        }
#pragma omp single
        {
            for (int64_t m = 0; m < M && !rc; ++m) {
                int64_t* ib = ibp + m * blk;
                float* fb = fbp + m * 2 * tn;
                rc = build_plan(1, wv + m * tn, n, st->offset, T, n, S, ib + 2 * tn, fb + tn, ib, ib + tn, fb,
                                ib + 3 * tn, ib + 3 * tn + S, ib + 3 * tn + 2 * S, ib + 3 * tn + 3 * S);
                const int64_t G = ib[3 * tn + 3 * S + 1];
                for (int64_t g = 0; g < G; ++g) wk[nwork++] = m * S + g;
            }
            if (stats && !rc) {
                const int64_t ne = st->n_edges + 1, width = 2 + 65 + ne;
                for (int64_t m = 0; m < M; ++m) {
                    int64_t* sel = st->sel + s->stat_row[m] * S;
                    for (int64_t t = 0; t < T; ++t) {
                        const int64_t off = st->offset[t], i = m * T + t;
                        if (off < 0) continue;
                        const float* wr = wv + i * n;
                        int64_t k = 0;
                        for (int64_t e = 0; e < n; ++e)
                            if (wr[e] != 0.f) {
                                ++k;
                                ++sel[off + e];
                            }
                        int64_t bucket = 0;
                        while (bucket < st->n_edges && st->edges[bucket] < sh[i]) ++bucket;
                        int64_t* a = st->acc + off * width;
                        a[0] += 1;
                        a[1] += bc[i];
                        a[2 + k] += 1;
                        a[2 + 65 + bucket] += 1;
                        st->esum[off] += sh[i];
                    }
                }
            }
#ifdef MS_ROUTED_AVX512
            if (wide && !rc && nt > 1) units = split_by_bank(s, st, ibp, blk, wk, nwork, nt, ustart, uitems, udense);
#endif
        }  // implicit barrier: the plans are ready
#ifdef MS_ROUTED_AVX512
        if (!rc && units > 0) {  // (site, bank) units, largest first, to whichever thread is free: a unit's
                                 // rows and columns are its own, so each segment's shrink then expand, no barrier
            thread_local std::vector<float> hsv;
            hsv.resize(static_cast<size_t>(4 * n * r));
            Prefetcher pa, pb;
#pragma omp for schedule(dynamic, 1) nowait  // the region's end is the barrier
            for (int64_t u = 0; u < units; ++u) {
                if (udense[u] >= 0) {  // a dense unit (dense_unit)
                    const int64_t m = wk[uitems[ustart[u]]] / S;
                    with_wtype(s->wtype, [&](auto tag) {
                        using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
                        dense_unit(x, d_in, reinterpret_cast<const W*>(s->A[m]), reinterpret_cast<const W*>(s->B[m]),
                                   r, n, s->d_out[m], udense[u], st->offset, T, wv + m * tn, s->scale, a_scale(m),
                                   b_scale(m), out + s->col[m], ld, hsv.data(), packed);
                    });
                    continue;
                }
                for (int64_t idx = ustart[u]; idx < ustart[u + 1]; ++idx) {
                    const int64_t k = uitems[idx], m = wk[k] / S, g = wk[k] - m * S;
                    const int64_t* ib = ibp + m * blk;
                    const float* fb = fbp + m * 2 * tn;
                    const int64_t* seg = ib + 3 * tn;
                    const int64_t slot = seg[g], len = seg[2 * S + g], d_out = s->d_out[m], nvec = d_out / 16;
                    float* hm = hp + m * tn * r;
                    with_wtype(s->wtype, [&](auto tag) {
                        using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
                        const W* a = reinterpret_cast<const W*>(s->A[m]);
                        const W* b = reinterpret_cast<const W*>(s->B[m]);
                        const int64_t groups = (len + 3) / 4;
                        // while shrinking, this segment's B; while expanding, the unit's next segment's A
                        pb.arm(b + slot * r * d_out, r * d_out * static_cast<int64_t>(sizeof(W)),
                               groups * ((r + 3) / 4) * (d_in / 16));
                        const W* na = nullptr;
                        if (idx + 1 < ustart[u + 1]) {
                            const int64_t k2 = uitems[idx + 1], m2 = wk[k2] / S, g2 = wk[k2] - m2 * S;
                            na = reinterpret_cast<const W*>(s->A[m2]) + ibp[m2 * blk + 3 * tn + g2] * r * d_in;
                        }
                        pa.arm(na, r * d_in * static_cast<int64_t>(sizeof(W)),
                               groups * (packed ? (nvec + 3) / 4 * (r / 4) : (nvec + 11) / 12 * r));
                        ShrinkAvx512<W> blk16{d_in, r, &pb, packed};
                        shrink_segment(x, d_in, a, r, ib, slot, seg[S + g], len, hm, blk16);
                        const float* as = a_scale(m);
                        scale_h(hm, r, seg[S + g], len, as != nullptr ? as + slot * r : nullptr);
                        expand16(packed, hm, b, r, d_out, T, ib, fb, s->scale, 0.f, seg + g, seg + S + g,
                                         seg + 2 * S + g, 1, out + s->col[m], ld, false, 0, nvec, hsv.data(), &pa,
                                         b_scale(m));
                    });
                }
            }
        } else
#endif
        if (!rc) {
#pragma omp for schedule(static)  // contiguous slot ranges: one A stream per thread
            for (int64_t k = 0; k < nwork; ++k) {
                const int64_t m = wk[k] / S, g = wk[k] - m * S;
                const int64_t* ib = ibp + m * blk;
                const int64_t* seg = ib + 3 * tn;
                float* hm = hp + m * tn * r;
                with_wtype(s->wtype, [&](auto tag) {
                    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
#ifdef MS_ROUTED_AVX512
                    if (wide) {
                        ShrinkAvx512<W> blk16{d_in, r, nullptr, packed};
                        shrink_segment(x, d_in, reinterpret_cast<const W*>(s->A[m]), r, ib, seg[g], seg[S + g],
                                       seg[2 * S + g], hm, blk16);
                        return;
                    }
#endif
                    ShrinkAvx2<W> blk2{d_in, r};
                    shrink_segment(x, d_in, reinterpret_cast<const W*>(s->A[m]), r, ib, seg[g], seg[S + g],
                                   seg[2 * S + g], hm, blk2);
                });
                const float* as = a_scale(m);
                scale_h(hm, r, seg[S + g], seg[2 * S + g], as != nullptr ? as + seg[g] * r : nullptr);
            }  // implicit barrier: h is ready
            const int th = omp_get_thread_num(), nth = omp_get_num_threads();
            std::vector<float> hsv(static_cast<size_t>(4 * r));
            float* hs = hsv.data();
            for (int64_t m = 0; m < M; ++m) {
                const int64_t* ib = ibp + m * blk;
                const float* fb = fbp + m * 2 * tn;
                const int64_t* seg = ib + 3 * tn;
                const int64_t G = seg[3 * S + 1], nvec = s->d_out[m] / (wide ? 16 : 8);
                const float* hm = hp + m * tn * r;
                float* o = out + s->col[m];
                const int64_t v0 = nvec * th / nth, v1 = nvec * (th + 1) / nth;
                if (G == 0) continue;
                with_wtype(s->wtype, [&](auto tag) {
                    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
#ifdef MS_ROUTED_AVX512
                    if (wide) {
                        expand16(packed, hm, reinterpret_cast<const W*>(s->B[m]), r, s->d_out[m], T, ib, fb, s->scale,
                                 0.f, seg, seg + S, seg + 2 * S, G, o, ld, false, v0, v1, hs, nullptr, b_scale(m));
                        return;
                    }
#endif
                    expand_cols<V8>(hm, reinterpret_cast<const W*>(s->B[m]), r, s->d_out[m], T, ib, fb, s->scale, 0.f,
                                    seg, seg + S, seg + 2 * S, G, o, ld, false, v0, v1, hs, nullptr, b_scale(m));
                });
            }
        }
    }
    return rc;
#else
    return 4;
#endif
}

}  // extern "C"

#ifdef MS_ROUTED_AVX512
// route_lora's work by (site, bank) unit: a bank's rows are its own and a site's columns its own, so
// threads that take whole units write disjoint parts of out and need no barrier between a segment's
// shrink and its expand, and each streams its segments' A and B whole (the column split reads every B
// in pieces, at ~70% of the shrink's rate).  A unit's cost is its segments' weights plus their pairs'
// work, (d_in + d_out) * (4 + pairs) per segment.  The units go largest first to whichever thread is
// free (route_lora's dynamic loop): the two cores of a small machine do not run at one speed (a
// neighbour's load, the memory bus), and a static split waits for the slower one.  0 (the column split
// runs) when even on equal threads the units cannot balance within 20% (largest first to the least
// loaded), e.g. one bank, or one bank with most of the rows.
// Out: the number of units; ustart [units + 1], uitems: unit u's work items (indices into wk) at
// ustart[u]..ustart[u + 1].
// A bank's rows for a dense unit: a prefill's many (fp32 / fp16 / bf16 and row-layout int8 pools), two for
// a packed int8 pool, whose segments are short streams (an int8 expert's A is 9-24 KB): over 8 banks'
// decode rows, route_lora_ab.py measured the dense units 0.82-0.87x the segments at 4 rows a bank, 0.76x at
// 8 and 0.97x at 2 (neutral at 1), where the row-layout int8 pool ran 1.06x slower dense at 4.
constexpr int64_t DENSE_MIN_ROWS = 16;
constexpr int64_t DENSE_MIN_ROWS_PACKED = 2;
static int64_t split_by_bank(const RLSites* s, const RLStep* st, const int64_t* ibp, int64_t blk, const int64_t* wk,
                             int64_t nwork, int nt, int64_t* ustart, int64_t* uitems, int64_t* udense) {
    const int64_t T = st->T, n = st->n, S = s->S, tn = T * n, M = s->M;
    // scratch: no allocation per call
    thread_local std::vector<int64_t> banks, bidx, order, rank, pos, rows, segs, pairs;
    thread_local std::vector<double> cost, load;
    banks.clear();
    rows.clear();
    bidx.resize(static_cast<size_t>(S));
    for (int64_t t = 0; t < T; ++t) {
        const int64_t off = st->offset[t];
        if (off < 0) continue;
        int64_t b = 0;
        while (b < static_cast<int64_t>(banks.size()) && banks[b] != off) ++b;
        if (b == static_cast<int64_t>(banks.size())) {
            banks.push_back(off);
            rows.push_back(0);
            for (int64_t e = 0; e < n; ++e) bidx[off + e] = b;
        }
        ++rows[b];
    }
    const int64_t nb = static_cast<int64_t>(banks.size()), nu = M * nb;  // unit m * nb + bank
    if (nu < nt) return 0;
    const auto unit = [&](int64_t k) {
        const int64_t m = wk[k] / S, g = wk[k] - m * S;
        return m * nb + bidx[ibp[m * blk + 3 * tn + g]];
    };
    cost.assign(static_cast<size_t>(nu), 0.0);
    segs.assign(static_cast<size_t>(nu), 0);
    pairs.assign(static_cast<size_t>(nu), 0);
    double total = 0.0;
    for (int64_t k = 0; k < nwork; ++k) {
        const int64_t m = wk[k] / S, g = wk[k] - m * S;
        const int64_t* seg = ibp + m * blk + 3 * tn;
        const double c = static_cast<double>(s->d_in + s->d_out[m]) * static_cast<double>(4 + seg[2 * S + g]);
        cost[unit(k)] += c;
        ++segs[unit(k)];
        pairs[unit(k)] += seg[2 * S + g];
        total += c;
    }
    order.resize(static_cast<size_t>(nu));
    for (int64_t u = 0; u < nu; ++u) order[u] = u;
    std::stable_sort(order.begin(), order.end(), [](int64_t a, int64_t b) { return cost[a] > cost[b]; });
    load.assign(static_cast<size_t>(nt), 0.0);
    for (const int64_t u : order) *std::min_element(load.begin(), load.end()) += cost[u];
    if (*std::max_element(load.begin(), load.end()) > 1.2 * total / nt) return 0;
    rank.resize(static_cast<size_t>(nu));
    int64_t units = 0;
    for (const int64_t u : order) rank[u] = cost[u] > 0.0 ? units++ : -1;
    for (int64_t u = 0; u <= units; ++u) ustart[u] = 0;
    for (int64_t k = 0; k < nwork; ++k) ++ustart[rank[unit(k)] + 1];
    for (int64_t u = 0; u < units; ++u) ustart[u + 1] += ustart[u];
    pos.assign(ustart, ustart + units);
    for (int64_t k = 0; k < nwork; ++k) uitems[pos[rank[unit(k)]]++] = k;
    // dense (the bank's offset; else -1): enough rows of the bank (DENSE_MIN_ROWS: a prefill's many, or a
    // packed pool's decode rows), every expert of the bank with pairs here (its weights are read anyway)
    // and at least half of the (row, expert) products selected (the rest are computed for weight 0).  A
    // decode step's few rows per bank keep the segments on the other pools: their software prefetch of
    // the next segment's weights is worth more there.
    const int64_t min_rows = s->wtype == 4 ? DENSE_MIN_ROWS_PACKED : DENSE_MIN_ROWS;
    for (int64_t u = 0; u < nu; ++u)
        if (rank[u] >= 0) {
            const int64_t b = u % nb;
            udense[rank[u]] = rows[b] >= min_rows && segs[u] == n && 2 * pairs[u] >= rows[b] * n ? banks[b] : -1;
        }
    return units;
}
#endif
