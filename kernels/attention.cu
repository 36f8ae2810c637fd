// Fused multi-head attention, forward and backward, flash-style: keys are visited in tiles with an
// online softmax in f32, so no [Lq, Lk] score matrix ever exists in memory; the forward saves only
// the log-sum-exp per row and the backward recomputes P from it (reference:
// src/device/cpu/attention.rs attention_fwd / attention_bwd).
//
// Layout: q [B, Lq, H*D], k and v [B, Lk, H*D], out / dout / dq [B, Lq, H*D], dk / dv [B, Lk, H*D]
// in T (f32 or bf16; all arithmetic f32); lse [B, H, Lq] f32 (natural log; +inf marks a row that
// sees no key, which gets the uniform average over all Lk keys, PyTorch's finfo.min result).
// Masks, computed in-kernel (never an [L, L] array): mode 0 = key padding (key_mask [B, Lk] u8,
// 1 = real, NULL = no padding); mode 1 = the RetroMAE two-stream decoder mask (SPEC §10.3,
// cpu::attention::two_stream_visible): a row never sees itself nor padding, slot 0 is visible to
// rows != 0, otherwise key j is hidden from row i when vis_unit(vis_row_key(seed, b, i),
// words[b, j]) < p (words [B, Lk] u32, whole-word index; per score one 32-bit product of an odd
// row key and an odd word key, common.cuh vis_u32). Attention-probability dropout
// (drop_p > 0): p_ij is kept when drop_unit(drop_row_key(drop_seed, drop_stream,
// (b H + h) Lq + i), j) >= drop_p, scaled 1/(1-p) (a row key once per row, a drop_key once per
// key, one 32 x 32-bit product per score). Both draws are cpu::elementwise's
// bit for bit, so CPU and GPU see identical masks.
//
// Launch (kWarps = 4 warps = 128 threads, R = rows_per_warp<D>() = 4, or 2 for D = 128):
//   attention_fwd_d{D}_{T}:       grid (ceil(Lq / 4R), H, B); each warp owns R query rows.
//   attention_bwd_dq_d{D}_{T}:    grid (ceil(Lq / 4R), H, B); same shape, writes dq.
//   attention_bwd_dkdv_d{D}_{T}:  grid (ceil(Lk / 4R), H, B); each warp owns R keys, writes dk, dv.
//   attention_fwd_tc_d{D}_bf16:   grid (ceil(Lq / 64), H, B); tensor cores (mma.sync bf16), each
//                                 warp owns 16 query rows (see "forward on tensor cores" below);
//                                 attention_fwd_tcdb_d{D}_bf16 (D 32, 64) the same with two K/V
//                                 tile buffers filled by cp.async one tile ahead.
// No dynamic shared memory (static, at most ~46 KB: the double-buffered two-stream D = 64 one).
// __launch_bounds__(128, 2) on the CUDA-core kernels: with the thread count alone, ptxas 13.0
// capped some variants at 64 registers and spilled.
//
// Why it is fast (CUDA cores, correctness-first version; tensor cores come next): every K/V (or
// Q/dO) tile is read from global memory once per block and reused by all its rows from shared
// memory; in the score loops each lane owns one key (or query row) of a 32-wide tile and reads
// its row as 16-byte vectors from a (D + 4)-float padded shared row (conflict-free: 8 lanes per
// phase hit 8 distinct 4-bank groups) while the R rows of the warp are broadcast reads, so R
// FMAs x 4 are issued per 1 + R vector loads; the P·V / dS·K products have each lane own D/32
// output columns with accumulators in registers. The backward is deterministic: dK/dV are
// reduced over query tiles inside one block per key tile (no float atomics), and dQ by a second
// row-major pass that recomputes S and dP rather than storing them.
#include "common.cuh"

namespace r3 {

constexpr int kAttnWarps = 4;
constexpr int kAttnTile = 32;  // keys (forward, dq) or query rows (dkdv) per shared tile
// A score below every genuine one: masked keys get it, so a row with no visible key ends with
// max == kMasked and exp2(s - max) == 1 for all its keys (the uniform average), while one visible
// key drives exp2(kMasked - max) to 0. Keys past Lk get -inf and never count.
constexpr float kMasked = -1e30f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
__host__ __device__ constexpr int rows_per_warp() {
    return D >= 128 ? 2 : 4;
}

// Number of key (or query) tiles covering n. R3_MUTANT_ATTN (emulator mutation test only)
// drops the last partial tile: the emulated selftest must catch it.
__device__ __forceinline__ int attn_tiles(int n) {
#ifdef R3_MUTANT_ATTN
    return n / kAttnTile;
#else
    return (n + kAttnTile - 1) / kAttnTile;
#endif
}

// Everything the mask and dropout need, passed by value to the device functions.
struct AttnMaskArgs {
    const unsigned char* key_mask;  // [B, Lk] or NULL
    const unsigned* words;          // [B, Lk] (mode 1)
    int mode;                       // 0 key padding, 1 two-stream
    float p;                        // mode 1: word hidden with this probability
    unsigned long long seed;
    float drop_p;  // 0: no dropout
    unsigned long long drop_seed, drop_stream;
};

// cpu::attention::AttnMask::visible for modes 0 and 1 (i, j < Lq, Lk are the caller's job), with
// the row's mask key (vis_row_key(seed, b, i), mode 1) computed by the caller once per row.
__device__ __forceinline__ bool attn_visible_key(const AttnMaskArgs& a, unsigned row_key, int i,
                                                 int j, long long bj) {
    if (a.mode == 1 && j == i) return false;
    if (a.key_mask != nullptr && a.key_mask[bj] == 0) return false;
    if (a.mode == 0 || j == 0) return true;
    return vis_unit(row_key, a.words[bj]) >= a.p;
}
__device__ __forceinline__ unsigned attn_row_key(const AttnMaskArgs& a, int b, int i) {
    return a.mode == 1 ? vis_row_key(a.seed, (unsigned)b, (unsigned)i) : 0u;
}

// cpu::attention::AttnDropout / DropRow, bit for bit: p_ij is kept (factor 1/(1-p), else 0)
// when drop_unit(drop_row_key(drop_seed, drop_stream, bh Lq + i), j) >= drop_p. The row key is
// computed once per row (attn_drop_row; 0 without dropout), each score's draw is one folded
// product with its key's drop_key, a xor and an integer compare (attn_drop_at; 1 without
// dropout).
struct DropDraw {
    bool on;
    unsigned thr8, all;
    float scale;
};
__device__ __forceinline__ DropDraw attn_drop_draw(const AttnMaskArgs& a) {
    const VisDraw v = vis_draw(a.drop_p);
    DropDraw d;
    d.on = a.drop_p > 0.f;
    d.thr8 = v.thr8;
    d.all = v.all;
    d.scale = 1.f / (1.f - a.drop_p);
    return d;
}
__device__ __forceinline__ unsigned attn_drop_row(const AttnMaskArgs& a, int bh, int i, int lq) {
    return a.drop_p > 0.f ? drop_row_key(a.drop_seed, a.drop_stream,
                                         (unsigned long long)bh * lq + (unsigned)i)
                          : 0u;
}
__device__ __forceinline__ float attn_drop_at(const DropDraw& d, unsigned row_key, int j) {
    if (!d.on) return 1.f;
    // drop_key(j) is the same for every row of a key: the compiler shares it between the rows a
    // thread draws for (and hoists it where a thread keeps its keys).
    const unsigned k = drop_key((unsigned)j);
    return ((mum32(row_key, k) ^ k) >= d.thr8) && d.all ? d.scale : 0.f;
}

__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ float4 lds4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

// Copy `rows` token rows (from row0, clipped at n) of head h of a [B, n, H*D] tensor into a shared
// [rows][ld] f32 tile, times `mul`; rows past n become 0. All threads of the block take part.
template <class T, int D>
__device__ __forceinline__ void attn_load_tile(float* dst, int ld, const T* __restrict__ src,
                                               int b, int h, int heads, int n, int row0,
                                               int rows, float mul) {
    const long long w = (long long)heads * D;
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        const int r = e / D, d = e % D, t = row0 + r;
        dst[r * ld + d] = t < n ? load(src, ((long long)b * n + t) * w + (long long)h * D + d) * mul
                                : 0.f;
    }
}

