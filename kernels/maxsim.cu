// ColBERT late interaction (MaxSim), training forward / backward and the inference scan over a
// packed document store (reference: src/device/cpu/maxsim.rs maxsim_fwd / maxsim_bwd).
//
// score(q, p) = ( Σ_{valid t} max_{valid u} <q_t, p_u> ) / #valid t. Padding never enters the max;
// a query token with no valid passage token contributes 0 (but still counts); a query with no
// valid token scores 0. Ties keep the first (lowest) passage position.
//
// Layout: maxsim_fwd: q [Bq, Lq, D] and p [Bp, Lp, D] in T (f32 or bf16; f32 arithmetic);
// qmask [Bq, Lq] and pmask [Bp, Lp] u8 (1 = real token); scores [Bq, Bp] f32; argmax
// [Bq, Bp, Lq] i32 = the passage position of each query token's max, -1 where the query token is
// padding or the passage has no real token (u32::MAX in the CPU reference).
// maxsim_bwd: dscores [Bq, Bp] f32 and the forward's argmax -> dq [Bq, Lq, D] f32 and
// dp [Bp, Lp, D] f32, both ACCUMULATED (+=), as the CPU reference. dq is deterministic (one thread
// owns each element); dp is a scatter with float atomicAdd (several (query, token) pairs may pick
// the same passage token), so its summation order is not deterministic.
// maxsim_docs: one query [Lq, D] (no padding) against N documents stored back to back
// docs [offsets[N], D] (document n = rows offsets[n] .. offsets[n+1], offsets [N+1] i64) ->
// scores [N] f32; an empty document scores 0.
//
// Launch: maxsim_fwd: grid (Bp, Bq), block 256; maxsim_docs: grid N, block 256; no dynamic
// shared memory (static 23 KB). maxsim_bwd: grid Bq * Lq (one block per query token), block 128.
//
// Why it is fast: [Bq, Lq, Bp, Lp] is never stored. A block owns one (query, passage) pair and
// walks 32 query tokens x 128 passage tokens at a time as a SIMT GEMM tile: 32-wide slices of the
// D axis are staged in shared memory (16-byte global loads, rows padded to 36 floats so the
// 16-byte shared reads of 8 lanes hit 8 distinct bank groups) and every thread accumulates a
// 4 x 4 micro-tile (4 query tokens broadcast to the warp, 4 passage tokens per lane: 64 FMAs per
// 8 vector shared loads). The row max / argmax is a warp shuffle reduction folded into a running
// max in registers, and the masked mean a block reduction, so each document vector is read from
// global memory once per 32 query tokens (once for queries of <= 32 tokens). Tiles past the last
// real query / passage token are skipped. The f32 variants prefetch the next D slice into
// registers while the current one is multiplied (see the loop).
//
// Measured (H200, nvcc 13.0, 20k documents x 128 tokens, D = 1024): maxsim_docs_bf16 reads
// 0.80 TB/s at Lq = 1, 8 and 32 alike, maxsim_docs_f32 1.76 TB/s at Lq = 32 -- i.e. 17% / 37% of
// HBM. The bound is the FP32 FMA rate of the 32 x 128 SIMT tile (~25-28 TFLOP/s counted over the
// full 32-row tile, which is computed even for shorter queries), not memory: at Lq = 32 each bf16
// document element costs 64 FLOP, so >= 75% of HBM bandwidth needs ~115 TFLOP/s, i.e. tensor
// cores. The mma.sync variant of this tiling (bf16 m16n8k16, f32 accumulators) is the follow-up
// once common.cuh has its emulated mma wrappers; a 8-row query tile for short queries would help
// the SIMT path meanwhile. maxsim_fwd_bf16 (16x64 vs 128x256, D 1024): 3.2 ms (21.5 TFLOP/s).
#include "common.cuh"

