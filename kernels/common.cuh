// Shared device helpers for every kernels/*.cu: bf16/f32 storage conversion (all arithmetic is
// f32), warp and block reductions over __shfl_xor_sync, 16-byte vector loads, dynamic shared
// memory, and (later) thin wrappers over tensor-core / async-copy instructions.
//
// Compiled two ways: by nvcc for the GPU, and as host C++ with -DR3_EMU (kernels/emu/emu.cuh) for
// the CPU emulator. Code here must only use what emu.cuh provides.
#pragma once

#ifdef R3_EMU
#include "emu/emu.cuh"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define R3_EMU_EXPORT(name)
#endif

namespace r3 {

typedef __nv_bfloat16 bf16;

// ---- storage <-> f32 --------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

template <class T>
__device__ __forceinline__ float load(const T* p, long long i) { return to_f32(p[i]); }
template <class T>
__device__ __forceinline__ void store(T* p, long long i, float v) { p[i] = from_f32<T>(v); }

// ---- 16-byte vectors ------------------------------------------------------------------------------
// One 128-bit load moves 4 f32 or 8 bf16: a quarter / eighth of the instructions of scalar loads,
// which is what keeps memory-bound kernels near peak bandwidth. Use only when the pointer and the
// element offset are 16-byte aligned (is_aligned16).
template <class T>
struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};
template <class T>
__device__ __forceinline__ bool is_aligned16(const T* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}
template <class T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
    return *reinterpret_cast<const Vec16<T>*>(p);
}
template <class T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
    *reinterpret_cast<Vec16<T>*>(p) = v;
}

// ---- reductions -----------------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Online-softmax state (running max m, sum s of exp(x - m)): merging two states rescales the sum
// with the smaller max, so max and sum need one pass over the data instead of two.
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return MaxSum{m, 0.f};
    return MaxSum{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}
__device__ __forceinline__ MaxSum warp_maxsum(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum w{__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
        v = maxsum_merge(v, w);
    }
    return v;
}

// Block-wide reductions for 1-D blocks whose size is a multiple of 32 (<= 1024). Every thread gets
// the result. The leading __syncthreads protects the scratch array from a previous call.
// R3_MUTANT_NO_SYNC (emulator mutation test only) removes the barrier between the warps' writes
// and their reads: the emulated selftest must then fail.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
#ifndef R3_MUTANT_NO_SYNC
    __syncthreads();
#endif
    return warp_sum(lane < nwarps ? scratch[lane] : 0.f);
}
__device__ __forceinline__ MaxSum block_maxsum(MaxSum v) {
    __shared__ float sm[32], ss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_maxsum(v);
    __syncthreads();
    if (lane == 0) {
        sm[warp] = v.m;
        ss[warp] = v.s;
    }
#ifndef R3_MUTANT_NO_SYNC
    __syncthreads();
#endif
    MaxSum w = lane < nwarps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.f};
    return warp_maxsum(w);
}

// ---- strided loops with several loads in flight ------------------------------------------------
// Visit i = first, first + step, ... < n in that order, loading U elements (load(i)) before using
// them (use(i, v)): U loads in flight per thread even where `use` stores to memory a later load
// reads (in-place kernels), which the compiler cannot reorder by itself. Over a 250k-class row of
// 2-byte logits one dependent load at a time is latency-bound.
template <int U, class I, class Load, class Use>
__device__ __forceinline__ void strided_unrolled(I first, I n, I step, Load load, Use use) {
    I i = first;
    for (; i + (U - 1) * step < n; i += U * step) {
        float v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = load(i + u * step);
#pragma unroll
        for (int u = 0; u < U; ++u) use(i + u * step, v[u]);
    }
    for (; i < n; i += step) use(i, load(i));
}

