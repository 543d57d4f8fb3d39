// Softmax over the last dimension, one block per row: forward y = exp(x - max) / sum, backward
// dx = y (g - sum(g y)) from the saved output. A row of only -inf (a fully masked attention row)
// gives zeros, as the host does: it subtracts 0 instead of -inf and scales by 0 instead of 1 / 0.

#include "common.cuh"

template <typename T>
__device__ void softmax_fwd(const T *x, T *y, unsigned rows, unsigned d) {
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float m = -INFINITY;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) m = fmaxf(m, to_f32(x[base + c]));
    m = block_max(m);
    if (m == -INFINITY) m = 0.0f;
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) s += expf(to_f32(x[base + c]) - m);
    s = block_sum(s);
    float inv = s == 0.0f ? 0.0f : 1.0f / s;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x)
        y[base + c] = from_f32<T>(expf(to_f32(x[base + c]) - m) * inv);
}

template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, unsigned rows, unsigned d) {
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    size_t base = (size_t)r * d;
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x)
        s = fmaf(to_f32(y[base + c]), to_f32(g[base + c]), s);
    s = block_sum(s);
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x)
        dx[base + c] = from_f32<T>(to_f32(y[base + c]) * (to_f32(g[base + c]) - s));
}

#define SOFTMAX_INSTANCES(NAME, T)                                                          \
    extern "C" __global__ void softmax_fwd_##NAME(const T *x, T *y, unsigned rows,          \
                                                  unsigned d) {                             \
        softmax_fwd<T>(x, y, rows, d);                                                      \
    }                                                                                       \
    extern "C" __global__ void softmax_bwd_##NAME(const T *y, const T *g, T *dx,            \
                                                  unsigned rows, unsigned d) {              \
        softmax_bwd<T>(y, g, dx, rows, d);                                                  \
    }

FUSED_FOR_TYPES(SOFTMAX_INSTANCES)
