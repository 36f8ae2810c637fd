// LayerNorm over the last dimension, forward and backward (reference: src/device/cpu/layernorm.rs).
//
// Layout: x, y, dy, dx are [rows, dim] row-major in T (f32 or bf16); gamma, beta [dim] in T;
// mean, rstd [rows] f32 (saved by the forward for the backward); dgamma, dbeta [dim] f32,
// accumulated (+=) as parameter gradients are.
//
// Launch: block = 256 threads = 8 warps, one warp per row (llm.c's layernorm kernel 3 shape):
// forward grid = ceil(rows / 8); backward grid = min(ceil(rows / 8), max_blocks), warps walk rows
// with a grid stride. Backward dynamic shared memory: 2 * dim f32 (per-block dgamma/dbeta).
//
// Why it is fast: a row of hidden size <= 4096 is at most 16 KB, so the warp's second and third
// passes over it hit L1; there is no __syncthreads in the forward at all and warp shuffles do the
// reductions. The backward folds dgamma/dbeta per block in shared memory (shared atomics) and
// issues one global atomicAdd per column per block, instead of one per row.
#include "common.cuh"

namespace r3 {

constexpr int kLnWarps = 8;

template <class T>
__device__ __forceinline__ void layernorm_fwd_impl(const T* __restrict__ x,
                                                   const T* __restrict__ gamma,
                                                   const T* __restrict__ beta, T* __restrict__ y,
                                                   float* __restrict__ mean,
                                                   float* __restrict__ rstd, int rows, int dim,
                                                   float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * kLnWarps + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together: no barrier follows
    const T* xr = x + row * dim;
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) s += load(xr, i);
    const float m = warp_sum(s) / dim;
    float v = 0.f;
    for (int i = lane; i < dim; i += 32) {
        float d = load(xr, i) - m;
        v += d * d;
    }
    const float rs = rsqrtf(warp_sum(v) / dim + eps);
    T* yr = y + row * dim;
    for (int i = lane; i < dim; i += 32)
        store(yr, i, (load(xr, i) - m) * rs * load(gamma, i) + load(beta, i));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

template <class T>
__device__ __forceinline__ void layernorm_bwd_impl(const T* __restrict__ x,
                                                   const T* __restrict__ gamma,
                                                   const float* __restrict__ mean,
                                                   const float* __restrict__ rstd,
                                                   const T* __restrict__ dy, T* __restrict__ dx,
                                                   float* __restrict__ dgamma,
                                                   float* __restrict__ dbeta, int rows, int dim) {
    R3_DYN_SMEM(float, acc);  // [0, dim): dgamma, [dim, 2 dim): dbeta of this block
    for (int i = threadIdx.x; i < 2 * dim; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (long long row = (long long)blockIdx.x * kLnWarps + (threadIdx.x >> 5); row < rows;
         row += (long long)gridDim.x * kLnWarps) {
        const T* xr = x + row * dim;
        const T* dyr = dy + row * dim;
        const float m = mean[row], rs = rstd[row];
        // dx_i = rs * (dxhat_i - mean(dxhat) - xhat_i * mean(dxhat * xhat)), dxhat = dy * gamma
        float a = 0.f, b = 0.f;
        for (int i = lane; i < dim; i += 32) {
            const float xhat = (load(xr, i) - m) * rs;
            const float g = load(dyr, i);
            const float dxhat = g * load(gamma, i);
            a += dxhat;
            b += dxhat * xhat;
            atomicAdd(&acc[i], g * xhat);
            atomicAdd(&acc[dim + i], g);
        }
        a = warp_sum(a) / dim;
        b = warp_sum(b) / dim;
        T* dxr = dx + row * dim;
        for (int i = lane; i < dim; i += 32) {
            const float xhat = (load(xr, i) - m) * rs;
            store(dxr, i, rs * (load(dyr, i) * load(gamma, i) - a - xhat * b));
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        atomicAdd(&dgamma[i], acc[i]);
        atomicAdd(&dbeta[i], acc[dim + i]);
    }
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void __launch_bounds__(256)
    layernorm_fwd_f32(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                      float* rstd, int rows, int dim, float eps) {
    r3::layernorm_fwd_impl(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_fwd_bf16(const bf16* x, const bf16* gamma, const bf16* beta, bf16* y, float* mean,
                       float* rstd, int rows, int dim, float eps) {
    r3::layernorm_fwd_impl(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_bwd_f32(const float* x, const float* gamma, const float* mean, const float* rstd,
                      const float* dy, float* dx, float* dgamma, float* dbeta, int rows, int dim) {
    r3::layernorm_bwd_impl(x, gamma, mean, rstd, dy, dx, dgamma, dbeta, rows, dim);
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_bwd_bf16(const bf16* x, const bf16* gamma, const float* mean, const float* rstd,
                       const bf16* dy, bf16* dx, float* dgamma, float* dbeta, int rows, int dim) {
    r3::layernorm_bwd_impl(x, gamma, mean, rstd, dy, dx, dgamma, dbeta, rows, dim);
}

R3_EMU_EXPORT(layernorm_fwd_f32)
R3_EMU_EXPORT(layernorm_fwd_bf16)
R3_EMU_EXPORT(layernorm_bwd_f32)
R3_EMU_EXPORT(layernorm_bwd_bf16)
