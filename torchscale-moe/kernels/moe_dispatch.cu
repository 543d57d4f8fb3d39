// Dispatch (tokens into the [E * capacity, C] expert buffer), combine (gate-weighted gather
// back to [S, C]) and the gate-weight gradient, for f32, bf16 and f16. Accumulation is in f32.
//
// A choice i = s * k + j of token s lives in buffer row rows[i] (MOE_NONE when not kept);
// inv[r] is the choice filling buffer row r (MOE_NONE for an empty slot).

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MOE_NONE 0xffffffffu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half(x);
}

// out[r, :] = w[inv[r]] * x[inv[r] / k, :] (w == nullptr: weight 1, an exact copy), 0 for an
// empty row. Grid: (n_rows, ceil(C / blockDim.x)); every element of out is written.
template <typename T>
__device__ void dispatch(const T *x, const unsigned *inv, const T *w, unsigned k,
                         unsigned n_rows, unsigned C, T *out) {
    unsigned r = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= n_rows || c >= C) return;
    unsigned i = inv[r];
    T v;
    if (i == MOE_NONE) {
        v = from_f32<T>(0.0f);
    } else if (w == nullptr) {
        v = x[(size_t)(i / k) * C + c];
    } else {
        v = from_f32<T>(to_f32(w[i]) * to_f32(x[(size_t)(i / k) * C + c]));
    }
    out[(size_t)r * C + c] = v;
}

// out[s, :] = sum_j w[s*k+j] * buf[rows[s*k+j], :] over kept choices (w == nullptr: weight
// 1), in choice order, accumulated in f32. Grid: (S, ceil(C / blockDim.x)).
template <typename T>
__device__ void combine(const T *buf, const unsigned *rows, const T *w, unsigned k,
                        unsigned S, unsigned C, T *out) {
    unsigned s = blockIdx.x;
    unsigned c = blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= S || c >= C) return;
    float acc = 0.0f;
    for (unsigned j = 0; j < k; ++j) {
        unsigned i = s * k + j;
        unsigned r = rows[i];
        if (r == MOE_NONE) continue;
        float g = w == nullptr ? 1.0f : to_f32(w[i]);
        acc += g * to_f32(buf[(size_t)r * C + c]);
    }
    out[(size_t)s * C + c] = from_f32<T>(acc);
}

// out[i] = <gout[i / k, :], buf[rows[i], :]> for kept choices, 0 otherwise: the gradient of
// combine with respect to its weights. One warp per choice; blockDim.x must be a multiple of 32.
template <typename T>
__device__ void gate_grad(const T *gout, const T *buf, const unsigned *rows,
                          unsigned n_choices, unsigned k, unsigned C, T *out) {
    unsigned warps = blockDim.x / 32;
    unsigned i = blockIdx.x * warps + threadIdx.x / 32;
    unsigned lane = threadIdx.x & 31;
    if (i >= n_choices) return;
    unsigned r = rows[i];
    float acc = 0.0f;
    if (r != MOE_NONE) {
        const T *g = gout + (size_t)(i / k) * C;
        const T *b = buf + (size_t)r * C;
        for (unsigned c = lane; c < C; c += 32) acc += to_f32(g[c]) * to_f32(b[c]);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[i] = from_f32<T>(acc);
}

#define MOE_INSTANCES(NAME, T)                                                             \
    extern "C" __global__ void moe_dispatch_##NAME(const T *x, const unsigned *inv,        \
                                                   const T *w, unsigned k,                 \
                                                   unsigned n_rows, unsigned C, T *out) {  \
        dispatch<T>(x, inv, w, k, n_rows, C, out);                                         \
    }                                                                                      \
    extern "C" __global__ void moe_combine_##NAME(const T *buf, const unsigned *rows,      \
                                                  const T *w, unsigned k, unsigned S,      \
                                                  unsigned C, T *out) {                    \
        combine<T>(buf, rows, w, k, S, C, out);                                            \
    }                                                                                      \
    extern "C" __global__ void moe_gate_grad_##NAME(const T *gout, const T *buf,           \
                                                    const unsigned *rows,                  \
                                                    unsigned n_choices, unsigned k,        \
                                                    unsigned C, T *out) {                  \
        gate_grad<T>(gout, buf, rows, n_choices, k, C, out);                               \
    }

MOE_INSTANCES(f32, float)
MOE_INSTANCES(bf16, __nv_bfloat16)
MOE_INSTANCES(f16, __half)
