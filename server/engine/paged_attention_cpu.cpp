// Attention of single query tokens over the paged KV cache, for the CPU (see paged_attention_cpu.py).
// Plain C ABI, called through ctypes; fp32 throughout.
//
//   out[r, h, :] = sum_{p in window(r)} softmax_p(scale * q[r, h, :] . K[s, p, h / G, :]) V[s, p, h / G, :]
//
// for every row r in `rows` (an index into q/out [T, H, D]), where s = row_seq[r'] picks the
// sequence's block table, p runs over the positions lo..ctx_len-1 of that sequence
// (lo = max(0, ctx_len - window) when window > 0), and K/V of position p live in cache block
// block_table[s, p / BS] at offset p % BS. Cache layout: [num_blocks, BS, HKV, D].
// One task per (row, kv head): its G query heads share every K/V row load.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" int paged_attention_cpu(
    const float* q, float* out, int64_t H, int64_t HKV, int64_t D,
    const float* k_cache, const float* v_cache, int64_t BS,
    const int64_t* rows, const int64_t* row_seq, const int64_t* ctx_lens, int64_t N,
    const int64_t* block_tables, int64_t max_blocks, float scale, int64_t window, int nt) {
    if (H % HKV != 0) return 1;
    const int64_t G = H / HKV;
    const int64_t tasks = N * HKV;
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> scores;
        std::vector<float> acc(G * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t i = task / HKV, kvh = task % HKV;
            const int64_t r = rows[i];
            const int64_t ctx = ctx_lens[i];
            const int64_t lo = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
            const int64_t n = ctx - lo;
            const int64_t* bt = block_tables + row_seq[i] * max_blocks;
            const float* qg = q + (r * H + kvh * G) * D;
            scores.resize(G * n);
            // scores[g, p - lo] = scale * q[g] . k[p]
            for (int64_t p = lo; p < ctx; ++p) {
                const float* k = k_cache + ((bt[p / BS] * BS + p % BS) * HKV + kvh) * D;
                for (int64_t g = 0; g < G; ++g) {
                    const float* qv = qg + g * D;
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < D; ++d) s += qv[d] * k[d];
                    scores[g * n + (p - lo)] = s * scale;
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
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t p = lo; p < ctx; ++p) {
                const float* v = v_cache + ((bt[p / BS] * BS + p % BS) * HKV + kvh) * D;
                for (int64_t g = 0; g < G; ++g) {
                    const float w = scores[g * n + (p - lo)];
                    float* a = acc.data() + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
                }
            }
            float* o = out + (r * H + kvh * G) * D;
            std::copy(acc.begin(), acc.end(), o);
        }
    }
    return 0;
}