// ---- forward ------------------------------------------------------------------------------------
template <class T, int D>
__device__ __forceinline__ void attention_fwd_impl(const T* __restrict__ q,
                                                   const T* __restrict__ k,
                                                   const T* __restrict__ v, T* __restrict__ out,
                                                   float* __restrict__ lse, int heads, int lq,
                                                   int lk, float scale, const AttnMaskArgs ma) {
    constexpr int R = rows_per_warp<D>(), BQ = kAttnWarps * R, LD = D + 4, C = D / 32;
    alignas(16) __shared__ float sq[BQ * D];
    alignas(16) __shared__ float sk[kAttnTile * LD];
    alignas(16) __shared__ float sv[kAttnTile * D];
    __shared__ float sp[kAttnWarps][R][kAttnTile];
    const int b = blockIdx.z, h = blockIdx.y, bh = b * heads + h;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * BQ, wrow = row0 + warp * R;
    // Scores in the log2 domain: exp2_ftz is one MUFU instruction.
    attn_load_tile<T, D>(sq, D, q, b, h, heads, lq, row0, BQ, scale * kLog2e);
    const DropDraw dd = attn_drop_draw(ma);
    float m[R], l[R], acc[R][C];
    unsigned drk[R], vrk[R];  // dropout and two-stream row keys
#pragma unroll
    for (int r = 0; r < R; ++r) {
        drk[r] = attn_drop_row(ma, bh, wrow + r, lq);
        vrk[r] = attn_row_key(ma, b, wrow + r);
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = 0.f;
    }
    const int tiles = attn_tiles(lk);
    for (int t = 0; t < tiles; ++t) {
        const int j0 = t * kAttnTile, j = j0 + lane;
        __syncthreads();  // the previous tile's readers are done
        attn_load_tile<T, D>(sk, LD, k, b, h, heads, lk, j0, kAttnTile, 1.f);
        attn_load_tile<T, D>(sv, D, v, b, h, heads, lk, j0, kAttnTile, 1.f);
        __syncthreads();
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.f;
#pragma unroll 4
        for (int d = 0; d < D; d += 4) {
            const float4 kd = lds4(&sk[lane * LD + d]);
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += dot4(lds4(&sq[(warp * R + r) * D + d]), kd);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = wrow + r;
            if (j >= lk) s[r] = -INFINITY;
            else if (!attn_visible_key(ma, vrk[r], i, j, (long long)b * lk + j)) s[r] = kMasked;
            const float mt = warp_max(s[r]);  // >= kMasked: lane 0's key j0 < lk
            const float mn = fmaxf(m[r], mt);
            const float corr = exp2_ftz(m[r] - mn);
            float pj = exp2_ftz(s[r] - mn);
            l[r] = l[r] * corr + warp_sum(pj);
            m[r] = mn;
            if (j < lk) pj *= attn_drop_at(dd, drk[r], j);
            sp[warp][r][lane] = pj;
#pragma unroll
            for (int c = 0; c < C; ++c) acc[r][c] *= corr;
        }
        __syncwarp();
#pragma unroll 4
        for (int jj = 0; jj < kAttnTile; ++jj) {
            float vd[C];
#pragma unroll
            for (int c = 0; c < C; ++c) vd[c] = sv[jj * D + lane + 32 * c];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float pr = sp[warp][r][jj];
#pragma unroll
                for (int c = 0; c < C; ++c) acc[r][c] += pr * vd[c];
            }
        }
    }
    const long long w = (long long)heads * D;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = wrow + r;
        if (i >= lq) break;
        const float inv = 1.f / l[r];
        T* o = out + ((long long)b * lq + i) * w + (long long)h * D;
#pragma unroll
        for (int c = 0; c < C; ++c) store(o, lane + 32 * c, acc[r][c] * inv);
        if (lane == 0)
            lse[(long long)bh * lq + i] = m[r] <= kMasked ? INFINITY : (m[r] + log2f(l[r])) * kLn2;
    }
}

// ---- backward, dQ: row-major like the forward ---------------------------------------------------
// dS_ij = P_ij (m_ij dP_ij - D_i) scale with dP_ij = dO_i·V_j and D_i = dO_i·O_i; dQ_i = Σ_j dS_ij K_j.
template <class T, int D>
__device__ __forceinline__ void attention_bwd_dq_impl(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ o, const float* __restrict__ lse, const T* __restrict__ dout,
    T* __restrict__ dq, int heads, int lq, int lk, float scale, const AttnMaskArgs ma) {
    constexpr int R = rows_per_warp<D>(), BQ = kAttnWarps * R, LD = D + 4, C = D / 32;
    alignas(16) __shared__ float sq[BQ * D];
    alignas(16) __shared__ float sdo[BQ * D];
    alignas(16) __shared__ float sk[kAttnTile * LD];
    alignas(16) __shared__ float sv[kAttnTile * LD];
    __shared__ float sds[kAttnWarps][R][kAttnTile];
    const int b = blockIdx.z, h = blockIdx.y, bh = b * heads + h;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * BQ, wrow = row0 + warp * R;
    const long long w = (long long)heads * D;
    attn_load_tile<T, D>(sq, D, q, b, h, heads, lq, row0, BQ, scale * kLog2e);
    attn_load_tile<T, D>(sdo, D, dout, b, h, heads, lq, row0, BQ, 1.f);
    __syncthreads();
    float lse2[R], di[R], acc[R][C];
    bool full[R];  // the row saw no key: P = 1/Lk everywhere, dS = 0
    const DropDraw dd = attn_drop_draw(ma);
    unsigned drk[R], vrk[R];  // dropout and two-stream row keys
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = wrow + r;
        drk[r] = attn_drop_row(ma, bh, i, lq);
        vrk[r] = attn_row_key(ma, b, i);
        const float ls = i < lq ? lse[(long long)bh * lq + i] : 0.f;
        full[r] = ls == INFINITY;
        lse2[r] = ls * kLog2e;
        float part = 0.f;
        if (i < lq) {
            const T* orow = o + ((long long)b * lq + i) * w + (long long)h * D;
            for (int d = lane; d < D; d += 32) part += sdo[(warp * R + r) * D + d] * load(orow, d);
        }
        di[r] = warp_sum(part);
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = 0.f;
    }
    const int tiles = attn_tiles(lk);
    for (int t = 0; t < tiles; ++t) {
        const int j0 = t * kAttnTile, j = j0 + lane;
        __syncthreads();
        attn_load_tile<T, D>(sk, LD, k, b, h, heads, lk, j0, kAttnTile, 1.f);
        attn_load_tile<T, D>(sv, LD, v, b, h, heads, lk, j0, kAttnTile, 1.f);
        __syncthreads();
        float s[R], dp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 2
        for (int d = 0; d < D; d += 4) {
            const float4 kd = lds4(&sk[lane * LD + d]), vd = lds4(&sv[lane * LD + d]);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                s[r] += dot4(lds4(&sq[(warp * R + r) * D + d]), kd);
                dp[r] += dot4(lds4(&sdo[(warp * R + r) * D + d]), vd);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = wrow + r;
            float ds = 0.f;
            if (j < lk && !full[r] && attn_visible_key(ma, vrk[r], i, j, (long long)b * lk + j)) {
                const float p = exp2_ftz(s[r] - lse2[r]);
                ds = p * (attn_drop_at(dd, drk[r], j) * dp[r] - di[r]) * scale;
            }
            sds[warp][r][lane] = ds;
        }
        __syncwarp();
#pragma unroll 4
        for (int jj = 0; jj < kAttnTile; ++jj) {
            float kd[C];
#pragma unroll
            for (int c = 0; c < C; ++c) kd[c] = sk[jj * LD + lane + 32 * c];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float g = sds[warp][r][jj];
#pragma unroll
                for (int c = 0; c < C; ++c) acc[r][c] += g * kd[c];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = wrow + r;
        if (i >= lq) break;
        T* g = dq + ((long long)b * lq + i) * w + (long long)h * D;
#pragma unroll
        for (int c = 0; c < C; ++c) store(g, lane + 32 * c, acc[r][c]);
    }
}

