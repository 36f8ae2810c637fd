// Exact top-k of every row of a score matrix (reference: src/device/cpu/topk.rs): the k largest
// scores of a row, sorted by score descending, ties by column ascending (retrieval's rule), for
// the dense search's GEMM output.
//
// Layout: scores [rows, n] f32; out_scores [rows, k] f32, out_idx [rows, k] i32. k <= kTopkMax
// (2048) and k <= n (the wrapper checks). NaN ranks above every number (so that the caller's
// finiteness check sees it rather than a ranking without it).
//
// Launch: block 256 threads, one block per row (grid = rows), no dynamic shared memory.
//
// Algorithm (radix select, then an ordered gather and a bitonic sort):
//   1. map each score to an order-preserving u32 key; four passes over the row, 8 bits at a time
//      from the top, each a 256-bin shared histogram of the keys that match the prefix found so
//      far, find the key T of the k-th largest element and how many elements equal to T belong
//      to the top k (`need`);
//   2. gather every element with key > T (fewer than k, in any order) and the `need`
//      lowest-numbered elements with key == T (an ordered block scan over the row in 256-wide
//      tiles, so ties keep the lowest columns);
//   3. bitonic-sort the k candidates in shared memory by (key desc, column asc) and write them.
// Why it is fast enough: the row is read 6 times from L2/DRAM by 256 threads with coalesced
// loads, with no global atomics and nothing of size n in shared memory; for the 1M-document rows
// of a dense index that is ~6 x 4 MB per query, far below the GEMM that produced it.
#include "common.cuh"

namespace r3 {

constexpr int kTopkThreads = 256;
constexpr int kTopkMax = 2048;

__device__ __forceinline__ unsigned score_key(float x) {
    if (x != x) return 0xFFFFFFFFu;  // NaN (either sign): above everything, +inf included
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void topk_row(const float* __restrict__ scores, int n, int k,
                                         float* __restrict__ out_s, int* __restrict__ out_i) {
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_need;
    __shared__ unsigned ckey[kTopkMax];
    __shared__ int cidx[kTopkMax];
    __shared__ unsigned s_count, s_ties;
    __shared__ unsigned warp_tot[kTopkThreads / 32];
    const int t = threadIdx.x;
    // 1. radix select of the k-th largest key.
    unsigned prefix = 0, mask = 0, need = (unsigned)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = t; i < 256; i += kTopkThreads) hist[i] = 0;
        __syncthreads();
        for (int i = t; i < n; i += kTopkThreads) {
            const unsigned key = score_key(scores[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t == 0) {
            unsigned acc = 0;
            int d = 255;
            for (; d > 0; --d) {
                if (acc + hist[d] >= need) break;
                acc += hist[d];
            }
            s_prefix = prefix | ((unsigned)d << shift);
            s_need = need - acc;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
        __syncthreads();  // everyone has read s_prefix / s_need before the next pass writes them
    }
    const unsigned thr = prefix;  // the k-th largest key; `need` elements equal to it are kept
    // 2a. every element above the threshold (fewer than k of them).
    if (t == 0) s_count = 0;
    __syncthreads();
    for (int i = t; i < n; i += kTopkThreads) {
        const unsigned key = score_key(scores[i]);
        if (key > thr) {
            const unsigned pos = atomicAdd(&s_count, 1u);
            ckey[pos] = key;
            cidx[pos] = i;
        }
    }
    __syncthreads();
    const unsigned above = s_count;
    // 2b. the `need` lowest-numbered elements equal to the threshold, by an ordered scan.
    if (t == 0) s_ties = 0;
    __syncthreads();
    const int lane = t & 31, warp = t >> 5;
    for (int base = 0; base < n; base += kTopkThreads) {
        const unsigned taken = s_ties;
        __syncthreads();  // all threads read s_ties before it changes
        if (taken >= need) break;
        const int i = base + t;
        const bool eq = i < n && score_key(scores[i]) == thr;
        const unsigned ballot = __ballot_sync(kFullMask, eq);
        if (lane == 0) warp_tot[warp] = __popc(ballot);
        __syncthreads();
        unsigned before = 0;
        for (int w = 0; w < warp; ++w) before += warp_tot[w];
        before += __popc(ballot & ((1u << lane) - 1u));
        const unsigned slot = taken + before;
        if (eq && slot < need) {
            ckey[above + slot] = thr;
            cidx[above + slot] = i;
        }
        __syncthreads();
        if (t == 0) {
            unsigned tot = 0;
            for (int w = 0; w < kTopkThreads / 32; ++w) tot += warp_tot[w];
            s_ties = taken + tot;
        }
        __syncthreads();
    }
    // 3. bitonic sort of the k candidates (padded to a power of two) by (key desc, column asc).
    int size = 1;
    while (size < k) size <<= 1;
    for (int i = k + t; i < size; i += kTopkThreads) {
        ckey[i] = 0u;
        cidx[i] = 0x7fffffff;
    }
    __syncthreads();
    for (int len = 2; len <= size; len <<= 1) {
        for (int stride = len >> 1; stride > 0; stride >>= 1) {
            for (int i = t; i < size; i += kTopkThreads) {
                const int j = i ^ stride;
                if (j > i) {
                    // "before" = ranks higher: larger key, then smaller column.
                    const bool i_first = ckey[i] > ckey[j] || (ckey[i] == ckey[j] && cidx[i] < cidx[j]);
                    const bool descending_block = (i & len) == 0;
                    if (descending_block != i_first) {
                        const unsigned tk = ckey[i];
                        ckey[i] = ckey[j];
                        ckey[j] = tk;
                        const int ti = cidx[i];
                        cidx[i] = cidx[j];
                        cidx[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = t; i < k; i += kTopkThreads) {
        out_i[i] = cidx[i];
        out_s[i] = scores[cidx[i]];
    }
}

}  // namespace r3

extern "C" __global__ void __launch_bounds__(256)
    topk_rows_f32(const float* scores, int rows, int n, int k, float* out_scores, int* out_idx) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    r3::topk_row(scores + r * n, n, k, out_scores + r * k, out_idx + r * k);
}

R3_EMU_EXPORT(topk_rows_f32)
