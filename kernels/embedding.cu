// Embedding gather (forward) and scatter-add (backward) (reference: src/device/cpu/embedding.rs).
//
// Layout: table [vocab, dim] in T (f32 or bf16); ids [n] u32; out / dout [n, dim] in T;
// dtable [vocab, dim] f32 (the parameter gradient), accumulated (+=).
//
// Launch: block 128 threads = 4 warps, one warp per id (grid = ceil(n / 4)); the warp copies the
// row with 16-byte vector loads when the row is 16-byte aligned (dim * sizeof(T) % 16 == 0, the
// usual case: 768, 1024), scalar otherwise. Ids >= vocab (rejected by the op layer) write zeros
// instead of reading out of bounds. Backward: same shape, one f32 atomicAdd per element; rows whose
// id equals padding_idx (>= 0) get no gradient (PyTorch's padding_idx).
//
// Why it is fast: the forward is a pure row copy at full vector width; the backward's atomics
// collide only when the same token repeats in the batch, and f32 red.add at L2 is cheap next to
// the row read.
#include "common.cuh"

namespace r3 {

constexpr int kEmbWarps = 4;

template <class T>
__device__ __forceinline__ void gather_fwd_impl(const T* __restrict__ table,
                                                const unsigned* __restrict__ ids,
                                                T* __restrict__ out, int n, int dim, int vocab) {
    const long long tok = (long long)blockIdx.x * kEmbWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (tok >= n) return;
    const unsigned id = ids[tok];
    T* o = out + tok * dim;
    if (id >= (unsigned)vocab) {
        for (int i = lane; i < dim; i += 32) store(o, i, 0.f);
        return;
    }
    const T* src = table + (long long)id * dim;
    constexpr int V = Vec16<T>::N;
    if (dim % V == 0 && is_aligned16(src) && is_aligned16(o)) {
        for (int i = lane * V; i < dim; i += 32 * V) store16(o + i, load16(src + i));
    } else {
        for (int i = lane; i < dim; i += 32) o[i] = src[i];
    }
}

template <class T>
__device__ __forceinline__ void gather_bwd_impl(const T* __restrict__ dout,
                                                const unsigned* __restrict__ ids,
                                                float* __restrict__ dtable, int n, int dim,
                                                int vocab, int padding_idx) {
    const long long tok = (long long)blockIdx.x * kEmbWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (tok >= n) return;
    const unsigned id = ids[tok];
    if (id >= (unsigned)vocab || (padding_idx >= 0 && id == (unsigned)padding_idx)) return;
    const T* g = dout + tok * dim;
    float* d = dtable + (long long)id * dim;
    for (int i = lane; i < dim; i += 32) atomicAdd(&d[i], load(g, i));
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void gather_fwd_f32(const float* table, const unsigned* ids, float* out,
                                          int n, int dim, int vocab) {
    r3::gather_fwd_impl(table, ids, out, n, dim, vocab);
}
extern "C" __global__ void gather_fwd_bf16(const bf16* table, const unsigned* ids, bf16* out,
                                           int n, int dim, int vocab) {
    r3::gather_fwd_impl(table, ids, out, n, dim, vocab);
}
extern "C" __global__ void gather_bwd_f32(const float* dout, const unsigned* ids, float* dtable,
                                          int n, int dim, int vocab, int padding_idx) {
    r3::gather_bwd_impl(dout, ids, dtable, n, dim, vocab, padding_idx);
}
extern "C" __global__ void gather_bwd_bf16(const bf16* dout, const unsigned* ids, float* dtable,
                                           int n, int dim, int vocab, int padding_idx) {
    r3::gather_bwd_impl(dout, ids, dtable, n, dim, vocab, padding_idx);
}

R3_EMU_EXPORT(gather_fwd_f32)
R3_EMU_EXPORT(gather_fwd_bf16)
R3_EMU_EXPORT(gather_bwd_f32)
R3_EMU_EXPORT(gather_bwd_bf16)