namespace r3 {

constexpr int kMsThreads = 256;
constexpr int kMsTq = 32;   // query tokens per tile (8 warps x 4)
constexpr int kMsTu = 128;  // passage tokens per tile (32 lanes x 4)
constexpr int kMsKc = 32;   // D slice staged in shared memory
constexpr int kMsPad = kMsKc + 4;

// A slice of rows [row0, row0 + NROWS) (clamped to `rows`), columns [k0, k0 + 32) of a [rows, D]
// matrix, held in registers between its global load and its shared-memory store, so the next
// slice's loads are in flight while the current one is multiplied. Out-of-range elements are 0.
template <class T, int NROWS>
struct MsSlice {
    static constexpr int V = Vec16<T>::N;
    static constexpr int kPerRow = kMsKc / V;
    static constexpr int kIters = (NROWS * kPerRow + kMsThreads - 1) / kMsThreads;
    Vec16<T> v[kIters];

    __device__ __forceinline__ void fetch(const T* __restrict__ src, int rows, int D, int row0,
                                          int k0, bool vec_ok) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int idx = threadIdx.x + it * kMsThreads;
            const int row = row0 + idx / kPerRow, k = k0 + (idx % kPerRow) * V;
            if (idx < NROWS * kPerRow && row < rows && vec_ok && k + V <= D) {
                v[it] = load16(src + (long long)row * D + k);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e)
                    v[it].v[e] = from_f32<T>(idx < NROWS * kPerRow && row < rows && k + e < D
                                                 ? load(src, (long long)row * D + k + e)
                                                 : 0.f);
            }
        }
    }
    // Into s[NROWS][kMsPad] as f32.
    __device__ __forceinline__ void put(float* s) const {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int idx = threadIdx.x + it * kMsThreads;
            if (idx >= NROWS * kPerRow) continue;
            float* dst = s + (idx / kPerRow) * kMsPad + (idx % kPerRow) * V;
#pragma unroll
            for (int e = 0; e < V; ++e) dst[e] = to_f32(v[it].v[e]);
        }
    }
};

// End of the passage tiles covering ulen tokens. R3_MUTANT_MS_TILES (emulator mutation test
// only) drops the last partial tile: the emulated selftest must catch it.
__device__ __forceinline__ int ms_tiles_end(int ulen) {
#ifdef R3_MUTANT_MS_TILES
    return ulen / kMsTu * kMsTu;
#else
    return ulen;
#endif
}

// Keep (v, i) if it beats (bv, bi): larger value, or equal value at a lower position.
__device__ __forceinline__ void ms_better(float v, int i, float& bv, int& bi) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