// ---- backward, dK and dV: key-major, one block per key tile, query tiles reduced in registers ----
// dV_j = Σ_i P_ij m_ij dO_i ; dK_j = Σ_i dS_ij Q_i.
template <class T, int D>
__device__ __forceinline__ void attention_bwd_dkdv_impl(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ o, const float* __restrict__ lse, const T* __restrict__ dout,
    T* __restrict__ dk, T* __restrict__ dv, int heads, int lq, int lk, float scale,
    const AttnMaskArgs ma) {
    constexpr int R = rows_per_warp<D>(), BK = kAttnWarps * R, LD = D + 4, C = D / 32;
    constexpr int RowsPerWarp = kAttnTile / kAttnWarps;
    alignas(16) __shared__ float sk[BK * D];
    alignas(16) __shared__ float sv[BK * D];
    alignas(16) __shared__ float sq[kAttnTile * LD];
    alignas(16) __shared__ float sdo[kAttnTile * LD];
    __shared__ float slse2[kAttnTile], sdi[kAttnTile];
    __shared__ float spm[kAttnWarps][R][kAttnTile], sds[kAttnWarps][R][kAttnTile];
    const int b = blockIdx.z, h = blockIdx.y, bh = b * heads + h;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int key0 = blockIdx.x * BK, wkey = key0 + warp * R;
    const long long w = (long long)heads * D;
    const float inv_lk = 1.f / lk, qmul = scale * kLog2e;
    attn_load_tile<T, D>(sk, D, k, b, h, heads, lk, key0, BK, 1.f);
    attn_load_tile<T, D>(sv, D, v, b, h, heads, lk, key0, BK, 1.f);
    const DropDraw dd = attn_drop_draw(ma);
    float gk[R][C], gv[R][C];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < C; ++c) gk[r][c] = gv[r][c] = 0.f;
    const int tiles = attn_tiles(lq);
    for (int t = 0; t < tiles; ++t) {
        const int i0 = t * kAttnTile, i = i0 + lane;
        __syncthreads();
        attn_load_tile<T, D>(sq, LD, q, b, h, heads, lq, i0, kAttnTile, 1.f);
        attn_load_tile<T, D>(sdo, LD, dout, b, h, heads, lq, i0, kAttnTile, 1.f);
        __syncthreads();
        // D_i = dO_i·O_i and lse of this tile's rows: warp w takes rows w, w + 4, ...
        for (int rr = 0; rr < RowsPerWarp; ++rr) {
            const int row = warp + kAttnWarps * rr, ii = i0 + row;
            float part = 0.f;
            if (ii < lq) {
                const T* orow = o + ((long long)b * lq + ii) * w + (long long)h * D;
                for (int d = lane; d < D; d += 32) part += sdo[row * LD + d] * load(orow, d);
            }
            part = warp_sum(part);
            if (lane == 0) {
                sdi[row] = part;
                slse2[row] = ii < lq ? lse[(long long)bh * lq + ii] * kLog2e : 0.f;
            }
        }
        __syncthreads();
        float s[R], dp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 2
        for (int d = 0; d < D; d += 4) {
            const float4 qd = lds4(&sq[lane * LD + d]), gd = lds4(&sdo[lane * LD + d]);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                s[r] += dot4(lds4(&sk[(warp * R + r) * D + d]), qd);
                dp[r] += dot4(lds4(&sv[(warp * R + r) * D + d]), gd);
            }
        }
        const float l2 = slse2[lane], dii = sdi[lane];
        const bool full = l2 == INFINITY;
        // This lane's row i: its dropout and two-stream keys.
        const unsigned drk = attn_drop_row(ma, bh, i, lq), vrk = attn_row_key(ma, b, i);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int j = wkey + r;
            float pm = 0.f, ds = 0.f;
            if (i < lq && j < lk) {
                const float mdrop = attn_drop_at(dd, drk, j);
                if (full) {
                    pm = inv_lk * mdrop;
                } else if (attn_visible_key(ma, vrk, i, j, (long long)b * lk + j)) {
                    const float p = exp2_ftz(s[r] * qmul - l2);
                    pm = p * mdrop;
                    ds = p * (mdrop * dp[r] - dii) * scale;
                }
            }
            spm[warp][r][lane] = pm;
            sds[warp][r][lane] = ds;
        }
        __syncwarp();
#pragma unroll 4
        for (int ii = 0; ii < kAttnTile; ++ii) {
            float qd[C], gd[C];
#pragma unroll
            for (int c = 0; c < C; ++c) {
                qd[c] = sq[ii * LD + lane + 32 * c];
                gd[c] = sdo[ii * LD + lane + 32 * c];
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float a = spm[warp][r][ii], g = sds[warp][r][ii];
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    gv[r][c] += a * gd[c];
                    gk[r][c] += g * qd[c];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int j = wkey + r;
        if (j >= lk) break;
        const long long off = ((long long)b * lk + j) * w + (long long)h * D;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            store(dk + off, lane + 32 * c, gk[r][c]);
            store(dv + off, lane + 32 * c, gv[r][c]);
        }
    }
}

// ---- forward on tensor cores (bf16) --------------------------------------------------------------
// FlashAttention-2's forward on mma.sync.m16n8k16 (common.cuh): a block of 4 warps owns 64 query
// rows, each warp 16; K and V tiles of 64 keys are staged in shared memory as bf16 (16-byte loads
// and stores: 8 per thread and tile at D = 64, where 4-byte ones took 32). Per tile a
// warp computes S = Q Kᵀ (16 x 64, f32 accumulators: D/16 k-steps x 8 n-tiles), applies the mask
// and the online softmax on its accumulator fragments (a row's 64 scores live in one quad of 4
// lanes: two shuffles reduce them), turns P into bf16 A fragments in registers (the C layout of
// two n-tiles is the A layout of one 16-wide k-step) and accumulates O += P V. Q stays in
// registers as A fragments; the scale is applied to the f32 scores, not to bf16 Q. Masking,
// dropout, the all-masked-row rule and lse are those of attention_fwd_impl (same helpers), so the
// two kernels agree up to bf16 rounding of P.
//
// Heads per block: gridDim.y = heads / hpb and a block runs hpb heads one after the other. The
// two-stream mask depends on (b, row, key) only, so with hpb > 1 the first head draws it and keeps
// each thread's 32 visibility bits per key tile in dynamic shared memory (512 bytes per tile, for
// as many tiles from the first as the launch's shared_bytes hold: the launcher's rule,
// device::kernels::tc_mask_tiles, keeps the resident blocks per SM); the other heads read the
// bits instead of drawing again, and draw for themselves past the cached tiles.
constexpr int kTcRows = 64;  // query rows per block (4 warps x 16)
constexpr int kTcKeys = 64;  // keys per shared tile

// 16 rows (r0 = row g, r1 = row g + 8 of the warp's 16) of head h of a [B, n, H*D] bf16 tensor as
// mma A fragments (zeros past n).
template <int D>
__device__ __forceinline__ void tc_load_a(unsigned a[D / 16][4], const unsigned short* t, int b,
                                          int h, int heads, int n, int r0, int qd) {
    const long long w = (long long)heads * D;
    const unsigned short* p0 = t + ((long long)b * n + r0) * w + (long long)h * D;
    const unsigned short* p1 = p0 + 8 * w;
    auto ld2 = [](const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); };
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const int c = ks * 16 + 2 * qd;
        a[ks][0] = r0 < n ? ld2(p0 + c) : 0u;
        a[ks][1] = r0 + 8 < n ? ld2(p1 + c) : 0u;
        a[ks][2] = r0 < n ? ld2(p0 + c + 8) : 0u;
        a[ks][3] = r0 + 8 < n ? ld2(p1 + c + 8) : 0u;
    }
}


