// One AdamW update in place, in one pass: the parameter p (f32, bf16 or f16), its f32 moments m
// and v, from the gradient g (f32, bf16 or f16). The arithmetic is the host kernel's operation
// for operation, each rounded on its own (__f*_rn: no FMA contraction), so both agree bit for bit:
//
//   x = p decay;  m' = m + (g - m)(1 - b1);  v' = v b2 + (g g)(1 - b2)
//   p' = x - (m' / (sqrt(v') inv_bc2 + eps)) step_size

#include "common.cuh"

template <typename P, typename G>
__device__ void adamw(P *p, const G *g, float *m, float *v, size_t n, float decay,
                      float one_minus_b1, float b2, float one_minus_b2, float inv_bc2,
                      float eps, float step_size) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float gv = to_f32(g[i]);
        float x = __fmul_rn(to_f32(p[i]), decay);
        float mo = m[i];
        float mn = __fadd_rn(mo, __fmul_rn(__fsub_rn(gv, mo), one_minus_b1));
        float vn = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gv, gv), one_minus_b2));
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vn), inv_bc2), eps);
        x = __fsub_rn(x, __fmul_rn(__fdiv_rn(mn, denom), step_size));
        m[i] = mn;
        v[i] = vn;
        p[i] = from_f32<P>(x);
    }
}

#define ADAMW_INSTANCE(PN, P, GN, G)                                                          \
    extern "C" __global__ void adamw_##PN##_##GN(P *p, const G *g, float *m, float *v,        \
                                                 size_t n, float decay, float one_minus_b1,   \
                                                 float b2, float one_minus_b2, float inv_bc2, \
                                                 float eps, float step_size) {                \
        adamw<P, G>(p, g, m, v, n, decay, one_minus_b1, b2, one_minus_b2, inv_bc2, eps,       \
                    step_size);                                                               \
    }
#define ADAMW_FOR_GRADS(PN, P)                   \
    ADAMW_INSTANCE(PN, P, f32, float)            \
    ADAMW_INSTANCE(PN, P, bf16, __nv_bfloat16)   \
    ADAMW_INSTANCE(PN, P, f16, __half)

FUSED_FOR_TYPES(ADAMW_FOR_GRADS)