// The MaxSim of one query (q [Lq, D], qmask or NULL = all real) against one passage (p [Lp, D],
// pmask or NULL = all real). Writes argmax[t] (if argmax != NULL) for every t < Lq and returns the
// score to thread 0 (the other threads get it too).
template <class T>
__device__ __forceinline__ float maxsim_pair(const T* __restrict__ q,
                                             const unsigned char* __restrict__ qmask, int Lq,
                                             const T* __restrict__ p,
                                             const unsigned char* __restrict__ pmask, int Lp,
                                             int D, int* __restrict__ argmax) {
    __shared__ __align__(16) float qs[kMsTq * kMsPad];
    __shared__ __align__(16) float ps[kMsTu * kMsPad];
    __shared__ int lens[2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Tiles past the last real token of either side are skipped.
    if (threadIdx.x == 0) {
        lens[0] = qmask ? 0 : Lq;
        lens[1] = pmask ? 0 : Lp;
    }
    __syncthreads();
    if (qmask)
        for (int t = threadIdx.x; t < Lq; t += blockDim.x)
            if (qmask[t]) atomicMax(&lens[0], t + 1);
    if (pmask)
        for (int u = threadIdx.x; u < Lp; u += blockDim.x)
            if (pmask[u]) atomicMax(&lens[1], u + 1);
    __syncthreads();
    const int tlen = lens[0], ulen = lens[1];
    const bool vq = is_aligned16(q) && D % Vec16<T>::N == 0;
    const bool vp = is_aligned16(p) && D % Vec16<T>::N == 0;
    float total = 0.f, count = 0.f;
    for (int t0 = 0; t0 < Lq; t0 += kMsTq) {
        float best[4];
        int arg[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            best[r] = -INFINITY;
            arg[r] = -1;
        }
        for (int u0 = 0; t0 < tlen && u0 < ms_tiles_end(ulen); u0 += kMsTu) {
            float acc[4][4];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
            // f32: the next slice's loads are issued before this slice's FMAs (measured on an
            // H200: 1.75 vs 1.32 TB/s). bf16: the loads are issued just before the barrier; the
            // prefetch registers cost the bf16 variants a block per SM (0.65 vs 0.80 TB/s).
            constexpr bool kPrefetch = sizeof(T) == 4;
            MsSlice<T, kMsTq> qn;
            MsSlice<T, kMsTu> pn;
            if (kPrefetch) {
                qn.fetch(q, tlen, D, t0, 0, vq);
                pn.fetch(p, ulen, D, u0, 0, vp);
            }
            for (int k0 = 0; k0 < D; k0 += kMsKc) {
                if (!kPrefetch) {
                    qn.fetch(q, tlen, D, t0, k0, vq);
                    pn.fetch(p, ulen, D, u0, k0, vp);
                }
                __syncthreads();  // the previous slice has been consumed
                qn.put(qs);
                pn.put(ps);
                __syncthreads();
                if (kPrefetch && k0 + kMsKc < D) {
                    qn.fetch(q, tlen, D, t0, k0 + kMsKc, vq);
                    pn.fetch(p, ulen, D, u0, k0 + kMsKc, vp);
                }
#pragma unroll
                for (int k = 0; k < kMsKc; k += 4) {
                    float4 a[4], b[4];
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        a[r] = *reinterpret_cast<const float4*>(qs + (warp * 4 + r) * kMsPad + k);
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        b[c] = *reinterpret_cast<const float4*>(ps + (lane + 32 * c) * kMsPad + k);
#pragma unroll
                    for (int r = 0; r < 4; ++r)
#pragma unroll
                        for (int c = 0; c < 4; ++c)
                            acc[r][c] += a[r].x * b[c].x + a[r].y * b[c].y + a[r].z * b[c].z +
                                         a[r].w * b[c].w;
                }
            }
            // Row max / argmax over this tile's real passage tokens, then into the running max.
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float v = -INFINITY;
                int i = 0x7fffffff;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int u = u0 + lane + 32 * c;
                    const bool real = u < ulen && (!pmask || pmask[u]);
                    if (real) ms_better(acc[r][c], u, v, i);
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float ov = __shfl_xor_sync(kFullMask, v, o);
                    const int oi = __shfl_xor_sync(kFullMask, i, o);
                    ms_better(ov, oi, v, i);
                }
                if (i != 0x7fffffff && (arg[r] < 0 || v > best[r])) {
                    best[r] = v;
                    arg[r] = i;
                }
            }
        }
        // Every lane of the warp holds the same best / arg: lane r handles row r.
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int t = t0 + warp * 4 + r;
            if (lane == r && t < Lq) {
                const bool real = t < tlen && (!qmask || qmask[t]);
                if (argmax) argmax[t] = real ? arg[r] : -1;
                if (real) {
                    count += 1.f;
                    if (arg[r] >= 0) total += best[r];
                }
            }
        }
    }
    total = block_sum(total);
    count = block_sum(count);
    return count > 0.f ? total / count : 0.f;
}

template <class T>
__device__ __forceinline__ void maxsim_fwd_impl(const T* __restrict__ q,
                                                const unsigned char* __restrict__ qmask,
                                                const T* __restrict__ p,
                                                const unsigned char* __restrict__ pmask,
                                                float* __restrict__ scores,
                                                int* __restrict__ argmax, int Bq, int Lq, int Bp,
                                                int Lp, int D) {
    const long long n = blockIdx.x, b = blockIdx.y;
    if (n >= Bp || b >= Bq) return;
    const float s = maxsim_pair(q + b * Lq * D, qmask + b * Lq, Lq, p + n * Lp * D,
                                pmask + n * Lp, Lp, D, argmax + (b * Bp + n) * Lq);
    if (threadIdx.x == 0) scores[b * Bp + n] = s;
}

template <class T>
__device__ __forceinline__ void maxsim_docs_impl(const T* __restrict__ q, int Lq,
                                                 const T* __restrict__ docs,
                                                 const long long* __restrict__ offsets,
                                                 float* __restrict__ scores, int N, int D) {
    const long long n = blockIdx.x;
    if (n >= N) return;
    const long long begin = offsets[n], len = offsets[n + 1] - begin;
    const float s =
        maxsim_pair(q, (const unsigned char*)nullptr, Lq, docs + begin * D,
                    (const unsigned char*)nullptr, (int)len, D, (int*)nullptr);
    if (threadIdx.x == 0) scores[n] = s;
}

