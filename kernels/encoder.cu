// The glue of a post-LN BERT layer on the device (reference: src/device/cpu/fused.rs):
//
//   residual_layernorm_fwd: z = Dropout(a + bias) + res;  y = LN(z)      (one pass per row)
//   dropout_fwd:            y = x * keep(i) / (1 - p)                     (in place allowed)
//   add_bias:               x[r, :] += bias                               (in place)
//   colsum:                 db[:] += sum over rows of dy[r, :]            (bias gradients)
//
// residual_layernorm serves the three "add & norm" sites of the encoder: the embeddings
// (a = word rows, bias = token-type row 0, res = position rows, p = 0), the attention output
// (a = ctx Wo^T, bias = bo, res = layer input) and the FFN output (a = gelu(.) W2^T, bias = b2,
// res = the attention block's output). Dropout keeps element i = row * dim + c when
// hash_unit(seed, stream, i) >= p: the index over the whole [rows, dim] tensor that
// cpu::elementwise::dropout_fwd uses, so CPU and GPU drop the same elements.
//
// Layout: a, res, z, y, x [rows, dim] row-major in T (f32 or bf16); bias, gamma, beta [dim] in T;
// mean, rstd [rows] f32; db [dim] f32 (accumulated). bias, res and z may be NULL (no bias, no
// residual, z not stored: inference).
//
// Launch: residual_layernorm_fwd: block 256 = 8 warps, one warp per row, grid ceil(rows / 8).
// dropout_fwd, add_bias: grid-stride, block 256. colsum: block (32, 8): 32 columns x 8 row
// lanes; grid (ceil(dim / 32), row splits), one shared-memory fold and one atomicAdd per column
// per block.
//
// Why it is fast: the add, the dropout mask and the LayerNorm statistics are one kernel, so the
// sum makes one trip through DRAM instead of three (add, dropout, norm); the row (<= 16 KB) stays
// in L1 for the second and third pass. colsum reads dy coalesced along columns.
#include "common.cuh"

namespace r3 {

constexpr int kResWarps = 8;

template <class T>
struct ResidualIn {
    const T* a;
    const T* bias;
    const T* res;
    float p, scale;
    unsigned long long seed, stream;

    __device__ __forceinline__ float at(long long row, int dim, int i) const {
        const long long idx = row * dim + i;
        float v = load(a, idx);
        if (bias) v += load(bias, i);
        if (p > 0.f) v = hash_unit(seed, stream, (unsigned long long)idx) >= p ? v * scale : 0.f;
        if (res) v += load(res, idx);
        return v;
    }
};

template <class T>
__device__ __forceinline__ void residual_layernorm_fwd_impl(ResidualIn<T> in,
                                                            const T* __restrict__ gamma,
                                                            const T* __restrict__ beta,
                                                            T* __restrict__ z, T* __restrict__ y,
                                                            float* __restrict__ mean,
                                                            float* __restrict__ rstd, int rows,
                                                            int dim, float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * kResWarps + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together: no barrier follows
    // Pass 1: the sum (stored as z when training; later passes read z back, rounded as stored,
    // so the statistics describe exactly the z the backward will see).
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) {
        float v = in.at(row, dim, i);
        if (z) {
            store(z, row * dim + i, v);
            v = load(z, row * dim + i);
        }
        s += v;
    }
    const float m = warp_sum(s) / dim;
    float var = 0.f;
    for (int i = lane; i < dim; i += 32) {
        const float d = (z ? load(z, row * dim + i) : in.at(row, dim, i)) - m;
        var += d * d;
    }
    const float rs = rsqrtf(warp_sum(var) / dim + eps);
    for (int i = lane; i < dim; i += 32) {
        const float v = z ? load(z, row * dim + i) : in.at(row, dim, i);
        store(y, row * dim + i, (v - m) * rs * load(gamma, i) + load(beta, i));
    }
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = rs;
    }
}