// `rows` token rows (from row0) of head h of a [B, n, H*D] bf16 tensor into a shared [rows][LDS]
// bf16 tile (zeros past n), 16 bytes (8 elements) per load and store: the tensor must be 16-byte
// aligned (the launchers check; rows are H*D elements apart, D % 8 == 0) and LDS % 8 == 0.
template <int D, int LDS>
__device__ __forceinline__ void tc_load_tile(unsigned short* dst, const unsigned short* src, int b,
                                             int h, int heads, int n, int row0, int rows) {
    static_assert(D % 8 == 0 && LDS % 8 == 0, "16-byte rows");
    const long long w = (long long)heads * D;
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int e = threadIdx.x; e < rows * D / 8; e += blockDim.x) {
        const int r = e / (D / 8), c = 8 * (e % (D / 8)), t = row0 + r;
        const uint4 val =
            t < n ? *reinterpret_cast<const uint4*>(src + ((long long)b * n + t) * w +
                                                    (long long)h * D + c)
                  : zero;
        *reinterpret_cast<uint4*>(&dst[r * LDS + c]) = val;
    }
}

// tc_load_tile with cp.async: the copies are issued (zeros past n), the caller commits and waits.
template <int D, int LDS>
__device__ __forceinline__ void tc_issue_tile(unsigned short* dst, const unsigned short* src,
                                              int b, int h, int heads, int n, int row0,
                                              int rows) {
    const long long w = (long long)heads * D;
    for (int e = threadIdx.x; e < rows * D / 8; e += blockDim.x) {
        const int r = e / (D / 8), c = 8 * (e % (D / 8)), t = row0 + r;
        const long long row = (long long)b * n + (t < n ? t : 0);  // a valid address past n
        cp_async16(&dst[r * LDS + c], src + row * w + (long long)h * D + c, t < n);
    }
}

// One key's state for the tensor-core forward: 0 visible, 1 padding, 2 past Lk; and (two-stream)
// its word's key (vis_word_key).
__device__ __forceinline__ void tc_key_state(const AttnMaskArgs& ma, int b, int lk, int j,
                                             unsigned char& st, unsigned& wm) {
    const long long bj = (long long)b * lk + j;
    st = j >= lk ? 2 : (ma.key_mask && !ma.key_mask[bj]) ? 1 : 0;
    wm = ma.mode == 1 && j < lk ? vis_word_key(ma.words[bj]) : 0u;
}
// The key states of the 64-key tile from j0 into skey / sword (sword only when TS).
template <bool TS>
__device__ __forceinline__ void tc_fill_key_state(const AttnMaskArgs& ma, int b, int lk, int j0,
                                                  unsigned char* skey, unsigned* sword) {
    for (int r = threadIdx.x; r < kTcKeys; r += blockDim.x) {
        unsigned wm;
        tc_key_state(ma, b, lk, j0 + r, skey[r], wm);
        if (TS) sword[r] = wm;
    }
}

// The two-stream visibility of a thread's 32 C-fragment scores of a 64-key tile: bit nt * 4 + e is
// (row e < 2 ? r0 : r0 + 8, key j0 + nt * 8 + 2 qd + (e & 1)). Padding and keys past Lk are the
// caller's (its key state). Every score is drawn without a branch (sword: the tile's word
// keys; a short-circuit test compiled to one branch region per score); the two rules that
// touch single keys run in tile-uniform branches: key 0 is visible to the other rows (tile 0) and
// a row never sees itself (the tile that overlaps the rows [row_base, row_base + kTcRows)).
// The bits are set in ascending order: ptxas then packs the compares' predicates 7 at a time
// (P2R); in the order (nt, key, row) it selected and or-ed each bit (SEL + LOP3, ~60 more
// instructions per tile: tools/sass-counts.sh).
template <int NT>
__device__ __forceinline__ unsigned ts_fragment_bits(const unsigned* sword, unsigned rk0,
                                                     unsigned rk1, VisDraw vd, int qd, int j0,
                                                     int r0, int row_base) {
    unsigned bits = 0u;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const unsigned w0 = sword[nt * 8 + 2 * qd], w1 = sword[nt * 8 + 2 * qd + 1];
#pragma unroll
        for (int e = 0; e < 4; ++e)
            bits |= vis_draw_bit(e < 2 ? rk0 : rk1, (e & 1) ? w1 : w0, vd.thr8) << (nt * 4 + e);
    }
    bits &= vd.all;
    if (j0 == 0 && qd == 0) bits |= 0x5u;  // key 0: (nt 0, e 0) and (nt 0, e 2)
    if (j0 < row_base + kTcRows && row_base < j0 + NT * 8) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (j0 + nt * 8 + 2 * qd + (e & 1) == r0 + (e >> 1) * 8)
                    bits &= ~(1u << (nt * 4 + e));
    }
    return bits;
}

// Whether every key of the 64-key tile in skey is a real, unpadded one (state 0): then the
// per-score padding tests are skipped. Warp-uniform (every lane of the warp must call it).
__device__ __forceinline__ bool tc_tile_clean(const unsigned char* skey, int lane) {
    unsigned w = 0u;
    if (lane < kTcKeys / 4)
        w = skey[4 * lane] | skey[4 * lane + 1] | skey[4 * lane + 2] | skey[4 * lane + 3];
    return !__any_sync(kFullMask, w != 0u);
}

