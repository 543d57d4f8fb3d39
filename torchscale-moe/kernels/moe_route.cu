// Routing decisions on the GPU: top-1/top-2 choices, then capacity slots by a per-expert
// cumulative sum over tokens (first choices before second choices), as the host router in
// src/router/{top1,top2}.rs does. Gate math is f32 (the router's default fp32 gating).
//
// Status codes (src/cuda/route.rs maps them to ChoiceStatus):
//   0 kept, 1 dropped by capacity, 2 second choice not sampled, 3 padding.

#include <stdint.h>

#define MOE_NONE 0xffffffffu
#define SCAN_THREADS 256

// Index of the largest of v[0..n), the first on ties, skipping `skip` (as the host's argmax:
// a NaN never wins a comparison).
__device__ __forceinline__ unsigned argmax_f32(const float *v, unsigned n, unsigned skip) {
    unsigned best = MOE_NONE;
    for (unsigned i = 0; i < n; ++i) {
        if (i == skip) continue;
        if (best == MOE_NONE || v[i] > v[best]) best = i;
    }
    return best == MOE_NONE ? 0 : best;
}

// One thread per token. Writes expert[s*k + j] and flags[s] (bit 0: padding, bit 1: the
// second choice is taken). policy: 0 all, 1 random (uniform [S]), 2 sampling (gumbel [S, E],
// added to the logits in double and rounded to f32, as the host does).
extern "C" __global__ void moe_topk(const float *probs, const float *logits,
                                    const double *draws, const uint8_t *padding,
                                    unsigned S, unsigned E, unsigned k, unsigned policy,
                                    unsigned normalize_before, float eps,
                                    unsigned *expert, uint8_t *flags) {
    unsigned s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    const float *p = probs + (size_t)s * E;
    const float *lg = logits + (size_t)s * E;
    unsigned e1 = argmax_f32(p, E, MOE_NONE);
    uint8_t f = (padding != nullptr && padding[s] != 0) ? 1 : 0;
    expert[(size_t)s * k] = e1;
    if (k == 2) {
        unsigned e2;
        if (policy == 2) {
            const double *g = draws + (size_t)s * E;
            unsigned best = MOE_NONE;
            float bv = 0.0f;
            for (unsigned i = 0; i < E; ++i) {
                if (i == e1) continue;
                float v = (float)((double)lg[i] + g[i]);
                if (best == MOE_NONE || v > bv) { best = i; bv = v; }
            }
            e2 = best == MOE_NONE ? 0 : best;
        } else {
            e2 = argmax_f32(lg, E, e1);
        }
        expert[(size_t)s * k + 1] = e2;
        bool take = true;
        if (policy == 1) {
            float g1 = p[e1], g2 = p[e2];
            // IEEE f32 add/div (no fast math) equal the host's f64 op rounded to f32.
            if (normalize_before) g2 = __fdiv_rn(g2, fmaxf(__fadd_rn(g1, g2), eps));
            take = 2.0 * (double)g2 > draws[s];
        }
        if (take) f |= 2;
    }
    flags[s] = f;
}

// Exclusive scan of one 0/1 flag per thread over a block of SCAN_THREADS; returns the prefix
// and sets *total to the block's sum.
__device__ __forceinline__ unsigned block_scan(unsigned flag, unsigned *total) {
    __shared__ unsigned warp_sums[SCAN_THREADS / 32];
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned mask = __ballot_sync(0xffffffffu, flag);
    unsigned in_warp = __popc(mask & ((1u << lane) - 1u));
    if (lane == 0) warp_sums[warp] = __popc(mask);
    __syncthreads();
    unsigned before = 0, sum = 0;
    for (unsigned w = 0; w < SCAN_THREADS / 32; ++w) {
        unsigned c = warp_sums[w];
        if (w < warp) before += c;
        sum += c;
    }
    __syncthreads();
    *total = sum;
    return before + in_warp;
}

// One block of SCAN_THREADS per expert e: walks the tokens in order and gives each choice of
// e its slot (Tutel-style fused cumsum + location). First choices take slots 0, 1, ...; second
// choices start after every (non-padding) first choice of e, dropped ones included. Writes
// slot, status and rows (e * capacity + slot when kept, else MOE_NONE) for every choice whose
// expert is e, so each output element is written by exactly one thread; first_counts[e] too.
extern "C" __global__ void moe_capacity(const unsigned *expert, const uint8_t *flags,
                                        unsigned S, unsigned k, unsigned capacity,
                                        unsigned *slot, unsigned *status, unsigned *rows,
                                        unsigned *first_counts) {
    unsigned e = blockIdx.x;
    unsigned base = 0;
    for (unsigned j = 0; j < k; ++j) {
        for (unsigned start = 0; start < S; start += SCAN_THREADS) {
            unsigned s = start + threadIdx.x;
            bool mine = s < S && expert[(size_t)s * k + j] == e;
            uint8_t f = s < S ? flags[s] : 0;
            bool pad = (f & 1) != 0;
            bool skipped = j == 1 && (f & 2) == 0;
            unsigned total;
            unsigned pos = block_scan(mine && !pad && !skipped ? 1u : 0u, &total);
            if (mine) {
                size_t i = (size_t)s * k + j;
                unsigned loc = base + pos;
                if (pad || skipped) {
                    slot[i] = 0;
                    status[i] = pad ? 3 : 2;
                    rows[i] = MOE_NONE;
                } else {
                    slot[i] = loc;
                    status[i] = loc < capacity ? 0 : 1;
                    rows[i] = loc < capacity ? e * capacity + loc : MOE_NONE;
                }
            }
            base += total;
        }
        if (j == 0 && threadIdx.x == 0) first_counts[e] = base;
    }
}

// inv[r] = MOE_NONE for every buffer row r (run before moe_inverse).
extern "C" __global__ void moe_fill_none(unsigned *inv, unsigned n) {
    unsigned r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < n) inv[r] = MOE_NONE;
}

// inv[rows[i]] = i for every kept choice i: the choice (token * k + j) that fills each buffer
// row. Kept choices own distinct rows, so there is no write conflict.
extern "C" __global__ void moe_inverse(const unsigned *rows, unsigned n_choices,
                                       unsigned n_rows, unsigned *inv) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_choices) return;
    unsigned r = rows[i];
    if (r != MOE_NONE && r < n_rows) inv[r] = i;
}
