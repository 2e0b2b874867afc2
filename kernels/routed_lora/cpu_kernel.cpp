// Segmented routed-LoRA shrink and expand for the CPU (see cpu_ops.py for the math and shapes).
// Plain C ABI, called through ctypes: no torch headers, so it compiles in about a second.
// Weights are fp32 or bf16 (W = float / uint16_t); activations and accumulation are fp32.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// h[p, j] = sum_i A[slot(p), j, i] * x[token(p), i] for every pair p, segment by segment.
// Four pairs share each pass over a row of A, so A is read from memory once per segment.
template <typename W>
static void shrink(const float* x, int64_t d_in, const W* A, int64_t r, const int64_t* pair_token,
                   const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                   int64_t G, float* h, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t g = 0; g < G; ++g) {
        const W* a = A + seg_slot[g] * r * d_in;
        const int64_t p0 = seg_start[g], n = seg_len[g];
        for (int64_t pb = 0; pb < n; pb += 4) {
            const int64_t nb = std::min<int64_t>(4, n - pb);
            const float* x0 = x + pair_token[p0 + pb] * d_in;
            const float* x1 = nb > 1 ? x + pair_token[p0 + pb + 1] * d_in : x0;
            const float* x2 = nb > 2 ? x + pair_token[p0 + pb + 2] * d_in : x0;
            const float* x3 = nb > 3 ? x + pair_token[p0 + pb + 3] * d_in : x0;
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
                float* hp = h + (p0 + pb) * r + j;
                hp[0] = s0;
                if (nb > 1) hp[r] = s1;
                if (nb > 2) hp[2 * r] = s2;
                if (nb > 3) hp[3 * r] = s3;
            }
        }
    }
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

extern "C" {

// wbits: 32 for fp32 weights, 16 for bf16.  b_rows_are_r: B is laid out [S, r, d_out].  h: scratch [P, r] fp32.  out: [T, d_out] fp32.
int routed_lora_cpu(const float* x, int64_t T, int64_t d_in, const void* A, const void* B,
                    int64_t r, int64_t d_out, int wbits, const int64_t* pair_token,
                    const float* pair_weight, const float* scale, float scale_scalar,
                    const int64_t* seg_slot, const int64_t* seg_start, const int64_t* seg_len,
                    int64_t G, float* h, float* out, int b_rows_are_r, int nt) {
    if (wbits == 32) {
        shrink(x, d_in, static_cast<const float*>(A), r, pair_token, seg_slot, seg_start, seg_len, G, h, nt);
        expand(h, static_cast<const float*>(B), r, d_out, T, pair_token, pair_weight, scale,
               scale_scalar, seg_slot, seg_start, seg_len, G, out, b_rows_are_r, nt);
    } else if (wbits == 16) {
        shrink(x, d_in, static_cast<const uint16_t*>(A), r, pair_token, seg_slot, seg_start, seg_len, G, h, nt);
        expand(h, static_cast<const uint16_t*>(B), r, d_out, T, pair_token, pair_weight, scale,
               scale_scalar, seg_slot, seg_start, seg_len, G, out, b_rows_are_r, nt);
    } else {
        return 1;
    }
    return 0;
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
            std::stable_sort(idx, idx + k, [wr](int64_t a, int64_t b) { return wr[a] > wr[b]; });
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
    std::vector<int64_t> cnt(static_cast<size_t>(S) + 1, 0);
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

}  // extern "C"