// TS: the two-stream entry points (mode 1); the key-padding ones carry no mask-bit storage.
template <int D, bool TS, bool DB>
__device__ __forceinline__ void attention_fwd_tc_impl(const bf16* __restrict__ q,
                                                      const bf16* __restrict__ k,
                                                      const bf16* __restrict__ v,
                                                      bf16* __restrict__ out,
                                                      float* __restrict__ lse, int heads, int lq,
                                                      int lk, float scale, const AttnMaskArgs ma) {
    constexpr int KS = D / 16, NT = kTcKeys / 8, OT = D / 8, LDS = D + 8, NB = DB ? 2 : 1;
    // NB buffers of a K and a V tile (DB: the next tile's arrive by cp.async during this one's
    // products).
    alignas(16) __shared__ unsigned short sk[NB * kTcKeys * LDS];
    alignas(16) __shared__ unsigned short sv[NB * kTcKeys * LDS];
    // Per key of the tile: 0 = visible, 1 = masked (padding), 2 = past Lk; two-stream mode also
    // its word's key (vis_keep), so the per-score test reads shared memory only.
    __shared__ unsigned char skey[NB * kTcKeys];
    __shared__ unsigned sword[TS ? NB * kTcKeys : 1];
    // The mask cache (hpb > 1): [key tile][thread], 32 bits each, in dynamic shared memory, for
    // the first cache_tiles key tiles (as many as the launch gave it bytes for: the launcher's
    // rule, device::kernels::tc_mask_tiles); the tiles past them every head draws for itself.
    R3_DYN_SMEM(unsigned, mbits);
    const VisDraw vd = vis_draw(ma.p);
    const DropDraw dd = attn_drop_draw(ma);
    const int hpb = heads / (int)gridDim.y;
    const int cache_tiles = TS && hpb > 1 ? (int)(dyn_smem_bytes() / (kTcRows * 2 * 4)) : 0;
    const int b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int r0 = blockIdx.x * kTcRows + warp * 16 + g, r1 = r0 + 8;
    const unsigned rk0 = attn_row_key(ma, b, r0), rk1 = attn_row_key(ma, b, r1);
    const long long w = (long long)heads * D;
    const unsigned short* q16 = reinterpret_cast<const unsigned short*>(q);
    const unsigned short* k16 = reinterpret_cast<const unsigned short*>(k);
    const unsigned short* v16 = reinterpret_cast<const unsigned short*>(v);
    for (int hh = 0; hh < hpb; ++hh) {
        const int h = blockIdx.y * hpb + hh, bh = b * heads + h;
        unsigned qa[KS][4];
        tc_load_a<D>(qa, q16, b, h, heads, lq, r0, qd);
        const unsigned drk0 = attn_drop_row(ma, bh, r0, lq), drk1 = attn_drop_row(ma, bh, r1, lq);
        const float sl2 = scale * kLog2e;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
        float o[OT][4];
#pragma unroll
        for (int t = 0; t < OT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
        const int tiles = (lk + kTcKeys - 1) / kTcKeys;
        if (DB) {  // tile 0 into buffer 0 (the previous head's readers passed its last barrier)
            tc_issue_tile<D, LDS>(sk, k16, b, h, heads, lk, 0, kTcKeys);
            tc_issue_tile<D, LDS>(sv, v16, b, h, heads, lk, 0, kTcKeys);
            cp_async_commit();
            tc_fill_key_state<TS>(ma, b, lk, 0, skey, sword);
        }
        for (int t = 0; t < tiles; ++t) {
            const int j0 = t * kTcKeys, buf = DB ? (t & 1) : 0;
            const bool next = DB && t + 1 < tiles;
            // DB: this thread's key state of the next tile, stored after the products.
            unsigned char nst = 0;
            unsigned nwm = 0u;
            if (DB) {
                if (next) {  // the other buffer's readers (tile t - 1) passed the last barrier
                    const int off = (buf ^ 1) * kTcKeys * LDS;
                    tc_issue_tile<D, LDS>(sk + off, k16, b, h, heads, lk, j0 + kTcKeys, kTcKeys);
                    tc_issue_tile<D, LDS>(sv + off, v16, b, h, heads, lk, j0 + kTcKeys, kTcKeys);
                    cp_async_commit();
                    if (threadIdx.x < kTcKeys)
                        tc_key_state(ma, b, lk, j0 + kTcKeys + threadIdx.x, nst, nwm);
#ifdef R3_MUTANT_ATTN
                    // Emulator mutation test only: the plain kernel may read tile t in flight.
                    if (TS) cp_async_wait<1>();
                    else cp_async_wait<2>();
#else
                    cp_async_wait<1>();  // tile t's copies (this thread's) have landed
#endif
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();  // ... and every thread's, with tile t's key state
            } else {
                __syncthreads();  // the previous tile's readers are done
                tc_load_tile<D, LDS>(sk, k16, b, h, heads, lk, j0, kTcKeys);
                tc_load_tile<D, LDS>(sv, v16, b, h, heads, lk, j0, kTcKeys);
                tc_fill_key_state<TS>(ma, b, lk, j0, skey, sword);
                __syncthreads();
            }
            const unsigned short* skt = sk + buf * kTcKeys * LDS;
            const unsigned short* svt = sv + buf * kTcKeys * LDS;
            const unsigned char* skeyt = skey + buf * kTcKeys;
            const unsigned* swordt = sword + (TS ? buf * kTcKeys : 0);
            float s[NT][4];
            // ldmatrix row addresses: lane l serves row l % 8 of matrix l / 8.
            const int mrow = lane & 7, mi = lane >> 3;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < KS; ks += 2) {
                    // Matrices: (k-step ks, cols lo), (ks, hi), (ks + 1, lo), (ks + 1, hi).
                    unsigned kb[4];
                    ldmatrix_x4(
                        kb, &skt[(nt * 8 + mrow) * LDS + (ks + (mi >> 1)) * 16 + (mi & 1) * 8]);
                    mma_bf16_16816(s[nt], qa[ks], kb[0], kb[1]);
                    mma_bf16_16816(s[nt], qa[ks + 1], kb[2], kb[3]);
                }
            }
            float mt[2] = {-INFINITY, -INFINITY};
            const bool clean = tc_tile_clean(skeyt, lane);
            // This tile's mask bits live in the cache (the block's first head draws them, the
            // others read them), or every head draws for itself.
            const bool cached = t < cache_tiles, draw = !cached || hh == 0;
            // Direct draw: a head that draws for itself alone (no cache to fill), in a clean
            // tile that holds neither key 0 nor any of the block's own rows (the two single-key
            // rules), with p < 1: each score's draw goes straight into its select, no bits.
            // Block-uniform.
            const int row_base = blockIdx.x * kTcRows;
            const bool direct = TS && !cached && clean && vd.all != 0u && j0 != 0 &&
                                !(j0 < row_base + kTcRows && row_base < j0 + kTcKeys);
            // Otherwise the two-stream visibility of this thread's 32 scores (bit nt * 4 + e):
            // drawn (a warp-uniform branch around the whole draw, so the heads that read the
            // cached bits do not issue it predicated off) or read back.
            unsigned bits = 0u;
            if (TS && !direct) {
                if (draw) {
                    bits = ts_fragment_bits<NT>(swordt, rk0, rk1, vd, qd, j0, r0, row_base);
                    if (cached) mbits[t * (kTcRows * 2) + threadIdx.x] = bits;
                } else {
                    bits = mbits[t * (kTcRows * 2) + threadIdx.x];
                }
            }
            // Scale and mask. A clean tile (no padding, no key past Lk: most tiles) needs no key
            // state: the plain kernel leaves its scores as they are, the two-stream one masks
            // by the draws or the bits alone.
            if (direct) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const unsigned wk = swordt[nt * 8 + 2 * qd + (e & 1)];
                        float x = s[nt][e] * sl2;
                        if (vis_u32(e < 2 ? rk0 : rk1, wk) < vd.thr8) x = kMasked;
                        s[nt][e] = x;
                        mt[e >> 1] = fmaxf(mt[e >> 1], x);
                    }
            } else if (clean) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[nt][e] * sl2;
                        if (TS && !((bits >> (nt * 4 + e)) & 1u)) x = kMasked;
                        s[nt][e] = x;
                        mt[e >> 1] = fmaxf(mt[e >> 1], x);
                    }
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = nt * 8 + 2 * qd + (e & 1);
                        float x = s[nt][e] * sl2;
                        const int st = skeyt[c];
                        if (st == 2) x = -INFINITY;
                        else if (st == 1 || (TS && !((bits >> (nt * 4 + e)) & 1u))) x = kMasked;
                        s[nt][e] = x;
                        mt[e >> 1] = fmaxf(mt[e >> 1], x);
                    }
            }
            float corr[2];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                mt[rr] = fmaxf(mt[rr], __shfl_xor_sync(kFullMask, mt[rr], 1));
                mt[rr] = fmaxf(mt[rr], __shfl_xor_sync(kFullMask, mt[rr], 2));
                const float mn = fmaxf(m[rr], mt[rr]);  // >= kMasked: key j0 < lk is in every tile
                corr[rr] = exp2_ftz(m[rr] - mn);
                m[rr] = mn;
            }
            float rs[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float pj = exp2_ftz(s[nt][e] - m[e >> 1]);
                    rs[e >> 1] += pj;
                    if (dd.on) {
                        const int j = j0 + nt * 8 + 2 * qd + (e & 1);
                        s[nt][e] = pj * attn_drop_at(dd, e < 2 ? drk0 : drk1, j);
                    } else {
                        s[nt][e] = pj;
                    }
                }
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                rs[rr] += __shfl_xor_sync(kFullMask, rs[rr], 1);
                rs[rr] += __shfl_xor_sync(kFullMask, rs[rr], 2);
                l[rr] = l[rr] * corr[rr] + rs[rr];
            }
#pragma unroll
            for (int ot = 0; ot < OT; ++ot) {
                o[ot][0] *= corr[0];
                o[ot][1] *= corr[0];
                o[ot][2] *= corr[1];
                o[ot][3] *= corr[1];
            }
