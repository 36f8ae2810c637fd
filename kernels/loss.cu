// Softmax cross-entropy over a large vocabulary (MLM head, InfoNCE), forward and backward, with
// ignore_index -100 (reference: src/device/cpu/loss.rs cross_entropy_fwd / cross_entropy_bwd).
//
// Layout: logits / dlogits [rows, classes] row-major in T (f32 or bf16); targets [rows] i64;
// lse and row_loss [rows] f32; stats [2] f32 = (mean loss over counted rows, counted rows).
//
// Launch: cross_entropy_fwd / _bwd: one block of 256 threads per row (grid = rows); the row is
// walked with a block stride (coalesced). cross_entropy_reduce: one block of 256 threads.
// The loss is a mean over the rows whose target is not -100; the backward reads that count from
// `stats` on the device, so no host round trip sits between forward and backward.
//
// Why it is fast: the forward makes ONE pass over the logits, keeping an online (max, sum-of-exp)
// pair per thread and merging pairs across the block (a 250k-class row is read once, not twice);
// the backward is one more streaming pass writing (softmax - onehot) * g / count. The mean is a
// separate tiny deterministic reduction instead of float atomics.
#include "common.cuh"

namespace r3 {

constexpr long long kIgnoreIndex = -100;
// Loads in flight per thread (`strided_unrolled`; the backward may work in place).
constexpr int kCeUnroll = 4;

// One logit into a thread's online (max, sum of exp) pair.
__device__ __forceinline__ void maxsum_push(MaxSum& acc, float v) {
    if (v > acc.m) {
        acc.s = acc.s * __expf(acc.m - v) + 1.f;
        acc.m = v;
    } else {
        acc.s += __expf(v - acc.m);
    }
}

template <class T>
__device__ __forceinline__ void cross_entropy_fwd_impl(const T* __restrict__ logits,
                                                       const long long* __restrict__ targets,
                                                       float* __restrict__ lse,
                                                       float* __restrict__ row_loss, int rows,
                                                       int classes) {
    const long long row = blockIdx.x;
    if (row >= rows) return;  // the whole block leaves together
    const T* lr = logits + row * classes;
    MaxSum acc{-INFINITY, 0.f};
    strided_unrolled<kCeUnroll>(
        (int)threadIdx.x, classes, (int)blockDim.x, [&](int i) { return load(lr, i); },
        [&](int, float v) { maxsum_push(acc, v); });
    acc = block_maxsum(acc);
    const float l = acc.m + logf(acc.s);
    if (threadIdx.x == 0) {
        lse[row] = l;
        const long long t = targets[row];
        row_loss[row] = t == kIgnoreIndex ? 0.f
                        : (t < 0 || t >= classes) ? NAN
                                                  : l - load(lr, t);
    }
}

__device__ __forceinline__ void cross_entropy_reduce_impl(const float* __restrict__ row_loss,
                                                          const long long* __restrict__ targets,
                                                          int rows, float* __restrict__ stats) {
    float s = 0.f, c = 0.f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        if (targets[r] != kIgnoreIndex) {
            s += row_loss[r];
            c += 1.f;
        }
    }
    s = block_sum(s);
    c = block_sum(c);
    if (threadIdx.x == 0) {
        stats[0] = c > 0.f ? s / c : 0.f;
        stats[1] = c;
    }
}

template <class T>
__device__ __forceinline__ void cross_entropy_bwd_impl(const T* logits,
                                                       const long long* __restrict__ targets,
                                                       const float* __restrict__ lse,
                                                       const float* __restrict__ stats, float g,
                                                       T* dlogits, int rows, int classes) {
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const long long t = targets[row];
    T* dr = dlogits + row * classes;
    const T* lr = logits + row * classes;  // may alias dlogits: each element is read, then written
    const float count = stats[1];
    if (t == kIgnoreIndex || count == 0.f) {
        for (int i = threadIdx.x; i < classes; i += blockDim.x) store(dr, i, 0.f);
        return;
    }
    const float scale = g / count, l = lse[row];
    strided_unrolled<kCeUnroll>(
        (int)threadIdx.x, classes, (int)blockDim.x, [&](int i) { return load(lr, i); },
        [&](int i, float v) { store(dr, i, scale * (__expf(v - l) - (i == t ? 1.f : 0.f))); });
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void __launch_bounds__(256)
    cross_entropy_fwd_f32(const float* logits, const long long* targets, float* lse,
                          float* row_loss, int rows, int classes) {
    r3::cross_entropy_fwd_impl(logits, targets, lse, row_loss, rows, classes);
}
extern "C" __global__ void __launch_bounds__(256)
    cross_entropy_fwd_bf16(const bf16* logits, const long long* targets, float* lse,
                           float* row_loss, int rows, int classes) {
    r3::cross_entropy_fwd_impl(logits, targets, lse, row_loss, rows, classes);
}
extern "C" __global__ void __launch_bounds__(256)
    cross_entropy_reduce(const float* row_loss, const long long* targets, int rows, float* stats) {
    r3::cross_entropy_reduce_impl(row_loss, targets, rows, stats);
}
extern "C" __global__ void __launch_bounds__(256)
    cross_entropy_bwd_f32(const float* logits, const long long* targets, const float* lse,
                          const float* stats, float g, float* dlogits, int rows, int classes) {
    r3::cross_entropy_bwd_impl(logits, targets, lse, stats, g, dlogits, rows, classes);
}
extern "C" __global__ void __launch_bounds__(256)
    cross_entropy_bwd_bf16(const bf16* logits, const long long* targets, const float* lse,
                           const float* stats, float g, bf16* dlogits, int rows, int classes) {
    r3::cross_entropy_bwd_impl(logits, targets, lse, stats, g, dlogits, rows, classes);
}

R3_EMU_EXPORT(cross_entropy_fwd_f32)
R3_EMU_EXPORT(cross_entropy_fwd_bf16)
R3_EMU_EXPORT(cross_entropy_reduce)
R3_EMU_EXPORT(cross_entropy_bwd_f32)
R3_EMU_EXPORT(cross_entropy_bwd_bf16)