// ---- the inference scan on tensor cores ------------------------------------------------------
// maxsim_docs_tc_bf16: one warp per document, 8 warps per block. This launch scores the query
// rows q[0 .. qn) (qn <= 32; longer queries take one launch per 32 rows, `accumulate` = 1 after
// the first) and writes (or adds) Σ_t max_u <q_t, d_u> / q_total to scores[n].
//
// The document is the A operand of mma.m16n8k16 (16 document tokens per tile, read straight from
// global memory into registers), the query the B operand (8 query tokens per n-block, up to 4
// n-blocks) held in shared memory. The dot product sums over k, so any permutation of the k axis
// applied to both operands gives the same result: lane (g, q) = (lane / 4, lane % 4) loads the 16
// bytes [8q, 8q + 8) of a 32-element D chunk of its rows g and g + 8 with ONE 16-byte load, and
// uses elements 8q + 4s + {0, 1} as the fragment's logical columns 2q + {0, 1} and 8q + 4s + {2, 3}
// as 2q + 8 + {0, 1} in k-step s (0, 1); the query's B fragments follow the same permutation, so
// they too are one 16-byte shared load per chunk and n-block. Every byte of the document is read
// once, in full 32-byte sectors, with kMdDepth chunks (4 KB per warp) in flight.
// Shared query rows are (round_up(2 D, 128) + 64) bytes apart: the two rows a quarter-warp reads
// then fall in different halves of the 32 banks (no conflicts).
// Launch: grid ceil(N / 8), block 256, dynamic shared memory ceil(qn / 8) * 8 * row stride.
// Needs D % 32 == 0, docs 16-byte aligned, q 4-byte aligned (the wrapper checks and otherwise
// uses the SIMT kernel above). 108 registers, 2 blocks per SM at D = 1024.
// Measured (H200, 2026-11-28, `bench kernels`, 20k documents x 128 tokens, D 1024): 2915 GB/s
// (69% of the 4253 GB/s copy) at Lq = 8 and 2466 GB/s (58%, 78.9 TFLOP/s) at Lq = 32, vs
// 785 / 795 GB/s for the SIMT kernel. Still under the 75% target; candidates: keep the load
// pipeline running across the 16-row tiles (each tile now restarts it) and 32-row tiles per warp.
constexpr int kMdWarps = 8;
constexpr int kMdDepth = 4;

__device__ __forceinline__ int md_stride_words(int D) {
    return (((2 * D + 127) / 128) * 128 + 64) / 4;
}

// The query tile q[0 .. qn) into shared memory (rows md_stride_words apart, rows up to the next
// multiple of 8 zero), then a barrier.
__device__ __forceinline__ void md_load_query(unsigned* qs, const bf16* __restrict__ q, int qn,
                                              int D) {
    const int sw = md_stride_words(D), nb = (qn + 7) / 8, dw = D / 2;
    const unsigned* qw = reinterpret_cast<const unsigned*>(q);
    for (int i = threadIdx.x; i < nb * 8 * dw; i += blockDim.x) {
        const int r = i / dw, c = i % dw;
        qs[r * sw + c] = r < qn ? qw[(long long)r * dw + c] : 0u;
    }
    __syncthreads();
}

// One 32-wide D chunk c of a 16-row document tile into the scores against the nb n-blocks of the
// shared query tile: a and b are this lane's 16 bytes of rows g and g + 8 (the k-permuted A
// fragments of two k-steps, see above), the query's B fragments one 16-byte shared load each.
__device__ __forceinline__ void md_chunk_mma(float acc[4][4], uint4 a, uint4 b, const unsigned* qs,
                                             int sw, int c, int g, int qd, int nb) {
    const unsigned a0[4] = {a.x, b.x, a.y, b.y};
    const unsigned a1[4] = {a.z, b.z, a.w, b.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (j >= nb) break;  // warp-uniform
        const uint4 y = *reinterpret_cast<const uint4*>(qs + (8 * j + g) * sw + c * 16 + qd * 4);
        mma_bf16_16816(acc[j], a0, y.x, y.y);
        mma_bf16_16816(acc[j], a1, y.z, y.w);
    }
}

