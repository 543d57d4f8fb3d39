// Summed label-smoothed cross entropy over [N, V] logits (fairseq's label_smoothed_nll_loss).
//
// ce_fwd_rows, one block per row, in one read of the row after its max: lse[r] = (max,
// ln sum exp(x - max)) and rowsum[r] = (-lp[t], -sum_v lp[v]) in f64 (the host sums in f64);
// ignored rows get (NaN, NaN) and (0, 0). ce_reduce (one block) sums the rows into
// out = [loss, nll] (f32). ce_bwd, one block per row, writes the gradient of
// g0 loss + g1 nll: (a + b V) p_v - b - a [v = t], 0 on ignored rows, reading (g0, g1) from the
// device (no host round trip).

#include "common.cuh"

__device__ __forceinline__ bool ce_kept(unsigned t, unsigned has_ignore, unsigned ignore) {
    return !(has_ignore != 0 && t == ignore);
}

template <typename T>
__device__ void ce_fwd_rows(const T *x, const unsigned *targets, unsigned has_ignore,
                            unsigned ignore, unsigned smooth, float *lse, double *rowsum,
                            unsigned n, unsigned v) {
    unsigned r = blockIdx.x;
    if (r >= n) return;
    unsigned t = targets[r];
    if (!ce_kept(t, has_ignore, ignore)) {
        if (threadIdx.x == 0) {
            lse[2 * (size_t)r] = __int_as_float(0x7fc00000);
            lse[2 * (size_t)r + 1] = __int_as_float(0x7fc00000);
            rowsum[2 * (size_t)r] = 0.0;
            rowsum[2 * (size_t)r + 1] = 0.0;
        }
        return;
    }
    size_t base = (size_t)r * v;
    float m = -INFINITY;
    for (unsigned c = threadIdx.x; c < v; c += blockDim.x) m = fmaxf(m, to_f32(x[base + c]));
    m = block_max(m);
    float2 acc = make_float2(0.0f, 0.0f);
    for (unsigned c = threadIdx.x; c < v; c += blockDim.x) {
        float dv = to_f32(x[base + c]) - m;
        acc.x += expf(dv);
        acc.y += dv;
    }
    acc = block_sum2(acc);
    if (threadIdx.x == 0) {
        float ln_sum = logf(acc.x);
        double ln = (double)ln_sum;
        lse[2 * (size_t)r] = m;
        lse[2 * (size_t)r + 1] = ln_sum;
        rowsum[2 * (size_t)r] = ln - (double)(to_f32(x[base + t]) - m);
        rowsum[2 * (size_t)r + 1] = smooth != 0 ? (double)v * ln - (double)acc.y : 0.0;
    }
}

// One block of 256 threads: out = [a nll + eps_i smooth, nll] over the n rows.
extern "C" __global__ void ce_reduce(const double *rowsum, unsigned n, double a, double eps_i,
                                     float *out) {
    __shared__ double part[2][256];
    double nll = 0.0, sm = 0.0;
    for (unsigned r = threadIdx.x; r < n; r += blockDim.x) {
        nll += rowsum[2 * (size_t)r];
        sm += rowsum[2 * (size_t)r + 1];
    }
    part[0][threadIdx.x] = nll;
    part[1][threadIdx.x] = sm;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h /= 2) {
        if (threadIdx.x < h) {
            part[0][threadIdx.x] += part[0][threadIdx.x + h];
            part[1][threadIdx.x] += part[1][threadIdx.x + h];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = (float)(a * part[0][0] + eps_i * part[1][0]);
        out[1] = (float)part[0][0];
    }
}

template <typename T>
__device__ void ce_bwd(const T *x, const unsigned *targets, unsigned has_ignore, unsigned ignore,
                       const float *lse, const float *grad, double eps, double eps_i, T *dx,
                       unsigned n, unsigned v) {
    unsigned r = blockIdx.x;
    if (r >= n) return;
    size_t base = (size_t)r * v;
    unsigned t = targets[r];
    if (!ce_kept(t, has_ignore, ignore)) {
        for (unsigned c = threadIdx.x; c < v; c += blockDim.x) dx[base + c] = from_f32<T>(0.0f);
        return;
    }
    double g0 = (double)grad[0], g1 = (double)grad[1];
    double a = g0 * (1.0 - eps - eps_i) + g1;
    double b = g0 * eps_i;
    float cf = (float)(a + b * (double)v), a32 = (float)a, b32 = (float)b;
    float m = lse[2 * (size_t)r], ln_sum = lse[2 * (size_t)r + 1];
    for (unsigned c = threadIdx.x; c < v; c += blockDim.x) {
        float d = cf * expf((to_f32(x[base + c]) - m) - ln_sum) - b32;
        if (c == t) d -= a32;
        dx[base + c] = from_f32<T>(d);
    }
}

#define CE_INSTANCES(NAME, T)                                                                 \
    extern "C" __global__ void ce_fwd_rows_##NAME(const T *x, const unsigned *targets,        \
                                                  unsigned has_ignore, unsigned ignore,       \
                                                  unsigned smooth, float *lse,                \
                                                  double *rowsum, unsigned n, unsigned v) {   \
        ce_fwd_rows<T>(x, targets, has_ignore, ignore, smooth, lse, rowsum, n, v);            \
    }                                                                                         \
    extern "C" __global__ void ce_bwd_##NAME(const T *x, const unsigned *targets,             \
                                             unsigned has_ignore, unsigned ignore,            \
                                             const float *lse, const float *grad, double eps, \
                                             double eps_i, T *dx, unsigned n, unsigned v) {   \
        ce_bwd<T>(x, targets, has_ignore, ignore, lse, grad, eps, eps_i, dx, n, v);           \
    }

FUSED_FOR_TYPES(CE_INSTANCES)