// ---- counter-based randomness --------------------------------------------------------------------
// cpu::elementwise::hash_u32 / hash_unit, bit for bit: dropout and the RetroMAE decoder mask draw
// from (seed, stream, index) with no state, so CPU and GPU see identical masks.
// (splitmix64 finaliser of a weighted sum).
__device__ __forceinline__ unsigned hash_u32(unsigned long long seed, unsigned long long a,
                                             unsigned long long b) {
    unsigned long long z = seed + a * 0x9E3779B97F4A7C15ull + b * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned)(z >> 32);
}
__device__ __forceinline__ float hash_unit(unsigned long long seed, unsigned long long a,
                                           unsigned long long b) {
    return (float)(hash_u32(seed, a, b) >> 8) * (1.0f / 16777216.0f);
}

// 2^x on the special-function unit alone (ex2.approx.ftz: results below 2^-126 become 0). exp2f
// without fast-math wraps the same instruction in a denormal-range fix-up (FSETP and two
// predicated FMULs per call); softmax terms that small are 0 to f32 sums of terms near 1 anyway.
// -inf gives 0, 0 gives 1. The emulator computes exp2 and flushes the same way.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef R3_EMU
    const float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.f : y;
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// cpu::elementwise::mix32 / vis_row_key / vis_word_key / vis_u32 / vis_unit, bit for bit: the
// RetroMAE decoder mask's draw per (row, word) in 32-bit arithmetic: an odd key per row and one
// per word (each a few mix32 once), then per score their 32-bit product (one IMAD; a mix32 per
// score was ten integer instructions and bound the two-stream attention, the 64-bit product folded
// to 32 bits one more LOP3: docs/perf.md). mum32 (the folded product) is attention dropout's.
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}
__device__ __forceinline__ unsigned vis_row_key(unsigned long long seed, unsigned b, unsigned i) {
    return mix32((unsigned)seed ^ mix32((unsigned)(seed >> 32) ^ mix32(b * 0x9E3779B9u ^ i))) | 1u;
}
__device__ __forceinline__ unsigned vis_word_key(unsigned word) {
    return mix32(word ^ 0x85EBCA6Bu) | 1u;
}
__device__ __forceinline__ unsigned vis_u32(unsigned row_key, unsigned word_key) {
    return row_key * word_key;
}
__device__ __forceinline__ unsigned mum32(unsigned a, unsigned b) {
    return (a * b) ^ __umulhi(a, b);  // (a 64-bit product compiled to a 64 x 32 one)
}
// cpu::elementwise::drop_key: attention dropout's per-key key (the draw: attn_drop_at).
__device__ __forceinline__ unsigned drop_key(unsigned j) {
    return mix32(j ^ 0xC2B2AE35u) | 1u;
}
__device__ __forceinline__ float vis_unit(unsigned row_key, unsigned word) {
    return (float)(vis_u32(row_key, vis_word_key(word)) >> 8) * (1.0f / 16777216.0f);
}
// vis_unit(k, w) >= p as an integer compare: vis_unit is u * 2^-24 with u = mix32(..) >> 8 an
// integer below 2^24 (exact in float), so the test is u >= ceil(p * 2^24) (exact: scaling by a
// power of two). p <= 0: always; p >= 1 or NaN: never (u < 2^24 <= the threshold).
__device__ __forceinline__ unsigned vis_threshold(float p) {
    if (p != p) return 0xFFFFFFFFu;
    if (p <= 0.f) return 0u;
    if (p >= 1.f) return 1u << 24;
    return (unsigned)ceilf(p * 16777216.0f);
}
// vis_unit(row_key, w) >= p with word_key = vis_word_key(w) and thr = vis_threshold(p).
__device__ __forceinline__ bool vis_keep(unsigned row_key, unsigned word_key, unsigned thr) {
    return (vis_u32(row_key, word_key) >> 8) >= thr;
}
// cpu::elementwise::drop_row_key, bit for bit: attention dropout's key of score row
// (b H + h) Lq + i; each (row, key j) draw is then one product with drop_key(j) (attention.cu
// attn_drop_at).
__device__ __forceinline__ unsigned drop_row_key(unsigned long long seed, unsigned long long stream,
                                                 unsigned long long row) {
    const unsigned s = mix32((unsigned)seed ^ mix32((unsigned)(seed >> 32) ^
                                                    mix32((unsigned)stream ^
                                                          mix32((unsigned)(stream >> 32)))));
    return mix32(s ^ mix32((unsigned)row ^ mix32((unsigned)(row >> 32) ^ s)));
}
// The same test for loops that draw many: (y >> 8) >= thr <=> y >= thr << 8 while thr < 2^24,
// and `all` = 0 when no draw can pass (p >= 1 or NaN: thr = 2^24 would overflow the shift), so
// that vis_draw_bit(..) & all == vis_keep(..) for every p, with one compare and no branch.
struct VisDraw {
    unsigned thr8, all;
};
__device__ __forceinline__ VisDraw vis_draw(float p) {
    const unsigned thr = vis_threshold(p);
    VisDraw d;
    d.thr8 = thr < (1u << 24) ? thr << 8 : 0u;
    d.all = thr < (1u << 24) ? 0xFFFFFFFFu : 0u;
    return d;
}
__device__ __forceinline__ unsigned vis_draw_bit(unsigned row_key, unsigned word_key,
                                                 unsigned thr8) {
    return vis_u32(row_key, word_key) >= thr8 ? 1u : 0u;
}

