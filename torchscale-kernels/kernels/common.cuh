// Shared by the fused kernels: f32 <-> storage type conversions and block reductions.
//
// Every kernel reads f32, bf16 or f16 and computes in f32 (statistics included), as the CPU
// kernels do; the entry points are instantiated per storage type with an `_f32`, `_bf16` or
// `_f16` suffix. Row kernels run one block per row; blockDim.x is a multiple of 32, at most 1024.
#pragma once

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);  // round to nearest even, as half::bf16::from_f32
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half(x);  // round to nearest even, as half::f16::from_f32
}

__device__ __forceinline__ float2 warp_sum2(float2 v) {
    for (int o = 16; o > 0; o >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    return v;
}

// The block-wide sums of (v.x, v.y); every thread gets them. Every thread of the block must call
// it (it synchronises). The leading barrier lets one kernel call it several times.
__device__ __forceinline__ float2 block_sum2(float2 v) {
    __shared__ float2 part[32];
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum2(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : make_float2(0.0f, 0.0f);
    return warp_sum2(v);
}

__device__ __forceinline__ float block_sum(float v) {
    return block_sum2(make_float2(v, 0.0f)).x;
}

// The block-wide max (NaN skipped, as fmaxf and the host's comparison loop skip it).
__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define FUSED_FOR_TYPES(MACRO) \
    MACRO(f32, float)          \
    MACRO(bf16, __nv_bfloat16) \
    MACRO(f16, __half)
