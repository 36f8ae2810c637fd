// Row-wise L2 normalisation y = x / max(||x||_2, eps), forward and backward (PyTorch F.normalize;
// reference: src/device/cpu/normalize.rs).
//
// Layout: x, y, dy, dx [rows, dim] row-major in T (f32 or bf16).
//
// Launch: block 256 threads = 8 warps, one warp per row, grid = ceil(rows / 8).
//
// Why it is fast: rows are embedding vectors (dim <= 4096, <= 16 KB), so one warp per row needs no
// shared memory and no __syncthreads; the row's second read hits L1. The backward recomputes the
// norm (one extra warp reduction) instead of storing it.
#include "common.cuh"

namespace r3 {

constexpr int kNormWarps = 8;

template <class T>
__device__ __forceinline__ void l2_normalize_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                      int rows, int dim, float eps) {
    const long long row = (long long)blockIdx.x * kNormWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * dim;
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) {
        const float v = load(xr, i);
        s += v * v;
    }
    const float inv = 1.f / fmaxf(sqrtf(warp_sum(s)), eps);
    T* yr = y + row * dim;
    for (int i = lane; i < dim; i += 32) store(yr, i, load(xr, i) * inv);
}

// For ||x|| > eps: dx = (dy - y (y . dy)) / ||x||; below eps the map is x / eps.
template <class T>
__device__ __forceinline__ void l2_normalize_bwd_impl(const T* __restrict__ x,
                                                      const T* __restrict__ dy,
                                                      T* __restrict__ dx, int rows, int dim,
                                                      float eps) {
    const long long row = (long long)blockIdx.x * kNormWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    float s = 0.f, xdy = 0.f;
    for (int i = lane; i < dim; i += 32) {
        const float v = load(xr, i);
        s += v * v;
        xdy += v * load(dyr, i);
    }
    const float n = sqrtf(warp_sum(s));
    xdy = warp_sum(xdy);
    T* dxr = dx + row * dim;
    if (n > eps) {
        const float inv = 1.f / n;
        const float ydy = xdy * inv;  // y . dy
        for (int i = lane; i < dim; i += 32)
            store(dxr, i, (load(dyr, i) - load(xr, i) * inv * ydy) * inv);
    } else {
        for (int i = lane; i < dim; i += 32) store(dxr, i, load(dyr, i) / eps);
    }
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void l2_normalize_fwd_f32(const float* x, float* y, int rows, int dim,
                                                float eps) {
    r3::l2_normalize_fwd_impl(x, y, rows, dim, eps);
}
extern "C" __global__ void l2_normalize_fwd_bf16(const bf16* x, bf16* y, int rows, int dim,
                                                 float eps) {
    r3::l2_normalize_fwd_impl(x, y, rows, dim, eps);
}
extern "C" __global__ void l2_normalize_bwd_f32(const float* x, const float* dy, float* dx,
                                                int rows, int dim, float eps) {
    r3::l2_normalize_bwd_impl(x, dy, dx, rows, dim, eps);
}
extern "C" __global__ void l2_normalize_bwd_bf16(const bf16* x, const bf16* dy, bf16* dx,
                                                 int rows, int dim, float eps) {
    r3::l2_normalize_bwd_impl(x, dy, dx, rows, dim, eps);
}

R3_EMU_EXPORT(l2_normalize_fwd_f32)
R3_EMU_EXPORT(l2_normalize_fwd_bf16)
R3_EMU_EXPORT(l2_normalize_bwd_f32)
R3_EMU_EXPORT(l2_normalize_bwd_bf16)