// ---- tensor cores ------------------------------------------------------------------------------
// mma.sync.m16n8k16 with bf16 operands and f32 accumulators (sm_80+), in the PTX ISA's fragment
// layouts. With g = lane / 4 and q = lane % 4 (a "quad" of 4 lanes shares a row):
//   A (16x16, row-major): a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..2q+1],
//                         a[2] = A[g][2q+8..2q+9], a[3] = A[g+8][2q+8..2q+9]
//   B (16x8, "col"):      b0 = B[2q..2q+1][g], b1 = B[2q+8..2q+9][g]
//   C/D (16x8, f32):      c[0], c[1] = C[g][2q], C[g][2q+1]; c[2], c[3] = C[g+8][2q], C[g+8][2q+1]
// Each u32 register packs two bf16, the lower k (or column) index in the low half. Under R3_EMU the
// product is computed lane by lane from exactly these registers, exchanged through warp shuffles,
// so a kernel that puts an element in the wrong register fails the emulated selftest as it would
// on the GPU. All 32 lanes of the warp must call it together (as with the instruction).
__device__ __forceinline__ float bf16_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }

// Two floats rounded to nearest-even bf16, packed (lo in the low half).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
#ifdef R3_EMU
    auto rne = [](float f) -> unsigned {
        unsigned u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;  // quiet NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return u >> 16;
    };
    return rne(lo) | (rne(hi) << 16);
#else
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
#endif
}

