// Sparse (lexical) head of M3: term weights, the per-text max by token id, the lexical score
// matrix, and their backward (reference: src/device/cpu/sparse.rs term_weights_fwd /
// term_weights_bwd / max_by_token_id / lexical_score / lexical_score_bwd).
//
// Layout (texts of one side padded to a common length L; rows = texts * L):
//   h [rows, hidden] and ws [hidden], bias [1] in T (f32 or bf16; f32 arithmetic); ids [rows] u32;
//   drop [ndrop] u32 (special ids that never count); weights [rows] f32 = ReLU(h . ws + b).
//   A text's compact list (capacity L, `count` entries used): lex_ids [texts, L] u32 sorted
//   ascending, lex_w [texts, L] f32 (max weight of the id in the text), lex_pos [texts, L] i32 (the
//   position the max came from, first on ties), count [texts] i32; slots past count hold
//   (0xFFFFFFFF, 0, -1). An id is left out when it is in `drop`, when its weight is 0 (ReLU) or
//   when its sort key (id << ceil(log2 L)) | pos would not be below 2^32 - 1 (the wrapper rejects
//   vocabularies where that can happen).
//   scores [Bq, Bp] f32: Σ over ids in both lists of w_q w_p.
//   sparse_scores_bwd: dscores [Bq, Bp] f32 -> dwq [Bq, Lq], dwp [Bp, Lp] f32, ASSIGNED: the
//   gradient of each position's term weight (0 except at argmax positions). Deterministic.
//   sparse_weights_bwd: dw [rows] f32 -> dh [rows, hidden] T assigned, dws [hidden] f32 and
//   db [1] f32 accumulated (+=); the ReLU gate is weights > 0.
//
// Launch: sparse_fwd: grid texts, block 256, dynamic shared memory 4 * next_pow2(L) bytes
// (L <= 8192: 32 KB). sparse_scores: grid ceil(Bq Bp / 8), block 256 (one warp per pair).
// sparse_scores_bwd: grid Bq + Bp, block 128. sparse_weights_bwd: grid min(ceil(rows / 8), 1024),
// block 256, dynamic shared memory 4 * hidden bytes.
//
// Why it is fast: never a [L, V] or [B, V] array. The 1024 -> 1 GEMV is a warp per row reading h
// once with 16-byte loads; each text is then deduplicated inside one block: 32-bit keys
// (id << ceil(log2 L)) | pos are bitonic-sorted in shared memory, segment heads are counted by a
// block scan, and each head walks its (short) run of equal ids for the first max. Scores are a
// warp per (query, passage) pair, lanes binary-searching the passage's sorted ids; the backward
// gives each list entry to one thread (no atomics) and writes the ReLU-gated GEMV transpose.
// Measured (H200): sparse_fwd_bf16 on 512 texts x 512 tokens x 1024 reads h at 2.8 TB/s,
// sort and dedup included (0.19 ms).
#include "common.cuh"

namespace r3 {

constexpr unsigned kNoKey = 0xffffffffu;

// Warp-wide dot product of two length-n vectors (every lane gets the sum).
template <class T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ a, const T* __restrict__ b,
                                          int n) {
    constexpr int V = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    if (is_aligned16(a) && is_aligned16(b) && n % V == 0) {
        for (int i = lane * V; i < n; i += 32 * V) {
            const Vec16<T> x = load16(a + i), y = load16(b + i);
#pragma unroll
            for (int e = 0; e < V; ++e) s += to_f32(x.v[e]) * to_f32(y.v[e]);
        }
    } else {
        for (int i = lane; i < n; i += 32) s += load(a, i) * load(b, i);
    }
    return warp_sum(s);
}

__device__ __forceinline__ int pos_bits(int L) { return L <= 1 ? 0 : 32 - __clz(L - 1); }

