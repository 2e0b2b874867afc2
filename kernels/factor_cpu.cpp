// The factorised FFN of FactorLLM (adapters/factor/kernel.py `factor_route` + `factor_ffn`) for the
// CPU in one call: routing, then only the chosen (token, expert) pairs.  For decode batches, where
// the dense FFN is a few packed GEMVs and a dozen torch ops per layer would cost more than the
// expert GEMVs they prepare.  Plain C ABI, fp32, OpenMP; compiled by kernels/cpp_build.py.
//
// Shapes: x [T, H]; router [E, H]; wgu [E, 2m, H] (expert e's gate rows then its up rows);
// wd [E, m, H] (expert e's columns of down, transposed); bias [E, 2m] or null.
//   out[t] = sum over t's top-k experts e of scale * wd[e]^T (silu(g) * u),  [g | u] = wgu[e] x[t] (+ bias[e])
// chosen [T, K]: each token's experts (by decreasing router logit; ties: lower index first).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float hsum(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_hadd_ps(q, q);
    return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#endif

// y[k] = row . x[k] for n <= 4 vectors x (row read once for all of them).
static inline void dots(const float* row, const float* const* x, int n, int64_t H, float* y) {
    int64_t i = 0;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 8 <= H; i += 8) {
        const __m256 w = _mm256_loadu_ps(row + i);
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[0] + i), a0);
        if (n > 1) a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[1] + i), a1);
        if (n > 2) a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[2] + i), a2);
        if (n > 3) a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[3] + i), a3);
    }
    s[0] = hsum(a0), s[1] = hsum(a1), s[2] = hsum(a2), s[3] = hsum(a3);
#endif
    for (; i < H; ++i)
        for (int k = 0; k < n; ++k) s[k] += row[i] * x[k][i];
    for (int k = 0; k < n; ++k) y[k] = s[k];
}

// acc[k] += a[k] * row for n <= 4 accumulators.
static inline void axpys(const float* row, const float* a, int n, int64_t H, float* const* acc) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 c[4];
    for (int k = 0; k < n; ++k) c[k] = _mm256_set1_ps(a[k]);
    for (; i + 8 <= H; i += 8) {
        const __m256 w = _mm256_loadu_ps(row + i);
        for (int k = 0; k < n; ++k)
            _mm256_storeu_ps(acc[k] + i, _mm256_fmadd_ps(c[k], w, _mm256_loadu_ps(acc[k] + i)));
    }
#endif
    for (; i < H; ++i)
        for (int k = 0; k < n; ++k) acc[k][i] += a[k] * row[i];
}

extern "C" {

int factor_ffn_cpu(const float* x, int64_t T, int64_t H, int64_t E, int64_t m, int64_t K, const float* router,
                   const float* wgu, const float* wd, const float* bias, float scale, float* out,
                   int64_t* chosen, int nt) {
    if (K < 1 || K > E || E > 256) return 3;
    // 1. routing: top-k router logits per token
    std::vector<int64_t> members;  // tokens of each expert, expert-major
    std::vector<int64_t> start(E + 1, 0);
    {
        std::vector<float> lg(E);
        std::vector<int64_t> idx(E);
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * H;
            for (int64_t e = 0; e < E; ++e) dots(router + e * H, &xt, 1, H, &lg[e]);
            for (int64_t e = 0; e < E; ++e) idx[e] = e;
            std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), [&lg](int64_t a, int64_t b) {
                return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
            });
            for (int64_t k = 0; k < K; ++k) {
                chosen[t * K + k] = idx[k];
                ++start[idx[k] + 1];
            }
        }
        for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
        members.resize(static_cast<size_t>(T * K));
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t t = 0; t < T; ++t)  // tokens ascend within each expert
            for (int64_t k = 0; k < K; ++k) members[fill[chosen[t * K + k]]++] = t;
    }
    const int64_t P = T * K;
    std::vector<float> act(static_cast<size_t>(P * m));  // per pair (expert-major), the scaled activation
    const int nth = std::max(1, nt);
    std::vector<float> part(static_cast<size_t>(nth) * T * H, 0.f);  // per-thread down sums
    std::memset(out, 0, sizeof(float) * T * H);
#pragma omp parallel num_threads(nth)
    {
        const int th = omp_get_thread_num(), nthr = omp_get_num_threads();
        float* mine = part.data() + static_cast<size_t>(th) * T * H;
        for (int64_t e = 0; e < E; ++e) {
            const int64_t p0 = start[e], ne = start[e + 1] - p0;
            if (!ne) continue;
            const float* W = wgu + e * 2 * m * H;
            const float* D = wd + e * m * H;
            // 2. gate | up rows of expert e for its tokens (rows split over threads), activation
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; ++i) {
                for (int64_t c = 0; c < ne; c += 4) {
                    const int n = static_cast<int>(std::min<int64_t>(4, ne - c));
                    const float* xs[4];
                    for (int k = 0; k < n; ++k) xs[k] = x + members[p0 + c + k] * H;
                    float g[4], u[4];
                    dots(W + i * H, xs, n, H, g);
                    dots(W + (m + i) * H, xs, n, H, u);
                    for (int k = 0; k < n; ++k) {
                        float gv = g[k], uv = u[k];
                        if (bias) gv += bias[e * 2 * m + i], uv += bias[e * 2 * m + m + i];
                        act[(p0 + c + k) * m + i] = scale * gv / (1.f + std::exp(-gv)) * uv;
                    }
                }
            }  // implicit barrier: the activations are complete
            // 3. down: rows of wd[e] split over threads, each into its own partial sums
            const int64_t r0 = m * th / nthr, r1 = m * (th + 1) / nthr;
            for (int64_t c = 0; c < ne; c += 4) {
                const int n = static_cast<int>(std::min<int64_t>(4, ne - c));
                float* acc[4];
                for (int k = 0; k < n; ++k) acc[k] = mine + members[p0 + c + k] * H;
                for (int64_t i = r0; i < r1; ++i) {
                    float a[4];
                    for (int k = 0; k < n; ++k) a[k] = act[(p0 + c + k) * m + i];
                    axpys(D + i * H, a, n, H, acc);
                }
            }
        }
#pragma omp barrier
        // 4. out = sum of the threads' partial sums (columns split over threads)
        const int64_t h0 = H * th / nthr, h1 = H * (th + 1) / nthr;
        for (int64_t t = 0; t < T; ++t)
            for (int q = 0; q < nthr; ++q) {
                const float* src = part.data() + (static_cast<size_t>(q) * T + t) * H;
                for (int64_t h = h0; h < h1; ++h) out[t * H + h] += src[h];
            }
    }
    return 0;
}

}  // extern "C"