// Folds one 16-row tile's scores (acc: C fragments, rows g and g + 8 real when va / vb) into the
// running max per query column: over the rows, then across the 8 g of the warp.
__device__ __forceinline__ void md_tile_max(float best[4][2], const float acc[4][4], bool va,
                                            bool vb) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float m0 = fmaxf(va ? acc[j][0] : -INFINITY, vb ? acc[j][2] : -INFINITY);
        float m1 = fmaxf(va ? acc[j][1] : -INFINITY, vb ? acc[j][3] : -INFINITY);
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
            m0 = fmaxf(m0, __shfl_xor_sync(kFullMask, m0, o));
            m1 = fmaxf(m1, __shfl_xor_sync(kFullMask, m1, o));
        }
        best[j][0] = fmaxf(best[j][0], m0);
        best[j][1] = fmaxf(best[j][1], m1);
    }
}

// Σ over the real query columns 8 j + 2 qd + {0, 1} of the maxima (an empty document adds 0),
// divided by q_total, written (or added) to *score by lane 0.
__device__ __forceinline__ void md_store_score(const float best[4][2], int len, int qn,
                                               int q_total, int qd, int lane, float* score,
                                               int accumulate) {
    float sum = 0.f;
    if (len > 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (8 * j + 2 * qd + e < qn) sum += best[j][e];
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (lane == 0) {
        const float v = sum / (float)q_total;
        *score = accumulate ? *score + v : v;
    }
}

__device__ __forceinline__ void maxsim_docs_tc_impl(const bf16* __restrict__ q, int qn,
                                                    int q_total, const bf16* __restrict__ docs,
                                                    const long long* __restrict__ offsets,
                                                    float* __restrict__ scores, int N, int D,
                                                    int accumulate) {
    R3_DYN_SMEM(unsigned, qs);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, qd = lane & 3;
    const int sw = md_stride_words(D);  // shared row stride in u32 words
    const int nb = (qn + 7) / 8;        // n-blocks of 8 query tokens
    md_load_query(qs, q, qn, D);
    const long long n = (long long)blockIdx.x * kMdWarps + warp;
    if (n >= N) return;
    const long long begin = offsets[n];
    const int len = (int)(offsets[n + 1] - begin);
    const int chunks = D / 32;
    float best[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) best[j][0] = best[j][1] = -INFINITY;
    for (int r0 = 0; r0 < len; r0 += 16) {
        const bool va = r0 + g < len, vb = r0 + g + 8 < len;
        // Chunk c of row r: uint4 index c * 4 + qd of the row.
        const uint4* pa = reinterpret_cast<const uint4*>(docs + (begin + r0 + g) * D) + qd;
        const uint4* pb = reinterpret_cast<const uint4*>(docs + (begin + r0 + g + 8) * D) + qd;
        const uint4 zero = {0u, 0u, 0u, 0u};
        uint4 ra[kMdDepth], rb[kMdDepth];
#pragma unroll
        for (int i = 0; i < kMdDepth; ++i) {
            ra[i] = va && i < chunks ? pa[i * 4] : zero;
            rb[i] = vb && i < chunks ? pb[i * 4] : zero;
        }
        float acc[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
        for (int c0 = 0; c0 < chunks; c0 += kMdDepth) {
#pragma unroll
            for (int i = 0; i < kMdDepth; ++i) {
                const int c = c0 + i;
                if (c >= chunks) break;  // warp-uniform
                const uint4 a = ra[i], b = rb[i];
                const int cn = c + kMdDepth;
                if (cn < chunks) {
                    ra[i] = va ? pa[cn * 4] : zero;
                    rb[i] = vb ? pb[cn * 4] : zero;
                }
                md_chunk_mma(acc, a, b, qs, sw, c, g, qd, nb);
            }
        }
        md_tile_max(best, acc, va, vb);
    }
    md_store_score(best, len, qn, q_total, qd, lane, scores + n, accumulate);
}

// maxsim_docs_tcp_bf16: the same scan (same fragments, the same sums in the same order) with the
// load pipeline kept running. Within a document the warp walks its 16-row tiles x D/32 chunks as
// one stream, loading kMdDepth chunks ahead across tile boundaries (maxsim_docs_tc_bf16 drains
// and refills its pipeline at every tile: one memory latency per 16 rows); and a warp takes
// documents n = w, w + W, ... (grid-stride over the W warps of the grid), so that a grid sized to
// the resident blocks (the launcher's rule: 2 per SM, or 1 where the query tile's shared memory
// allows only one) has no last partial wave of blocks.
// Needs D % (32 kMdDepth) == 0 besides the tensor-core kernel's rules (the launcher checks).
// 116 registers (launch bounds 256 x 2). Not yet run on a GPU.
__device__ __forceinline__ void maxsim_docs_tcp_impl(const bf16* __restrict__ q, int qn,
                                                     int q_total, const bf16* __restrict__ docs,
                                                     const long long* __restrict__ offsets,
                                                     float* __restrict__ scores, int N, int D,
                                                     int accumulate) {
    R3_DYN_SMEM(unsigned, qs);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, qd = lane & 3;
    const int sw = md_stride_words(D);
    const int nb = (qn + 7) / 8;
    md_load_query(qs, q, qn, D);
    const int chunks = D / 32;
    const long long rw = D / 8;  // uint4 per document row
    const uint4 zero = {0u, 0u, 0u, 0u};
    const long long warps = (long long)gridDim.x * kMdWarps;
    for (long long n = (long long)blockIdx.x * kMdWarps + warp; n < N; n += warps) {
        const long long begin = offsets[n];
        const int len = (int)(offsets[n + 1] - begin);
        const int tiles = (len + 15) / 16;
        // This lane's 16 bytes of chunk c of document row r: base[r * rw + 4 c].
        const uint4* base = reinterpret_cast<const uint4*>(docs + begin * D) + qd;
        uint4 ra[kMdDepth], rb[kMdDepth];
#pragma unroll
        for (int i = 0; i < kMdDepth; ++i) {  // chunks 0 .. kMdDepth of tile 0
            ra[i] = g < len ? base[g * rw + 4 * i] : zero;
            rb[i] = g + 8 < len ? base[(g + 8) * rw + 4 * i] : zero;
        }
        float best[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) best[j][0] = best[j][1] = -INFINITY;
        for (int t = 0; t < tiles; ++t) {
            float acc[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
            for (int c0 = 0; c0 < chunks; c0 += kMdDepth) {
                // The loads kMdDepth chunks ahead: the rest of this tile, then the next tile's
                // first chunks (none after the last tile).
                const bool wrap = c0 + kMdDepth == chunks;
                const int lt = wrap ? t + 1 : t, lc = wrap ? 0 : c0 + kMdDepth;
                const int ra_row = lt * 16 + g;
                const bool la = lt < tiles && ra_row < len, lb = lt < tiles && ra_row + 8 < len;
                // (Pointers formed only inside the document: lb implies la.)
                const uint4* pa = base + (la ? ra_row * rw : 0) + 4 * lc;
                const uint4* pb = lb ? pa + 8 * rw : pa;
#pragma unroll
                for (int i = 0; i < kMdDepth; ++i) {
                    const uint4 a = ra[i], b = rb[i];
                    ra[i] = la ? pa[4 * i] : zero;
                    rb[i] = lb ? pb[4 * i] : zero;
                    md_chunk_mma(acc, a, b, qs, sw, c0 + i, g, qd, nb);
                }
            }
            md_tile_max(best, acc, t * 16 + g < len, t * 16 + g + 8 < len);
        }
        md_store_score(best, len, qn, q_total, qd, lane, scores + n, accumulate);
    }
}

// One block per query token (b, t): dq[b,t] += Σ_n g(b,n) p[n, argmax], and the matching
// scatter dp[n, argmax] += g(b,n) q[b,t] with g(b,n) = dscores[b,n] / #valid tokens of b.
template <class T>
__device__ __forceinline__ void maxsim_bwd_impl(const T* __restrict__ q,
                                                const unsigned char* __restrict__ qmask,
                                                const T* __restrict__ p,
                                                const int* __restrict__ argmax,
                                                const float* __restrict__ dscores,
                                                float* __restrict__ dq, float* __restrict__ dp,
                                                int Bq, int Lq, int Bp, int Lp, int D) {
    const long long b = blockIdx.x / Lq, t = blockIdx.x % Lq;
    if (b >= Bq) return;
    float c = 0.f;
    for (int i = threadIdx.x; i < Lq; i += blockDim.x) c += qmask[b * Lq + i] ? 1.f : 0.f;
    const float count = block_sum(c);
    if (count == 0.f || !qmask[b * Lq + t]) return;  // the whole block leaves together
    const float inv = 1.f / count;
    const T* qr = q + (b * Lq + t) * D;
    float* dqr = dq + (b * Lq + t) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float qv = load(qr, d);
        float acc = 0.f;
        for (long long n = 0; n < Bp; ++n) {
            const int j = argmax[(b * Bp + n) * Lq + t];
            if (j < 0) continue;
            const float g = dscores[b * Bp + n] * inv;
            const long long row = (n * Lp + j) * D;
            acc += g * load(p, row + d);
            atomicAdd(&dp[row + d], g * qv);
        }
        dqr[d] += acc;
    }
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void __launch_bounds__(256)
    maxsim_fwd_f32(const float* q, const unsigned char* qmask, const float* p,
                   const unsigned char* pmask, float* scores, int* argmax, int Bq, int Lq, int Bp,
                   int Lp, int D) {
    r3::maxsim_fwd_impl(q, qmask, p, pmask, scores, argmax, Bq, Lq, Bp, Lp, D);
}
extern "C" __global__ void __launch_bounds__(256)
    maxsim_fwd_bf16(const bf16* q, const unsigned char* qmask, const bf16* p,
                    const unsigned char* pmask, float* scores, int* argmax, int Bq, int Lq, int Bp,
                    int Lp, int D) {
    r3::maxsim_fwd_impl(q, qmask, p, pmask, scores, argmax, Bq, Lq, Bp, Lp, D);
}
extern "C" __global__ void __launch_bounds__(256)
    maxsim_docs_f32(const float* q, int Lq, const float* docs, const long long* offsets,
                    float* scores, int N, int D) {
    r3::maxsim_docs_impl(q, Lq, docs, offsets, scores, N, D);
}
extern "C" __global__ void __launch_bounds__(256)
    maxsim_docs_bf16(const bf16* q, int Lq, const bf16* docs, const long long* offsets,
                     float* scores, int N, int D) {
    r3::maxsim_docs_impl(q, Lq, docs, offsets, scores, N, D);
}
extern "C" __global__ void __launch_bounds__(256)
    maxsim_docs_tc_bf16(const bf16* q, int qn, int q_total, const bf16* docs,
                        const long long* offsets, float* scores, int N, int D, int accumulate) {
    r3::maxsim_docs_tc_impl(q, qn, q_total, docs, offsets, scores, N, D, accumulate);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    maxsim_docs_tcp_bf16(const bf16* q, int qn, int q_total, const bf16* docs,
                         const long long* offsets, float* scores, int N, int D, int accumulate) {
    r3::maxsim_docs_tcp_impl(q, qn, q_total, docs, offsets, scores, N, D, accumulate);
}
extern "C" __global__ void __launch_bounds__(128)
    maxsim_bwd_f32(const float* q, const unsigned char* qmask, const float* p, const int* argmax,
                   const float* dscores, float* dq, float* dp, int Bq, int Lq, int Bp, int Lp,
                   int D) {
    r3::maxsim_bwd_impl(q, qmask, p, argmax, dscores, dq, dp, Bq, Lq, Bp, Lp, D);
}
extern "C" __global__ void __launch_bounds__(128)
    maxsim_bwd_bf16(const bf16* q, const unsigned char* qmask, const bf16* p, const int* argmax,
                    const float* dscores, float* dq, float* dp, int Bq, int Lq, int Bp, int Lp,
                    int D) {
    r3::maxsim_bwd_impl(q, qmask, p, argmax, dscores, dq, dp, Bq, Lq, Bp, Lp, D);
}

R3_EMU_EXPORT(maxsim_fwd_f32)
R3_EMU_EXPORT(maxsim_fwd_bf16)
R3_EMU_EXPORT(maxsim_docs_f32)
R3_EMU_EXPORT(maxsim_docs_bf16)
R3_EMU_EXPORT(maxsim_docs_tc_bf16)
R3_EMU_EXPORT(maxsim_docs_tcp_bf16)
R3_EMU_EXPORT(maxsim_bwd_f32)
R3_EMU_EXPORT(maxsim_bwd_bf16)
