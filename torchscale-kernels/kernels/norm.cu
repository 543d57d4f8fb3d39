// LayerNorm over the last dimension (biased variance, affine; f32 statistics) of s = x, or of
// the residual sum s = alpha * x + fx, forward and backward. Weight and bias are f32 (the host
// casts them). `stats` holds [mean, rstd] per row.
//
// Backward: with x^ = (s - mean) rstd, ds = rstd (g w - mean(g w) - x^ mean(g w x^)) (one block
// per row), and dw = sum_rows g x^, db = sum_rows g as per-chunk partial column sums (one thread
// per column, rows split into chunks) reduced by a second kernel: deterministic, no atomics.

#include "common.cuh"

// Element i of s: x, or alpha * x + fx rounded as the host rounds it (product, then sum).
template <typename T>
__device__ __forceinline__ float load_s(const T *x, const T *fx, float alpha, size_t i) {
    float v = to_f32(x[i]);
    return fx == nullptr ? v : __fadd_rn(__fmul_rn(v, alpha), to_f32(fx[i]));
}

// One block per row: the row's [mean, rstd] into stats, and y = x^ w + b unless y is null.
template <typename T>
__device__ void ln_fwd(const T *x, const T *fx, float alpha, const float *w, const float *b,
                       T *y, float *stats, unsigned rows, unsigned d, float eps) {
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float sum = 0.0f;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) sum += load_s(x, fx, alpha, base + c);
    float mean = block_sum(sum) / (float)d;
    float sq = 0.0f;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        float t = load_s(x, fx, alpha, base + c) - mean;
        sq += t * t;
    }
    float var = block_sum(sq) / (float)d;
    float rstd = 1.0f / sqrtf(var + eps);
    if (y != nullptr) {
        for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
            float xh = (load_s(x, fx, alpha, base + c) - mean) * rstd;
            y[base + c] = from_f32<T>(fmaf(xh, w[c], b[c]));
        }
    }
    if (threadIdx.x == 0) {
        stats[2 * (size_t)r] = mean;
        stats[2 * (size_t)r + 1] = rstd;
    }
}

// One block per row: out1 = scale1 ds, and out2 = scale2 ds unless out2 is null.
template <typename T>
__device__ void ln_bwd_dx(const T *x, const T *fx, float alpha, const T *g, const float *w,
                          const float *stats, T *out1, float scale1, T *out2, float scale2,
                          unsigned rows, unsigned d) {
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float mean = stats[2 * (size_t)r], rstd = stats[2 * (size_t)r + 1];
    float2 acc = make_float2(0.0f, 0.0f);
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        float gw = to_f32(g[base + c]) * w[c];
        float xh = (load_s(x, fx, alpha, base + c) - mean) * rstd;
        acc.x += gw;
        acc.y = fmaf(gw, xh, acc.y);
    }
    acc = block_sum2(acc);
    float m_gw = acc.x / (float)d, m_gwx = acc.y / (float)d;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        float xh = (load_s(x, fx, alpha, base + c) - mean) * rstd;
        float ds = rstd * fmaf(-xh, m_gwx, fmaf(to_f32(g[base + c]), w[c], -m_gw));
        out1[base + c] = from_f32<T>(scale1 * ds);
        if (out2 != nullptr) out2[base + c] = from_f32<T>(scale2 * ds);
    }
}

// Grid (ceil(d / blockDim.x), chunks): partial[chunk, 0:d] = sum g x^ and partial[chunk, d:2d]
// = sum g over the chunk's rows, for this thread's column.
template <typename T>
__device__ void ln_bwd_wb(const T *x, const T *fx, float alpha, const T *g, const float *stats,
                          float *partial, unsigned rows, unsigned d, unsigned rows_per_chunk) {
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned chunk = blockIdx.y;
    if (c >= d) return;
    size_t r0 = (size_t)chunk * rows_per_chunk;
    size_t r1 = min((size_t)rows, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    for (size_t r = r0; r < r1; ++r) {
        size_t i = r * d + c;
        float gv = to_f32(g[i]);
        float xh = (load_s(x, fx, alpha, i) - stats[2 * r]) * stats[2 * r + 1];
        dw = fmaf(gv, xh, dw);
        db += gv;
    }
    float *out = partial + (size_t)chunk * 2 * d;
    out[c] = dw;
    out[d + c] = db;
}

// out[i] = sum over chunks of partial[chunk, i], for i < n (= 2d).
extern "C" __global__ void ln_wb_reduce(const float *partial, unsigned chunks, unsigned n,
                                        float *out) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.0f;
    for (unsigned k = 0; k < chunks; ++k) s += partial[(size_t)k * n + i];
    out[i] = s;
}

#define NORM_INSTANCES(NAME, T)                                                               \
    extern "C" __global__ void ln_fwd_##NAME(const T *x, const T *fx, float alpha,            \
                                             const float *w, const float *b, T *y,            \
                                             float *stats, unsigned rows, unsigned d,         \
                                             float eps) {                                     \
        ln_fwd<T>(x, fx, alpha, w, b, y, stats, rows, d, eps);                                \
    }                                                                                         \
    extern "C" __global__ void ln_bwd_dx_##NAME(const T *x, const T *fx, float alpha,         \
                                                const T *g, const float *w,                   \
                                                const float *stats, T *out1, float scale1,    \
                                                T *out2, float scale2, unsigned rows,         \
                                                unsigned d) {                                 \
        ln_bwd_dx<T>(x, fx, alpha, g, w, stats, out1, scale1, out2, scale2, rows, d);         \
    }                                                                                         \
    extern "C" __global__ void ln_bwd_wb_##NAME(const T *x, const T *fx, float alpha,         \
                                                const T *g, const float *stats,               \
                                                float *partial, unsigned rows, unsigned d,    \
                                                unsigned rows_per_chunk) {                    \
        ln_bwd_wb<T>(x, fx, alpha, g, stats, partial, rows, d, rows_per_chunk);               \
    }

FUSED_FOR_TYPES(NORM_INSTANCES)
