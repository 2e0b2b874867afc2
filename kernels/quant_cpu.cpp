// Weight-only quantized linear for the CPU: y[M, N] = x[M, K] @ W^T (+ bias), fp32 activations in and
// out, W stored as int4 (group-wise: w = s * q + z', q in [0, 15], s and z' fp32 per (column, group))
// or int8 (w = s[n] * q).  Plain C ABI, called through ctypes (kernels/quant_cpu.py) and, by the
// address of ms_qlinear, from other C++ code; compiled by kernels/cpp_build.py with -march=native.
//
// Packed layout (ms_qpack_*, once at load): output columns in blocks of 32 (the last block padded
// with zero codes and scales), each block's codes contiguous:
//   int4: block b, k-pair p: 32 bytes, byte j = q[32b+j, 2p] | q[32b+j, 2p+1] << 4
//         scales after the codes: [block][group][s[32], z'[32]]
//   int8: block b, k: 32 bytes, byte j = q[32b+j, k];  scales [block * 32]
//
// Arithmetic (fixed, whatever M, the row's neighbours or the thread count): per (m, n)
//   acc = 0;  for k = 0..K-1:  acc = fma(x[m, k], w[n, k], acc)   with int4 w = fma(q, s, z'), int8 w = q
//   y = acc + bias[n]   (int8: fma(acc, s[n], bias[n]), or acc * s[n] without bias)
// so a row's output is bitwise the same alone or in any batch.  Threads split the column blocks only,
// taking them in turn (schedule(dynamic)): when the host or the server's event loop delays one thread,
// the other takes its blocks instead of waiting for it at the region's end (fixed halves ran 3-6%
// slower in the median on a shared 2-core host; BENCHMARKS.md, thirteenth session).
// Two schedules with that arithmetic: small M dequantizes in registers, each weight used by all M
// rows at once; larger M dequantizes a whole column block into a per-thread buffer once (L2) and
// runs 12-row register tiles over it.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 32;  // output columns per block

struct QWeight {  // kernels/quant_cpu.py QWeightStruct
    int32_t kind;    // 4 or 8
    int32_t group;   // int4: input columns per group (even); int8: 0
    int64_t N, K;
    const uint8_t* codes;
    const float* scales;
    const float* bias;  // [N] or null
};

inline int64_t n_blocks(int64_t N) { return (N + NB - 1) / NB; }
inline int64_t codes_bytes(const QWeight& w) {
    return n_blocks(w.N) * NB * (w.kind == 4 ? w.K / 2 : w.K);
}
inline int64_t scales_floats(int kind, int64_t N, int64_t K, int group) {
    return kind == 4 ? n_blocks(N) * (K / group) * 2 * NB : n_blocks(N) * NB;
}

// The block's 32 outputs of one row: acc (int8: times s) plus bias (int8: one fma), columns >= N dropped.
inline void finish_scalar(const QWeight& w, int64_t b, const float* acc, float* yrow) {
    for (int64_t j = 0; j < NB && b * NB + j < w.N; ++j) {
        const int64_t n = b * NB + j;
        const float b = w.bias ? w.bias[n] : 0.f;
        yrow[n] = w.kind == 8 ? (w.bias ? std::fma(acc[j], w.scales[n], b) : acc[j] * w.scales[n])
                              : (w.bias ? acc[j] + b : acc[j]);
    }
}

#ifdef __AVX512F__

inline __mmask16 tail_mask(const QWeight& w, int64_t b, int half) {
    const int64_t left = w.N - b * NB - half * 16;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

inline void finish(const QWeight& w, int64_t b, __m512 a0, __m512 a1, float* yrow) {
    float* out = yrow + b * NB;
    __m512 a[2] = {a0, a1};
    for (int h = 0; h < 2; ++h) {
        const __mmask16 mk = tail_mask(w, b, h);
        if (!mk) continue;
        // explicit fma / mul / add, so no compiler contraction can make the two schedules differ
        const __m512 s = w.kind == 8 ? _mm512_loadu_ps(w.scales + b * NB + h * 16) : _mm512_setzero_ps();
        const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(mk, w.bias + b * NB + h * 16) : _mm512_setzero_ps();
        if (w.kind == 8) a[h] = w.bias ? _mm512_fmadd_ps(a[h], s, bias) : _mm512_mul_ps(a[h], s);
        else if (w.bias) a[h] = _mm512_add_ps(a[h], bias);
        _mm512_mask_storeu_ps(out + h * 16, mk, a[h]);
    }
}

// Dequantized weights of block b at k-pair p (int4): w[k][half], k = 2p, 2p + 1.
struct Pair { __m512 w[2][2]; };

inline Pair int4_pair(const uint8_t* codes, const __m512* sz) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)codes);
    const __m512i lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1));
    const __m512i m4 = _mm512_set1_epi32(0xF);
    Pair p;
    p.w[0][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(lo, m4)), sz[0], sz[2]);
    p.w[0][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(hi, m4)), sz[1], sz[3]);
    p.w[1][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(lo, 4)), sz[0], sz[2]);
    p.w[1][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(hi, 4)), sz[1], sz[3]);
    return p;
}

