// Activations: exact-erf GELU forward/backward and the fused bias + GELU forward/backward
// (reference: src/device/cpu/elementwise.rs gelu_fwd / gelu_bwd), and the f32 -> bf16 cast
// (round to nearest even, as half::bf16::from_f32) that brings f32 gradients (MaxSim's dq / dp)
// back to the compute type.
//
// Layout: x, y, dy, dx flat [n] (gelu) or [rows, dim] row-major (bias_gelu) in T (f32 or bf16);
// bias [dim] in T; dbias [dim] f32, accumulated (+=).
//
// Launch: gelu_*: block 256, grid-stride over n, grid = min(ceil(n / 256), max_blocks).
// bias_gelu_fwd: the same over rows * dim (column = i % dim). bias_gelu_bwd: block 256 threads
// = 8 warps per block, one warp per row (grid stride over rows), dynamic shared memory dim f32 for
// the block's dbias, flushed with one atomicAdd per column per block.
//
// Why it is fast: pure streaming (one read, one write per element, coalesced), erff is a few FMAs
// plus one exp; bias + GELU in one pass saves a full read + write of the activation versus a
// separate bias add. The backward recomputes x + bias instead of storing the pre-activation.
#include "common.cuh"

namespace r3 {

__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}
// d/dx [x Φ(x)] = Φ(x) + x φ(x)
__device__ __forceinline__ float gelu_grad(float x) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * __expf(-0.5f * x * x);
    return cdf + x * pdf;
}

template <class T>
__device__ __forceinline__ void gelu_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                              long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        store(y, i, gelu(load(x, i)));
}

template <class T>
__device__ __forceinline__ void gelu_bwd_impl(const T* __restrict__ x, const T* __restrict__ dy,
                                              T* __restrict__ dx, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        store(dx, i, load(dy, i) * gelu_grad(load(x, i)));
}

template <class T>
__device__ __forceinline__ void bias_gelu_fwd_impl(const T* __restrict__ x,
                                                   const T* __restrict__ bias, T* __restrict__ y,
                                                   int rows, int dim) {
    const long long n = (long long)rows * dim;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        store(y, i, gelu(load(x, i) + load(bias, i % dim)));
}

template <class T>
__device__ __forceinline__ void bias_gelu_bwd_impl(const T* __restrict__ x,
                                                   const T* __restrict__ bias,
                                                   const T* __restrict__ dy, T* __restrict__ dx,
                                                   float* __restrict__ dbias, int rows, int dim) {
    R3_DYN_SMEM(float, acc);  // [dim]: this block's dbias
    for (int i = threadIdx.x; i < dim; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
         row += (long long)gridDim.x * warps) {
        for (int i = lane; i < dim; i += 32) {
            const long long k = row * dim + i;
            const float d = load(dy, k) * gelu_grad(load(x, k) + load(bias, i));
            store(dx, k, d);
            atomicAdd(&acc[i], d);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < dim; i += blockDim.x) atomicAdd(&dbias[i], acc[i]);
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void gelu_fwd_f32(const float* x, float* y, long long n) {
    r3::gelu_fwd_impl(x, y, n);
}
extern "C" __global__ void gelu_fwd_bf16(const bf16* x, bf16* y, long long n) {
    r3::gelu_fwd_impl(x, y, n);
}
extern "C" __global__ void gelu_bwd_f32(const float* x, const float* dy, float* dx, long long n) {
    r3::gelu_bwd_impl(x, dy, dx, n);
}
extern "C" __global__ void gelu_bwd_bf16(const bf16* x, const bf16* dy, bf16* dx, long long n) {
    r3::gelu_bwd_impl(x, dy, dx, n);
}
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void bias_gelu_fwd_f32(const float* x, const float* bias, float* y, int rows,
                                             int dim) {
    r3::bias_gelu_fwd_impl(x, bias, y, rows, dim);
}
extern "C" __global__ void bias_gelu_fwd_bf16(const bf16* x, const bf16* bias, bf16* y, int rows,
                                              int dim) {
    r3::bias_gelu_fwd_impl(x, bias, y, rows, dim);
}
extern "C" __global__ void bias_gelu_bwd_f32(const float* x, const float* bias, const float* dy,
                                             float* dx, float* dbias, int rows, int dim) {
    r3::bias_gelu_bwd_impl(x, bias, dy, dx, dbias, rows, dim);
}
extern "C" __global__ void bias_gelu_bwd_bf16(const bf16* x, const bf16* bias, const bf16* dy,
                                              bf16* dx, float* dbias, int rows, int dim) {
    r3::bias_gelu_bwd_impl(x, bias, dy, dx, dbias, rows, dim);
}

R3_EMU_EXPORT(cast_f32_bf16)
R3_EMU_EXPORT(gelu_fwd_f32)
R3_EMU_EXPORT(gelu_fwd_bf16)
R3_EMU_EXPORT(gelu_bwd_f32)
R3_EMU_EXPORT(gelu_bwd_bf16)
R3_EMU_EXPORT(bias_gelu_fwd_f32)
R3_EMU_EXPORT(bias_gelu_fwd_bf16)
R3_EMU_EXPORT(bias_gelu_bwd_f32)
R3_EMU_EXPORT(bias_gelu_bwd_bf16)