#pragma unroll
            for (int kk = 0; kk < kTcKeys / 16; ++kk) {
                const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                                        pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int ot = 0; ot < OT; ot += 2) {
                    // Matrices: (keys lo, d-tile ot), (keys hi, ot), (keys lo, ot + 1),
                    // (keys hi, ot + 1).
                    unsigned vb[4];
                    ldmatrix_x4_trans(
                        vb, &svt[(kk * 16 + (mi & 1) * 8 + mrow) * LDS + (ot + (mi >> 1)) * 8]);
                    mma_bf16_16816(o[ot], pa, vb[0], vb[1]);
                    mma_bf16_16816(o[ot + 1], pa, vb[2], vb[3]);
                }
            }
            if (DB) {
                if (next && threadIdx.x < kTcKeys) {
                    skey[(buf ^ 1) * kTcKeys + threadIdx.x] = nst;
                    if (TS) sword[(buf ^ 1) * kTcKeys + threadIdx.x] = nwm;
                }
#ifdef R3_MUTANT_ATTN
                // Emulator mutation test only: the two-stream kernel refills a buffer other
                // warps may still be reading (caught under the warp-serial schedules).
                if (!TS) __syncthreads();
#else
                __syncthreads();  // this buffer's readers are done before it is refilled
#endif
            }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int i = rr == 0 ? r0 : r1;
            if (i >= lq) continue;
            const float inv = 1.f / l[rr];
            unsigned* orow = reinterpret_cast<unsigned*>(
                reinterpret_cast<unsigned short*>(out) + ((long long)b * lq + i) * w +
                (long long)h * D);
#pragma unroll
            for (int ot = 0; ot < OT; ++ot)
                orow[(ot * 8 + 2 * qd) / 2] =
                    pack_bf16(o[ot][2 * rr] * inv, o[ot][2 * rr + 1] * inv);
            if (qd == 0)
                lse[(long long)bh * lq + i] =
                    m[rr] <= kMasked ? INFINITY : (m[rr] + log2f(l[rr])) * kLn2;
        }
    }  // heads of the block
}

// ---- backward on tensor cores (bf16, D 32 and 64) -------------------------------------------------
// The CUDA-core backward's math (dS = P (m dP - D) scale, dQ = dS K, dK = dSᵀ Q, dV = (P m)ᵀ dO)
// on mma.sync.m16n8k16, FlashAttention-2 style, in two deterministic launches (no atomics):
//   attention_bwd_dq_tc_d{D}_bf16:   grid (ceil(Lq / 64), H, B); a warp owns 16 query rows (Q and
//     dO as A fragments in registers), visits 64-key tiles of K, V in shared memory: S = Q Kᵀ,
//     dP = dO Vᵀ, dS per score, dQ += dS K (dS's C fragments become A fragments).
//   attention_bwd_dkdv_tc_d{D}_bf16: grid (ceil(Lk / 64), H, B); a warp owns 16 keys (K and V as
//     A fragments), visits 32-row tiles of Q, dO: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, then dV += (P m)ᵀ dO and
//     dK += dSᵀ Q. D_i = dO_i·O_i, lse and (two-stream) each row's mask key are per-tile arrays.
// P and dS are rounded to bf16 before their products (as FlashAttention does); everything else
// accumulates in f32. D = 128 keeps the CUDA-core kernels (the accumulators would not fit).
constexpr int kTcBwdQ = 32;  // query rows per shared tile of the dK/dV kernel

// C[16 x 8·NT] += A (16 x D, fragments) · Bᵀ, B's rows [8·NT][D] in shared memory (row-major).
template <int D, int NT, int LDS>
__device__ __forceinline__ void tc_mm_abt(float c[NT][4], const unsigned a[D / 16][4],
                                          const unsigned short* sb, int lane) {
    const int mrow = lane & 7, mi = lane >> 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int ks = 0; ks < D / 16; ks += 2) {
            unsigned bb[4];
            ldmatrix_x4(bb, &sb[(nt * 8 + mrow) * LDS + (ks + (mi >> 1)) * 16 + (mi & 1) * 8]);
            mma_bf16_16816(c[nt], a[ks], bb[0], bb[1]);
            mma_bf16_16816(c[nt], a[ks + 1], bb[2], bb[3]);
        }
}

// O[16 x D] += P (16 x 16·KT, the C fragments p of n-tiles 0..2KT-1) · B, B [16·KT][D] in shared
// memory (row-major).
template <int D, int KT, int LDS>
__device__ __forceinline__ void tc_mm_pb(float o[D / 8][4], const float p[2 * KT][4],
                                         const unsigned short* sb, int lane) {
    const int mrow = lane & 7, mi = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        const unsigned pa[4] = {pack_bf16(p[2 * kk][0], p[2 * kk][1]),
                                pack_bf16(p[2 * kk][2], p[2 * kk][3]),
                                pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int ot = 0; ot < D / 8; ot += 2) {
            unsigned bb[4];
            ldmatrix_x4_trans(bb, &sb[(kk * 16 + (mi & 1) * 8 + mrow) * LDS + (ot + (mi >> 1)) * 8]);
            mma_bf16_16816(o[ot], pa, bb[0], bb[1]);
            mma_bf16_16816(o[ot + 1], pa, bb[2], bb[3]);
        }
    }
}

// Rows r0 and r0 + 8 of a [16 x D] f32 C-fragment accumulator into head h of [B, n, H*D] bf16.
template <int D>
__device__ __forceinline__ void tc_store_c(unsigned short* t, const float c[D / 8][4], int b,
                                           int h, int heads, int n, int r0, int qd) {
    const long long w = (long long)heads * D;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = r0 + 8 * rr;
        if (r >= n) continue;
        unsigned* row = reinterpret_cast<unsigned*>(t + ((long long)b * n + r) * w +
                                                    (long long)h * D);
#pragma unroll
        for (int ot = 0; ot < D / 8; ++ot)
            row[(ot * 8 + 2 * qd) / 2] = pack_bf16(c[ot][2 * rr], c[ot][2 * rr + 1]);
    }
}