inline void int8_k(const uint8_t* codes, __m512* w) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)codes);
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
}

// Small M: MR rows (all of them) x CB blocks from b0, weights dequantized in registers.
template <int MR, int CB>
void direct(const QWeight& w, int64_t b0, const float* x, float* y) {
    const int64_t K = w.K;
    __m512 acc[MR][CB][2];
    for (int m = 0; m < MR; ++m)
        for (int c = 0; c < CB; ++c) acc[m][c][0] = acc[m][c][1] = _mm512_setzero_ps();
    if (w.kind == 4) {
        const int64_t G = w.group, n_groups = K / G, row_bytes = K / 2 * NB;
        const float* sc = w.scales;
        for (int64_t g = 0; g < n_groups; ++g) {
            __m512 sz[CB][4];
            for (int c = 0; c < CB; ++c) {
                const float* s = sc + ((b0 + c) * n_groups + g) * 2 * NB;
                sz[c][0] = _mm512_loadu_ps(s), sz[c][1] = _mm512_loadu_ps(s + 16);
                sz[c][2] = _mm512_loadu_ps(s + 32), sz[c][3] = _mm512_loadu_ps(s + 48);
            }
            for (int64_t p = g * G / 2; p < (g + 1) * G / 2; ++p) {
                for (int c = 0; c < CB; ++c) {
                    const Pair q = int4_pair(w.codes + (b0 + c) * row_bytes + p * NB, sz[c]);
                    for (int t = 0; t < 2; ++t)
                        for (int m = 0; m < MR; ++m) {
                            const __m512 xv = _mm512_set1_ps(x[m * K + 2 * p + t]);
                            acc[m][c][0] = _mm512_fmadd_ps(xv, q.w[t][0], acc[m][c][0]);
                            acc[m][c][1] = _mm512_fmadd_ps(xv, q.w[t][1], acc[m][c][1]);
                        }
                }
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k)
            for (int c = 0; c < CB; ++c) {
                __m512 q[2];
                int8_k(w.codes + ((b0 + c) * K + k) * NB, q);
                for (int m = 0; m < MR; ++m) {
                    const __m512 xv = _mm512_set1_ps(x[m * K + k]);
                    acc[m][c][0] = _mm512_fmadd_ps(xv, q[0], acc[m][c][0]);
                    acc[m][c][1] = _mm512_fmadd_ps(xv, q[1], acc[m][c][1]);
                }
            }
    }
    for (int m = 0; m < MR; ++m)
        for (int c = 0; c < CB; ++c) finish(w, b0 + c, acc[m][c][0], acc[m][c][1], y + m * w.N);
}

// Block b's weights dequantized into buf [K][32] (the same values ``direct`` computes).
void dequant_block(const QWeight& w, int64_t b, float* buf) {
    const int64_t K = w.K;
    if (w.kind == 4) {
        const int64_t G = w.group, n_groups = K / G;
        for (int64_t g = 0; g < n_groups; ++g) {
            const float* s = w.scales + (b * n_groups + g) * 2 * NB;
            const __m512 sz[4] = {_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16), _mm512_loadu_ps(s + 32),
                                  _mm512_loadu_ps(s + 48)};
            for (int64_t p = g * G / 2; p < (g + 1) * G / 2; ++p) {
                const Pair q = int4_pair(w.codes + b * (K / 2 * NB) + p * NB, sz);
                for (int t = 0; t < 2; ++t) {
                    _mm512_store_ps(buf + (2 * p + t) * NB, q.w[t][0]);
                    _mm512_store_ps(buf + (2 * p + t) * NB + 16, q.w[t][1]);
                }
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            __m512 q[2];
            int8_k(w.codes + (b * K + k) * NB, q);
            _mm512_store_ps(buf + k * NB, q[0]);
            _mm512_store_ps(buf + k * NB + 16, q[1]);
        }
    }
}

// MR rows of x against block b's dequantized weights buf [K][32].
template <int MR>
void tile(const QWeight& w, int64_t b, const float* buf, const float* x, float* y) {
    const int64_t K = w.K;
    __m512 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const __m512 w0 = _mm512_load_ps(buf + k * NB), w1 = _mm512_load_ps(buf + k * NB + 16);
        for (int m = 0; m < MR; ++m) {
            const __m512 xv = _mm512_set1_ps(x[m * K + k]);
            acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
        }
    }
    for (int m = 0; m < MR; ++m) finish(w, b, acc[m][0], acc[m][1], y + m * w.N);
}

