// Exact (erf) GELU, element-wise with a grid-stride loop: y = 0.5 x (1 + erf(x / sqrt 2)),
// dx = g (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)). CUDA's erff and expf are
// accurate to a few ulp (no fast math), as the host kernels are.

#include "common.cuh"

#define GELU_INV_SQRT2 0.70710678118654752f
#define GELU_INV_SQRT_2PI 0.39894228040143268f

template <typename T>
__device__ void gelu_fwd(const T *x, T *y, size_t n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = to_f32(x[i]);
        y[i] = from_f32<T>(0.5f * v * (1.0f + erff(v * GELU_INV_SQRT2)));
    }
}

template <typename T>
__device__ void gelu_bwd(const T *x, const T *g, T *dx, size_t n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = to_f32(x[i]);
        float cdf = 0.5f * (1.0f + erff(v * GELU_INV_SQRT2));
        float pdf = expf(-0.5f * v * v);
        dx[i] = from_f32<T>(to_f32(g[i]) * fmaf(v * pdf, GELU_INV_SQRT_2PI, cdf));
    }
}

#define GELU_INSTANCES(NAME, T)                                                               \
    extern "C" __global__ void gelu_fwd_##NAME(const T *x, T *y, size_t n) {                  \
        gelu_fwd<T>(x, y, n);                                                                 \
    }                                                                                         \
    extern "C" __global__ void gelu_bwd_##NAME(const T *x, const T *g, T *dx, size_t n) {     \
        gelu_bwd<T>(x, g, dx, n);                                                             \
    }

FUSED_FOR_TYPES(GELU_INSTANCES)