__device__ __forceinline__ void mma_bf16_16816(float c[4], const unsigned a[4], unsigned b0,
                                               unsigned b1) {
#ifdef R3_EMU
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    for (int kk = 0; kk < 8; ++kk) {  // k = 2 kk, 2 kk + 1
        const int src = kk & 3;
        const bool hi = kk >= 4;
        const unsigned ar0 = __shfl_sync(kFullMask, hi ? a[2] : a[0], g * 4 + src);
        const unsigned ar1 = __shfl_sync(kFullMask, hi ? a[3] : a[1], g * 4 + src);
        const unsigned bc0 = __shfl_sync(kFullMask, hi ? b1 : b0, (2 * q) * 4 + src);
        const unsigned bc1 = __shfl_sync(kFullMask, hi ? b1 : b0, (2 * q + 1) * 4 + src);
        c[0] += bf16_lo(ar0) * bf16_lo(bc0) + bf16_hi(ar0) * bf16_hi(bc0);
        c[1] += bf16_lo(ar0) * bf16_lo(bc1) + bf16_hi(ar0) * bf16_hi(bc1);
        c[2] += bf16_lo(ar1) * bf16_lo(bc0) + bf16_hi(ar1) * bf16_hi(bc0);
        c[3] += bf16_lo(ar1) * bf16_lo(bc1) + bf16_hi(ar1) * bf16_hi(bc1);
    }
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 give the addresses of the 8
// rows (8 contiguous b16, 16-byte aligned) of matrix i; lane l receives in r[i] the elements
// (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix i, or with .trans (2(l%4), l/4) and (2(l%4)+1, l/4),
// i.e. mma fragments of the matrix or of its transpose. Emulated from the same addresses.
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const unsigned short* row) {
#ifdef R3_EMU
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) {
        const unsigned short* p = __shfl_sync(kFullMask, row, i * 8 + (lane >> 2));
        r[i] = (unsigned)p[2 * (lane & 3)] | ((unsigned)p[2 * (lane & 3) + 1] << 16);
    }
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const unsigned short* row) {
#ifdef R3_EMU
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) {
        const unsigned short* p0 = __shfl_sync(kFullMask, row, i * 8 + 2 * (lane & 3));
        const unsigned short* p1 = __shfl_sync(kFullMask, row, i * 8 + 2 * (lane & 3) + 1);
        r[i] = (unsigned)p0[lane >> 2] | ((unsigned)p1[lane >> 2] << 16);
    }
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// cp.async (sm_80+): 16 bytes from global to shared memory without passing through registers,
// zero-filled when !valid (src-size 0; `src` is then not read). Groups: cp_async_commit() closes
// the copies issued since the last one; cp_async_wait<N>() waits until at most N groups are
// pending (their data visible to this thread; a __syncthreads after it makes every thread's
// copies visible to the block). A kernel waits for all of its copies before it exits.
// Under R3_EMU the destination holds NaN bytes from the issue until the wait that completes the
// group lands the data: a read before its wait, or a copy issued into a buffer that another warp
// is still reading (a missing barrier), shows in the emulated selftest.
#ifdef R3_EMU
struct CpAsyncPending {
    void* dst;
    const void* src;
    bool valid;
    int group;
};
constexpr int kCpAsyncMax = 32;  // copies one thread may have in flight
struct CpAsyncState {
    CpAsyncPending q[1024][kCpAsyncMax];  // per thread of the block: its copies
    int n[1024], committed[1024];
};
// Per OS worker (blocks run one after another on it), on the heap: ~1 MB, built in place (a
// fiber's 256 KiB stack must not hold it, not even as a temporary).
inline CpAsyncState& cp_async_state() {
    thread_local CpAsyncState* st = new CpAsyncState();
    return *st;
}
inline int cp_async_tid() {
    return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
#endif
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef R3_EMU
    CpAsyncState& st = cp_async_state();
    const int t = cp_async_tid();
    if (st.n[t] == kCpAsyncMax) __builtin_trap();  // more copies in flight than emulated
    std::memset(dst, 0xFF, 16);  // in flight: NaN bf16 / f32 until the wait lands the data
    st.q[t][st.n[t]++] = CpAsyncPending{dst, src, valid, -1};
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef R3_EMU
    CpAsyncState& st = cp_async_state();
    const int t = cp_async_tid();
    for (int i = 0; i < st.n[t]; ++i)
        if (st.q[t][i].group < 0) st.q[t][i].group = st.committed[t];
    ++st.committed[t];
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef R3_EMU
    CpAsyncState& st = cp_async_state();
    const int t = cp_async_tid();
    int keep = 0;
    for (int i = 0; i < st.n[t]; ++i) {
        CpAsyncPending& c = st.q[t][i];
        if (c.group >= 0 && c.group < st.committed[t] - N) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        } else {
            st.q[t][keep++] = c;
        }
    }
    st.n[t] = keep;
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace r3

// Dynamic shared memory (the launch's shared_bytes): `R3_DYN_SMEM(float, buf);` declares
// `float* buf`. Under emulation the launcher provides the buffer, filled with 0xFF bytes.
#ifdef R3_EMU
#define R3_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(r3emu::dyn_smem())
#else
#define R3_DYN_SMEM(T, name)                                      \
    extern __shared__ __align__(16) unsigned char r3_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(r3_dyn_smem_)
#endif

namespace r3 {
// The launch's dynamic shared memory in bytes (its shared_bytes).
__device__ __forceinline__ unsigned dyn_smem_bytes() {
#ifdef R3_EMU
    return (unsigned)r3emu::dyn_smem_bytes();
#else
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#endif
}
}  // namespace r3