constexpr int TILE_M = 12;

template <int MR>
void tile_upto(int rows, const QWeight& w, int64_t b, const float* buf, const float* x, float* y) {
    if constexpr (MR == 0) {
        (void)rows, (void)w, (void)b, (void)buf, (void)x, (void)y;
    } else if (rows == MR) {
        tile<MR>(w, b, buf, x, y);
    } else {
        tile_upto<MR - 1>(rows, w, b, buf, x, y);
    }
}

template <int MR>
void direct_rows(const QWeight& w, int64_t b0, int64_t nb, const float* x, float* y) {
    constexpr int CB = MR == 1 ? 4 : MR <= 4 ? 2 : 1;  // about 8-16 accumulators
    int64_t b = b0;
    for (; b + CB <= b0 + nb; b += CB) direct<MR, CB>(w, b, x, y);
    for (; b < b0 + nb; ++b) direct<MR, 1>(w, b, x, y);
}

constexpr int64_t DIRECT_MAX_M = 8;

void qlinear(const QWeight& w, const float* x, int64_t M, float* y, int nt) {
    const int64_t nblk = n_blocks(w.N);
    if (M <= DIRECT_MAX_M) {
        // chunks of 4 blocks (a multiple of every CB) so the split does not change the schedule's shape
        const int64_t chunks = (nblk + 3) / 4;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t b0 = c * 4, nb = b0 + 4 <= nblk ? 4 : nblk - b0;
            switch (M) {
                case 1: direct_rows<1>(w, b0, nb, x, y); break;
                case 2: direct_rows<2>(w, b0, nb, x, y); break;
                case 3: direct_rows<3>(w, b0, nb, x, y); break;
                case 4: direct_rows<4>(w, b0, nb, x, y); break;
                case 5: direct_rows<5>(w, b0, nb, x, y); break;
                case 6: direct_rows<6>(w, b0, nb, x, y); break;
                case 7: direct_rows<7>(w, b0, nb, x, y); break;
                default: direct_rows<8>(w, b0, nb, x, y); break;
            }
        }
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        float* buf = (float*)std::aligned_alloc(64, (size_t)w.K * NB * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nblk; ++b) {
            dequant_block(w, b, buf);
            int64_t m = 0;
            for (; m + TILE_M <= M; m += TILE_M) tile<TILE_M>(w, b, buf, x + m * w.K, y + m * w.N);
            if (m < M) tile_upto<TILE_M - 1>((int)(M - m), w, b, buf, x + m * w.K, y + m * w.N);
        }
        std::free(buf);
    }
}

#else  // portable scalar path (same arithmetic, no SIMD)

inline float weight_at(const QWeight& w, int64_t b, int64_t j, int64_t k) {
    if (w.kind == 8) return (float)(int8_t)w.codes[(b * w.K + k) * NB + j];
    const uint8_t byte = w.codes[b * (w.K / 2 * NB) + (k / 2) * NB + j];
    const float q = (float)((k & 1) ? byte >> 4 : byte & 0xF);
    const int64_t n_groups = w.K / w.group;
    const float* s = w.scales + (b * n_groups + k / w.group) * 2 * NB;
    return std::fma(q, s[j], s[NB + j]);
}