template <int D>
__device__ __forceinline__ void attention_bwd_dq_tc_impl(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ o, const float* __restrict__ lse, const bf16* __restrict__ dout,
    bf16* __restrict__ dq, int heads, int lq, int lk, float scale, const AttnMaskArgs ma) {
    constexpr int KS = D / 16, NT = kTcKeys / 8, OT = D / 8, LDS = D + 8;
    alignas(16) __shared__ unsigned short sk[kTcKeys * LDS];
    alignas(16) __shared__ unsigned short sv[kTcKeys * LDS];
    alignas(4) __shared__ unsigned char skey[kTcKeys];  // 0 visible, 1 padding, 2 past Lk
    __shared__ unsigned sword[kTcKeys];
    const int b = blockIdx.z, h = blockIdx.y, bh = b * heads + h;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int r0 = blockIdx.x * kTcRows + warp * 16 + g, r1 = r0 + 8;
    const unsigned short* q16 = reinterpret_cast<const unsigned short*>(q);
    const unsigned short* k16 = reinterpret_cast<const unsigned short*>(k);
    const unsigned short* v16 = reinterpret_cast<const unsigned short*>(v);
    const unsigned short* o16 = reinterpret_cast<const unsigned short*>(o);
    const unsigned short* do16 = reinterpret_cast<const unsigned short*>(dout);
    unsigned qa[KS][4], ga[KS][4], oa[KS][4];
    tc_load_a<D>(qa, q16, b, h, heads, lq, r0, qd);
    tc_load_a<D>(ga, do16, b, h, heads, lq, r0, qd);
    tc_load_a<D>(oa, o16, b, h, heads, lq, r0, qd);
    // D_i = dO_i·O_i from the fragments (a quad holds a row's D columns between its 4 lanes).
    float di[2] = {0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const unsigned x = ga[ks][e], y = oa[ks][e];
            di[e & 1] += bf16_lo(x) * bf16_lo(y) + bf16_hi(x) * bf16_hi(y);
        }
    float l2[2];
    bool live[2];  // the row exists and saw a key (a row that saw none has dS = 0)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        di[rr] += __shfl_xor_sync(kFullMask, di[rr], 1);
        di[rr] += __shfl_xor_sync(kFullMask, di[rr], 2);
        const int i = rr == 0 ? r0 : r1;
        const float ls = i < lq ? lse[(long long)bh * lq + i] : INFINITY;
        live[rr] = ls != INFINITY;
        l2[rr] = ls * kLog2e;
    }
    const unsigned rk0 = attn_row_key(ma, b, r0), rk1 = attn_row_key(ma, b, r1);
    const VisDraw vd = vis_draw(ma.p);
    const DropDraw dd = attn_drop_draw(ma);
    const unsigned drk0 = attn_drop_row(ma, bh, r0, lq), drk1 = attn_drop_row(ma, bh, r1, lq);
    const float sl2 = scale * kLog2e;
    float acc[OT][4] = {};
    const int tiles = (lk + kTcKeys - 1) / kTcKeys;
    for (int t = 0; t < tiles; ++t) {
        const int j0 = t * kTcKeys;
        __syncthreads();  // the previous tile's readers are done
        tc_load_tile<D, LDS>(sk, k16, b, h, heads, lk, j0, kTcKeys);
        tc_load_tile<D, LDS>(sv, v16, b, h, heads, lk, j0, kTcKeys);
        tc_fill_key_state<true>(ma, b, lk, j0, skey, sword);
        __syncthreads();
        float s[NT][4] = {}, dp[NT][4] = {};
        tc_mm_abt<D, NT, LDS>(s, qa, sk, lane);
        tc_mm_abt<D, NT, LDS>(dp, ga, sv, lane);
        // Which of this thread's 32 scores count (bit nt * 4 + e, the forward's layout): the
        // two-stream bits, less padding and keys past Lk outside clean tiles (uniform branch),
        // less rows that saw no key. P is computed for every score, masked or not (no branch).
        unsigned ok = ma.mode == 1
                          ? ts_fragment_bits<NT>(sword, rk0, rk1, vd, qd, j0, r0,
                                                 blockIdx.x * kTcRows)
                          : 0xFFFFFFFFu;
        if (!tc_tile_clean(skey, lane)) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (skey[nt * 8 + 2 * qd + (e & 1)] != 0) ok &= ~(1u << (nt * 4 + e));
        }
        if (!live[0]) ok &= 0xCCCCCCCCu;  // e 0, 1: row r0
        if (!live[1]) ok &= 0x33333333u;  // e 2, 3: row r1
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = e >> 1;
                const float p = exp2_ftz(s[nt][e] * sl2 - l2[rr]);
                const float md = attn_drop_at(dd, rr == 0 ? drk0 : drk1, j0 + nt * 8 + 2 * qd + (e & 1));
                const float ds = p * (md * dp[nt][e] - di[rr]) * scale;
                s[nt][e] = (ok >> (nt * 4 + e)) & 1u ? ds : 0.f;
            }
        tc_mm_pb<D, kTcKeys / 16, LDS>(acc, s, sk, lane);
    }
    tc_store_c<D>(reinterpret_cast<unsigned short*>(dq), acc, b, h, heads, lq, r0, qd);
}

template <int D>
__device__ __forceinline__ void attention_bwd_dkdv_tc_impl(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ o, const float* __restrict__ lse, const bf16* __restrict__ dout,
    bf16* __restrict__ dk, bf16* __restrict__ dv, int heads, int lq, int lk, float scale,
    const AttnMaskArgs ma) {
    constexpr int KS = D / 16, NT = kTcBwdQ / 8, OT = D / 8, LDS = D + 8;
    alignas(16) __shared__ unsigned short sq[kTcBwdQ * LDS];
    alignas(16) __shared__ unsigned short sdo[kTcBwdQ * LDS];
    __shared__ float sl2[kTcBwdQ], sdi[kTcBwdQ];
    __shared__ unsigned srk[kTcBwdQ], sdrk[kTcBwdQ];  // mask and dropout row keys
    const int b = blockIdx.z, h = blockIdx.y, bh = b * heads + h;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int r0 = blockIdx.x * kTcRows + warp * 16 + g;  // this thread's keys: r0, r0 + 8
    const long long w = (long long)heads * D;
    const unsigned short* q16 = reinterpret_cast<const unsigned short*>(q);
    const unsigned short* k16 = reinterpret_cast<const unsigned short*>(k);
    const unsigned short* v16 = reinterpret_cast<const unsigned short*>(v);
    const unsigned short* o16 = reinterpret_cast<const unsigned short*>(o);
    const unsigned short* do16 = reinterpret_cast<const unsigned short*>(dout);
    unsigned ka[KS][4], va[KS][4];
    tc_load_a<D>(ka, k16, b, h, heads, lk, r0, qd);
    tc_load_a<D>(va, v16, b, h, heads, lk, r0, qd);
    // Per key of this thread: in range and not padding; the two-stream word key.
    bool kok[2];
    unsigned wm[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int j = r0 + 8 * rr;
        const long long bj = (long long)b * lk + j;
        kok[rr] = j < lk && !(ma.key_mask && !ma.key_mask[bj]);
        wm[rr] = (ma.mode == 1 && j < lk) ? vis_word_key(ma.words[bj]) : 0u;
    }
    const VisDraw vd = vis_draw(ma.p);
    const DropDraw dd = attn_drop_draw(ma);
    const float qmul = scale * kLog2e, inv_lk = 1.f / lk;
    float gk[OT][4] = {}, gv[OT][4] = {};
    const int tiles = (lq + kTcBwdQ - 1) / kTcBwdQ;
    for (int t = 0; t < tiles; ++t) {
        const int i0 = t * kTcBwdQ;
        __syncthreads();
        tc_load_tile<D, LDS>(sq, q16, b, h, heads, lq, i0, kTcBwdQ);
        tc_load_tile<D, LDS>(sdo, do16, b, h, heads, lq, i0, kTcBwdQ);
        __syncthreads();
        // D_i, lse·log2e and the mask key of this tile's rows: warp w takes rows w, w + 4, ...
        for (int row = warp; row < kTcBwdQ; row += kAttnWarps) {
            const int i = i0 + row;
            float part = 0.f;
            if (i < lq) {
                const unsigned short* orow = o16 + ((long long)b * lq + i) * w + (long long)h * D;
                for (int d = lane; d < D; d += 32)
                    part += bf16_lo((unsigned)sdo[row * LDS + d]) * bf16_lo((unsigned)orow[d]);
            }
            part = warp_sum(part);
            if (lane == 0) {
                sdi[row] = part;
                sl2[row] = i < lq ? lse[(long long)bh * lq + i] * kLog2e : 0.f;
                srk[row] = attn_row_key(ma, b, i);
                sdrk[row] = attn_drop_row(ma, bh, i, lq);
            }
        }
        __syncthreads();
        float st[NT][4] = {}, dpt[NT][4] = {};
        tc_mm_abt<D, NT, LDS>(st, ka, sq, lane);
        tc_mm_abt<D, NT, LDS>(dpt, va, sdo, lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * qd + (e & 1), i = i0 + c, rr = e >> 1;
                const int j = r0 + 8 * rr;
                // Selects, not branches (no branch region per score): rows past Lq and keys
                // past Lk give 0; a row that saw no key (lse = +inf) the uniform average.
                const float l2 = sl2[c];
                const float md = attn_drop_at(dd, sdrk[c], j);
                unsigned vis = kok[rr] && i < lq ? 1u : 0u;
                if (ma.mode == 1)
                    vis &= (j != i ? 1u : 0u) &
                           ((j == 0 ? 1u : 0u) | (vis_draw_bit(srk[c], wm[rr], vd.thr8) & vd.all));
                const bool dead = l2 == INFINITY;
                const float p = exp2_ftz(st[nt][e] * qmul - l2);
                const float pm = i >= lq || j >= lk ? 0.f : dead ? inv_lk * md : vis ? p * md : 0.f;
                const float ds = vis && !dead ? p * (md * dpt[nt][e] - sdi[c]) * scale : 0.f;
                st[nt][e] = pm;
                dpt[nt][e] = ds;
            }
        tc_mm_pb<D, kTcBwdQ / 16, LDS>(gv, st, sdo, lane);
        tc_mm_pb<D, kTcBwdQ / 16, LDS>(gk, dpt, sq, lane);
    }
    tc_store_c<D>(reinterpret_cast<unsigned short*>(dk), gk, b, h, heads, lk, r0, qd);
    tc_store_c<D>(reinterpret_cast<unsigned short*>(dv), gv, b, h, heads, lk, r0, qd);
}

}  // namespace r3