template <class T>
__device__ __forceinline__ void dropout_fwd_impl(const T* x, T* y, long long n, float p,
                                                 unsigned long long seed,
                                                 unsigned long long stream) {
    const float scale = 1.f / (1.f - p);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        store(y, i, hash_unit(seed, stream, (unsigned long long)i) >= p ? v * scale : 0.f);
    }
}

// Loads in flight per thread (`strided_unrolled`: add_bias works in place).
constexpr int kBiasUnroll = 4;

template <class I, class T>
__device__ __forceinline__ void add_bias_loop(I n, I dim, T* x, const T* __restrict__ bias) {
    strided_unrolled<kBiasUnroll>(
        (I)blockIdx.x * blockDim.x + threadIdx.x, n, (I)gridDim.x * blockDim.x,
        [&](I i) { return load(x, i); },
        [&](I i, float v) { store(x, i, v + load(bias, i % dim)); });
}

template <class T>
__device__ __forceinline__ void add_bias_impl(T* x, const T* __restrict__ bias, int rows,
                                              int dim) {
    // 32-bit indices and modulo: the launcher keeps rows · dim within i32 and the grid to 1024
    // blocks, so the largest index a thread forms, n + 4 · 2^18, fits in 32 unsigned bits.
    add_bias_loop((unsigned)rows * (unsigned)dim, (unsigned)dim, x, bias);
}

constexpr int kColRows = 8;

template <class T>
__device__ __forceinline__ void colsum_impl(const T* __restrict__ dy, float* __restrict__ db,
                                            int rows, int dim) {
    __shared__ float part[kColRows][32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < dim) {
        // Unrolled so that several rows' loads are in flight (the sum order is unchanged).
#pragma unroll 4
        for (long long r = (long long)blockIdx.y * kColRows + threadIdx.y; r < rows;
             r += (long long)gridDim.y * kColRows)
            s += load(dy, r * dim + c);
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < dim) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < kColRows; ++k) t += part[k][threadIdx.x];
        atomicAdd(&db[c], t);
    }
}

}  // namespace r3

using r3::bf16;

#define R3_ENCODER_KERNELS(T, SFX)                                                                \
    extern "C" __global__ void __launch_bounds__(256) residual_layernorm_fwd_##SFX(               \
        const T* a, const T* bias, const T* res, const T* gamma, const T* beta, T* z, T* y,       \
        float* mean, float* rstd, int rows, int dim, float eps, float p,                         \
        unsigned long long seed, unsigned long long stream) {                                    \
        r3::ResidualIn<T> in{a, bias, res, p, p > 0.f ? 1.f / (1.f - p) : 1.f, seed, stream};    \
        r3::residual_layernorm_fwd_impl(in, gamma, beta, z, y, mean, rstd, rows, dim, eps);      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        dropout_fwd_##SFX(const T* x, T* y, long long n, float p, unsigned long long seed,       \
                          unsigned long long stream) {                                            \
        r3::dropout_fwd_impl(x, y, n, p, seed, stream);                                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        add_bias_##SFX(T* x, const T* bias, int rows, int dim) {                                  \
        r3::add_bias_impl(x, bias, rows, dim);                                                    \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        colsum_##SFX(const T* dy, float* db, int rows, int dim) {                                 \
        r3::colsum_impl(dy, db, rows, dim);                                                       \
    }

R3_ENCODER_KERNELS(float, f32)
R3_ENCODER_KERNELS(bf16, bf16)

R3_EMU_EXPORT(residual_layernorm_fwd_f32)
R3_EMU_EXPORT(residual_layernorm_fwd_bf16)
R3_EMU_EXPORT(dropout_fwd_f32)
R3_EMU_EXPORT(dropout_fwd_bf16)
R3_EMU_EXPORT(add_bias_f32)
R3_EMU_EXPORT(add_bias_bf16)
R3_EMU_EXPORT(colsum_f32)
R3_EMU_EXPORT(colsum_bf16)