void qlinear(const QWeight& w, const float* x, int64_t M, float* y, int nt) {
    const int64_t nblk = n_blocks(w.N);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < nblk; ++b)
        for (int64_t m = 0; m < M; ++m) {
            float acc[NB];
            for (int64_t j = 0; j < NB; ++j) {
                float a = 0.f;
                for (int64_t k = 0; k < w.K; ++k) a = std::fma(x[m * w.K + k], weight_at(w, b, j, k), a);
                acc[j] = a;
            }
            finish_scalar(w, b, acc, y + m * w.N);
        }
}

#endif

}  // namespace

extern "C" {

// Bytes of the packed buffer for a [N, K] weight (codes, then scales 64-byte aligned).
int64_t ms_qpack_bytes(int kind, int64_t N, int64_t K, int group) {
    const int64_t codes = n_blocks(N) * NB * (kind == 4 ? K / 2 : K);
    return (codes + 63) / 64 * 64 + scales_floats(kind, N, K, group) * (int64_t)sizeof(float);
}

static void fill(QWeight* w, int kind, int64_t N, int64_t K, int group, uint8_t* out) {
    w->kind = kind, w->group = group, w->N = N, w->K = K, w->bias = nullptr;
    w->codes = out;
    w->scales = (const float*)(out + (codes_bytes(*w) + 63) / 64 * 64);
}

// int4: codes2 uint8 [N, K/2] (even column in the low nibble), scale, zero fp32 [N, K/group] with
// w = scale * (q - 8) + zero.  out: ms_qpack_bytes(4, ...) bytes, 64-byte aligned.  Returns 0, or 1
// for a shape it does not take (K or group odd, K % group).
int ms_qpack_int4(const uint8_t* codes2, const float* scale, const float* zero, int64_t N, int64_t K, int group,
                  uint8_t* out, void* weight) {
    if (group <= 0 || group % 2 || K % group || N <= 0) return 1;
    QWeight* w = (QWeight*)weight;
    fill(w, 4, N, K, group, out);
    const int64_t nblk = n_blocks(N), half = K / 2, n_groups = K / group;
    uint8_t* codes = out;
    float* sc = (float*)w->scales;
    std::memset(out, 0, (size_t)ms_qpack_bytes(4, N, K, group));
    for (int64_t b = 0; b < nblk; ++b)
        for (int64_t j = 0; j < NB && b * NB + j < N; ++j) {
            const int64_t n = b * NB + j;
            for (int64_t p = 0; p < half; ++p) codes[b * half * NB + p * NB + j] = codes2[n * half + p];
            for (int64_t g = 0; g < n_groups; ++g) {
                const float s = scale[n * n_groups + g], z = zero[n * n_groups + g];
                sc[(b * n_groups + g) * 2 * NB + j] = s;
                sc[(b * n_groups + g) * 2 * NB + NB + j] = z - 8.f * s;
            }
        }
    return 0;
}

// int8: codes int8 [N, K], scales fp32 [N] (w = scales[n] * q).
int ms_qpack_int8(const int8_t* codes_in, const float* scales, int64_t N, int64_t K, uint8_t* out, void* weight) {
    if (N <= 0 || K <= 0) return 1;
    QWeight* w = (QWeight*)weight;
    fill(w, 8, N, K, 0, out);
    std::memset(out, 0, (size_t)ms_qpack_bytes(8, N, K, 0));
    float* sc = (float*)w->scales;
    for (int64_t n = 0; n < N; ++n) {
        const int64_t b = n / NB, j = n % NB;
        for (int64_t k = 0; k < K; ++k) out[(b * K + k) * NB + j] = (uint8_t)codes_in[n * K + k];
        sc[n] = scales[n];
    }
    return 0;
}

// 1 when this build has the SIMD schedules (AVX-512), 0 for the portable scalar loop (correct, slow:
// callers with a faster kernel of their own prefer it then).
int ms_qlinear_simd(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

// y [M, N] = x [M, K] @ W^T (+ bias), fp32, row-major and contiguous; weight: a packed QWeight.
// Parallel over column blocks with nthreads OpenMP threads: call it outside a parallel region
// (inside one it runs on the calling thread alone, same results).
void ms_qlinear(const void* weight, const float* x, int64_t M, float* y, int nthreads) {
    if (M <= 0) return;
    qlinear(*(const QWeight*)weight, x, M, y, nthreads > 0 ? nthreads : 1);
}

}  // extern "C"