using r3::bf16;

// Parameters shared by every entry point after the tensors: heads, lq, lk, scale, mask mode,
// key_mask, words, mask_p, mask_seed, drop_p, drop_seed, drop_stream.
#define R3_ATTN_MASK_PARAMS                                                                    \
    int heads, int lq, int lk, float scale, int mode, const unsigned char *key_mask,           \
        const unsigned *words, float mask_p, unsigned long long mask_seed, float drop_p,       \
        unsigned long long drop_seed, unsigned long long drop_stream
#define R3_ATTN_MASK_ARGS                                                                      \
    heads, lq, lk, scale,                                                                      \
        r3::AttnMaskArgs {                                                                     \
        key_mask, words, mode, mask_p, mask_seed, drop_p, drop_seed, drop_stream               \
    }

#define R3_ATTN_KERNELS(DIM, T, SFX)                                                             \
    extern "C" __global__ void __launch_bounds__(128, 2)                                          \
        attention_fwd_d##DIM##_##SFX(const T* q, const T* k, const T* v, T* out, float* lse,   \
                                     R3_ATTN_MASK_PARAMS) {                                    \
        r3::attention_fwd_impl<T, DIM>(q, k, v, out, lse, R3_ATTN_MASK_ARGS);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_bwd_dq_d##DIM##_##SFX(         \
        const T* q, const T* k, const T* v, const T* o, const float* lse, const T* dout,       \
        T* dq, R3_ATTN_MASK_PARAMS) {                                                          \
        r3::attention_bwd_dq_impl<T, DIM>(q, k, v, o, lse, dout, dq, R3_ATTN_MASK_ARGS);       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_bwd_dkdv_d##DIM##_##SFX(       \
        const T* q, const T* k, const T* v, const T* o, const float* lse, const T* dout,       \
        T* dk, T* dv, R3_ATTN_MASK_PARAMS) {                                                   \
        r3::attention_bwd_dkdv_impl<T, DIM>(q, k, v, o, lse, dout, dk, dv, R3_ATTN_MASK_ARGS); \
    }

// Key padding (mode 0) and two-stream (mode 1) are separate entry points: the two-stream one's
// mask-bit storage would otherwise take shared memory (and L1) from the plain one.
#define R3_ATTN_TC_KERNEL(DIM)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_tc_d##DIM##_bf16(            \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,                     \
        R3_ATTN_MASK_PARAMS) {                                                                   \
        r3::attention_fwd_tc_impl<DIM, false, false>(q, k, v, out, lse, R3_ATTN_MASK_ARGS);      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_tc_twostream_d##DIM##_bf16(  \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,                     \
        R3_ATTN_MASK_PARAMS) {                                                                   \
        r3::attention_fwd_tc_impl<DIM, true, false>(q, k, v, out, lse, R3_ATTN_MASK_ARGS);       \
    }
R3_ATTN_TC_KERNEL(32)
R3_ATTN_TC_KERNEL(64)
R3_ATTN_TC_KERNEL(128)

// The double-buffered forward (cp.async: the next K/V tile arrives during this one's products),
// D 32 and 64 (two D = 128 tiles would not fit 48 KB of static shared memory). The launchers keep
// the single-buffered kernels by default until a GPU run compares them.
#define R3_ATTN_TCDB_KERNEL(DIM)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_tcdb_d##DIM##_bf16(          \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,                     \
        R3_ATTN_MASK_PARAMS) {                                                                   \
        r3::attention_fwd_tc_impl<DIM, false, true>(q, k, v, out, lse, R3_ATTN_MASK_ARGS);       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        attention_fwd_tcdb_twostream_d##DIM##_bf16(const bf16* q, const bf16* k, const bf16* v, \
                                                   bf16* out, float* lse, R3_ATTN_MASK_PARAMS) { \
        r3::attention_fwd_tc_impl<DIM, true, true>(q, k, v, out, lse, R3_ATTN_MASK_ARGS);        \
    }
R3_ATTN_TCDB_KERNEL(32)
R3_ATTN_TCDB_KERNEL(64)

// (128, 2): with the thread count alone ptxas 13.0 held the D = 32 dK/dV kernel under ~140
// registers and spilled once the dropout draw moved into it per score.
#define R3_ATTN_TC_BWD_KERNELS(DIM)                                                              \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_bwd_dq_tc_d##DIM##_bf16(      \
        const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,           \
        const bf16* dout, bf16* dq, R3_ATTN_MASK_PARAMS) {                                       \
        r3::attention_bwd_dq_tc_impl<DIM>(q, k, v, o, lse, dout, dq, R3_ATTN_MASK_ARGS);         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_bwd_dkdv_tc_d##DIM##_bf16(    \
        const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,           \
        const bf16* dout, bf16* dk, bf16* dv, R3_ATTN_MASK_PARAMS) {                             \
        r3::attention_bwd_dkdv_tc_impl<DIM>(q, k, v, o, lse, dout, dk, dv, R3_ATTN_MASK_ARGS);   \
    }
R3_ATTN_TC_BWD_KERNELS(32)
R3_ATTN_TC_BWD_KERNELS(64)

R3_ATTN_KERNELS(32, float, f32)
R3_ATTN_KERNELS(64, float, f32)
R3_ATTN_KERNELS(128, float, f32)
R3_ATTN_KERNELS(32, bf16, bf16)
R3_ATTN_KERNELS(64, bf16, bf16)
R3_ATTN_KERNELS(128, bf16, bf16)

R3_EMU_EXPORT(attention_bwd_dq_tc_d32_bf16)
R3_EMU_EXPORT(attention_bwd_dq_tc_d64_bf16)
R3_EMU_EXPORT(attention_bwd_dkdv_tc_d32_bf16)
R3_EMU_EXPORT(attention_bwd_dkdv_tc_d64_bf16)
R3_EMU_EXPORT(attention_fwd_tc_twostream_d32_bf16)
R3_EMU_EXPORT(attention_fwd_tc_twostream_d64_bf16)
R3_EMU_EXPORT(attention_fwd_tc_twostream_d128_bf16)
R3_EMU_EXPORT(attention_fwd_tc_d32_bf16)
R3_EMU_EXPORT(attention_fwd_tc_d64_bf16)
R3_EMU_EXPORT(attention_fwd_tc_d128_bf16)
R3_EMU_EXPORT(attention_fwd_tcdb_d32_bf16)
R3_EMU_EXPORT(attention_fwd_tcdb_d64_bf16)
R3_EMU_EXPORT(attention_fwd_tcdb_twostream_d32_bf16)
R3_EMU_EXPORT(attention_fwd_tcdb_twostream_d64_bf16)
R3_EMU_EXPORT(attention_fwd_d32_f32)
R3_EMU_EXPORT(attention_fwd_d64_f32)
R3_EMU_EXPORT(attention_fwd_d128_f32)
R3_EMU_EXPORT(attention_fwd_d32_bf16)
R3_EMU_EXPORT(attention_fwd_d64_bf16)
R3_EMU_EXPORT(attention_fwd_d128_bf16)
R3_EMU_EXPORT(attention_bwd_dq_d32_f32)
R3_EMU_EXPORT(attention_bwd_dq_d64_f32)
R3_EMU_EXPORT(attention_bwd_dq_d128_f32)
R3_EMU_EXPORT(attention_bwd_dq_d32_bf16)
R3_EMU_EXPORT(attention_bwd_dq_d64_bf16)
R3_EMU_EXPORT(attention_bwd_dq_d128_bf16)
R3_EMU_EXPORT(attention_bwd_dkdv_d32_f32)
R3_EMU_EXPORT(attention_bwd_dkdv_d64_f32)
R3_EMU_EXPORT(attention_bwd_dkdv_d128_f32)
R3_EMU_EXPORT(attention_bwd_dkdv_d32_bf16)
R3_EMU_EXPORT(attention_bwd_dkdv_d64_bf16)
R3_EMU_EXPORT(attention_bwd_dkdv_d128_bf16)