// Exclusive prefix sum over the block (1-D, size a multiple of 32): (this thread's prefix, sum).
__device__ __forceinline__ int2 block_exclusive_scan(int v) {
    __shared__ int wsum[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nwarps; ++w) {
        before += w < warp ? wsum[w] : 0;
        all += wsum[w];
    }
    return make_int2(before + x - v, all);
}

// Whether sorted key i starts the run of a token id.
__device__ __forceinline__ bool is_head(const unsigned* keys, int i, int pb) {
    return keys[i] != kNoKey && (i == 0 || (keys[i] >> pb) != (keys[i - 1] >> pb));
}

template <class T>
__device__ __forceinline__ void sparse_fwd_impl(
    const T* __restrict__ h, const T* __restrict__ ws, const T* __restrict__ bias,
    const unsigned* __restrict__ ids, const unsigned* __restrict__ drop, int ndrop,
    float* weights, unsigned* __restrict__ lex_ids, float* __restrict__ lex_w,
    int* __restrict__ lex_pos, int* __restrict__ count, int texts, int L, int hidden) {
    const long long text = blockIdx.x;
    if (text >= texts) return;
    R3_DYN_SMEM(unsigned, keys);  // [P2]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int pb = pos_bits(L), P2 = 1 << pb;
    const float b = load(bias, 0);
    // 1. Term weights (a warp per position) and the sort keys.
    for (int l = warp; l < L; l += nwarps) {
        const long long row = text * L + l;
        // ReLU keeping NaN (fmaxf would make it 0), as the CPU twin and PyTorch: a broken
        // model's NaN reaches the callers' finite checks.
        const float x = warp_dot(h + row * hidden, ws, hidden) + b;
        const float w = x <= 0.f ? 0.f : x;
        if (lane == 0) {
            weights[row] = w;
            const unsigned id = ids[row];
            bool keep = !(w <= 0.f);
            for (int k = 0; k < ndrop; ++k) keep = keep && id != drop[k];
            const unsigned long long key = ((unsigned long long)id << pb) | (unsigned)l;
            keys[l] = keep && key < kNoKey ? (unsigned)key : kNoKey;
        }
    }
    for (int i = L + threadIdx.x; i < P2; i += blockDim.x) keys[i] = kNoKey;
    __syncthreads();
    // 2. Bitonic sort of keys[0, P2) ascending.
    for (int k = 2; k <= P2; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P2; i += blockDim.x) {
                const int o = i ^ j;
                if (o > i) {
                    const unsigned a = keys[i], c = keys[o];
                    const bool up = (i & k) == 0;
                    if ((a > c) == up) {
                        keys[i] = c;
                        keys[o] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    // 3. Segment heads (first key of each id), their output slots by a block scan.
    const int chunk = (P2 + blockDim.x - 1) / blockDim.x;
    const int lo = min(P2, (int)threadIdx.x * chunk), hi = min(P2, lo + chunk);
    int heads = 0;
    for (int i = lo; i < hi; ++i) heads += is_head(keys, i, pb) ? 1 : 0;
    const int2 scan = block_exclusive_scan(heads);
    int slot = scan.x;
    const int total = scan.y;
    const long long base = text * L;
    for (int i = lo; i < hi; ++i) {
        if (!is_head(keys, i, pb)) continue;
        const unsigned id = keys[i] >> pb;
        int best_pos = (int)(keys[i] & (P2 - 1));
        float best = weights[base + best_pos];
        for (int j = i + 1; j < P2 && keys[j] != kNoKey && (keys[j] >> pb) == id; ++j) {
            const int pos = (int)(keys[j] & (P2 - 1));
            const float w = weights[base + pos];
            // Positions ascend: ties keep the first; a NaN wins (cpu::sparse::max_by_token_id).
            if (w > best || (w != w && best == best)) {
                best = w;
                best_pos = pos;
            }
        }
        lex_ids[base + slot] = id;
        lex_w[base + slot] = best;
        lex_pos[base + slot] = best_pos;
        ++slot;
    }
    if (threadIdx.x == 0) count[text] = total;
    for (int i = total + threadIdx.x; i < L; i += blockDim.x) {
        lex_ids[base + i] = kNoKey;
        lex_w[base + i] = 0.f;
        lex_pos[base + i] = -1;
    }
}

// Index of `id` in the sorted ids[0, n), or -1.
__device__ __forceinline__ int find_id(const unsigned* __restrict__ ids, int n, unsigned id) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ids[lo] == id ? lo : -1;
}

__device__ __forceinline__ void sparse_scores_impl(
    const unsigned* __restrict__ q_ids, const float* __restrict__ q_w,
    const int* __restrict__ q_count, int Bq, int Lq, const unsigned* __restrict__ p_ids,
    const float* __restrict__ p_w, const int* __restrict__ p_count, int Bp, int Lp,
    float* __restrict__ scores) {
    const long long pair = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (pair >= (long long)Bq * Bp) return;
    const long long i = pair / Bp, j = pair % Bp;
    const unsigned* qi = q_ids + i * Lq;
    const unsigned* pj = p_ids + j * Lp;
    const int nq = q_count[i], np = p_count[j];
    float s = 0.f;
    for (int e = lane; e < nq; e += 32) {
        const int f = find_id(pj, np, qi[e]);
        if (f >= 0) s += q_w[i * Lq + e] * p_w[j * Lp + f];
    }
    s = warp_sum(s);
    if (lane == 0) scores[pair] = s;
}

// Block x < Bq: query text x; otherwise passage text x - Bq. Each entry of the text's list sums
// dscores times the other side's weight of the same id over every text of the other side.
__device__ __forceinline__ void sparse_scores_bwd_impl(
    const unsigned* __restrict__ q_ids, const float* __restrict__ q_w,
    const int* __restrict__ q_pos, const int* __restrict__ q_count, int Bq, int Lq,
    const unsigned* __restrict__ p_ids, const float* __restrict__ p_w,
    const int* __restrict__ p_pos, const int* __restrict__ p_count, int Bp, int Lp,
    const float* __restrict__ dscores, float* dwq, float* dwp) {
    const long long x = blockIdx.x;
    if (x >= (long long)Bq + Bp) return;
    const bool qside = x < Bq;
    const long long me = qside ? x : x - Bq;
    const int L = qside ? Lq : Lp, Lo = qside ? Lp : Lq, others = qside ? Bp : Bq;
    const unsigned* my_ids = (qside ? q_ids : p_ids) + me * L;
    const int* my_pos = (qside ? q_pos : p_pos) + me * L;
    const int n = (qside ? q_count : p_count)[me];
    const unsigned* o_ids = qside ? p_ids : q_ids;
    const float* o_w = qside ? p_w : q_w;
    const int* o_count = qside ? p_count : q_count;
    float* dw = (qside ? dwq : dwp) + me * L;
    for (int l = threadIdx.x; l < L; l += blockDim.x) dw[l] = 0.f;
    __syncthreads();
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        const unsigned id = my_ids[e];
        float acc = 0.f;
        for (long long o = 0; o < others; ++o) {
            const float g = qside ? dscores[me * Bp + o] : dscores[o * Bp + me];
            if (g == 0.f) continue;
            const int f = find_id(o_ids + o * Lo, o_count[o], id);
            if (f >= 0) acc += g * o_w[o * Lo + f];
        }
        dw[my_pos[e]] = acc;
    }
}

template <class T>
__device__ __forceinline__ void sparse_weights_bwd_impl(
    const T* __restrict__ h, const T* __restrict__ ws, const float* __restrict__ weights,
    const float* __restrict__ dw, T* __restrict__ dh, float* __restrict__ dws,
    float* __restrict__ db, int rows, int hidden) {
    R3_DYN_SMEM(float, acc);  // [hidden]: this block's dws
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float dbias = 0.f;
    for (long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5); row < rows;
         row += (long long)gridDim.x * warps) {
        const float g = weights[row] > 0.f ? dw[row] : 0.f;
        const T* hr = h + row * hidden;
        T* dhr = dh + row * hidden;
        for (int i = lane; i < hidden; i += 32) store(dhr, i, g * load(ws, i));
        if (g != 0.f) {
            for (int i = lane; i < hidden; i += 32) atomicAdd(&acc[i], g * load(hr, i));
            if (lane == 0) dbias += g;
        }
    }
    dbias = block_sum(dbias);  // (its leading barrier also orders the shared atomics above)
    if (threadIdx.x == 0) atomicAdd(db, dbias);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) atomicAdd(&dws[i], acc[i]);
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void __launch_bounds__(256, 2)
    sparse_fwd_f32(const float* h, const float* ws, const float* bias, const unsigned* ids,
                   const unsigned* drop, int ndrop, float* weights, unsigned* lex_ids,
                   float* lex_w, int* lex_pos, int* count, int texts, int L, int hidden) {
    r3::sparse_fwd_impl(h, ws, bias, ids, drop, ndrop, weights, lex_ids, lex_w, lex_pos, count,
                        texts, L, hidden);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    sparse_fwd_bf16(const bf16* h, const bf16* ws, const bf16* bias, const unsigned* ids,
                    const unsigned* drop, int ndrop, float* weights, unsigned* lex_ids,
                    float* lex_w, int* lex_pos, int* count, int texts, int L, int hidden) {
    r3::sparse_fwd_impl(h, ws, bias, ids, drop, ndrop, weights, lex_ids, lex_w, lex_pos, count,
                        texts, L, hidden);
}
extern "C" __global__ void __launch_bounds__(256)
    sparse_scores_f32(const unsigned* q_ids, const float* q_w, const int* q_count, int Bq, int Lq,
                      const unsigned* p_ids, const float* p_w, const int* p_count, int Bp, int Lp,
                      float* scores) {
    r3::sparse_scores_impl(q_ids, q_w, q_count, Bq, Lq, p_ids, p_w, p_count, Bp, Lp, scores);
}
extern "C" __global__ void __launch_bounds__(128)
    sparse_scores_bwd_f32(const unsigned* q_ids, const float* q_w, const int* q_pos,
                          const int* q_count, int Bq, int Lq, const unsigned* p_ids,
                          const float* p_w, const int* p_pos, const int* p_count, int Bp, int Lp,
                          const float* dscores, float* dwq, float* dwp) {
    r3::sparse_scores_bwd_impl(q_ids, q_w, q_pos, q_count, Bq, Lq, p_ids, p_w, p_pos, p_count,
                               Bp, Lp, dscores, dwq, dwp);
}
extern "C" __global__ void __launch_bounds__(256, 1)
    sparse_weights_bwd_f32(const float* h, const float* ws, const float* weights, const float* dw,
                           float* dh, float* dws, float* db, int rows, int hidden) {
    r3::sparse_weights_bwd_impl(h, ws, weights, dw, dh, dws, db, rows, hidden);
}
extern "C" __global__ void __launch_bounds__(256, 1)
    sparse_weights_bwd_bf16(const bf16* h, const bf16* ws, const float* weights, const float* dw,
                            bf16* dh, float* dws, float* db, int rows, int hidden) {
    r3::sparse_weights_bwd_impl(h, ws, weights, dw, dh, dws, db, rows, hidden);
}

R3_EMU_EXPORT(sparse_fwd_f32)
R3_EMU_EXPORT(sparse_fwd_bf16)
R3_EMU_EXPORT(sparse_scores_f32)
R3_EMU_EXPORT(sparse_scores_bwd_f32)
R3_EMU_EXPORT(sparse_weights_bwd_f32)
R3_EMU_EXPORT(sparse_weights_bwd_bf16)
