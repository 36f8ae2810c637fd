// The CUDA emulation layer: lets kernels/*.cu compile as host C++ (g++ -std=c++20 -x c++ -DR3_EMU)
// and run on the CPU, so kernel logic is checked against the CPU reference without a GPU.
//
// How: the real CUDA headers (from the pinned nvcc wheels) give the host definitions of
// __nv_bfloat16, __half, their conversions and dim3/uint3. This header then redefines the CUDA
// keywords: __global__/__device__/__host__ vanish, __shared__ becomes `thread_local` (at block scope
// that implies static storage: one instance per OS worker thread, shared by every thread of the
// block that worker runs, and blocks run one after another on it). Each CUDA thread of a block is
// a fiber (a user-space stack switched by kernels/emu/runtime.cpp), so threadIdx/blockIdx are
// per-OS-thread globals the scheduler sets before resuming a fiber. __syncthreads() and warp
// exchanges (shuffles, ballots, __syncwarp) are barriers the fibers wait at; atomics go through
// std::atomic_ref so that blocks may also run on several OS threads at once.
//
// Kernels must:
//  - be `extern "C" __global__` and end their file with R3_EMU_EXPORT(name) for each of them, which
//    generates `extern "C" int r3emu_<name>(const r3emu_launch*, void** args)`; `args` follows
//    cuLaunchKernel's kernelParams convention (an array of pointers to the argument values);
//  - declare dynamic shared memory with R3_DYN_SMEM(type, name) (common.cuh), not `extern __shared__`.
//
// What emulation cannot show: timing, register pressure and spills, races that depend on the real
// warp schedule, memory-model subtleties (see docs/emulation.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#undef __forceinline__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __shared__ thread_local
#define __constant__ static const
#define __launch_bounds__(...)
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))

extern "C" {
/// One emulated launch (mirrors cuLaunchKernel's shape arguments). `workers`: OS threads the
/// blocks are spread over (0: one). `schedule`: how a block's threads take turns (0 lockstep:
/// every thread runs to its next barrier or warp op in thread order, so warps advance together;
/// 1 warp-serial: each warp in turn runs as far as it can, i.e. to its next __syncthreads, warp
/// 0 first; 2 the same from the last warp and lane down; 3 lockstep in descending thread
/// order). Shared with Rust (src/device/emu/mod.rs, #[repr(C)]).
struct r3emu_launch {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
    unsigned workers;
    unsigned schedule;
};
/// The message of the last failed launch on this OS thread (deadlock, bad shape).
const char* r3emu_last_error(void);
}

// The built-in index variables: per OS thread, set by the scheduler before a fiber resumes.
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread uint3 blockDim;
extern __thread uint3 gridDim;
constexpr int warpSize = 32;

namespace r3emu {
// Scheduler entry points (runtime.cpp).
void syncthreads();
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane);  // src_lane < 0: own value
unsigned warp_ballot(unsigned mask, bool pred);
void syncwarp(unsigned mask);
unsigned char* dyn_smem();
std::size_t dyn_smem_bytes();  // the launch's shared_bytes
int run(const r3emu_launch* cfg, void (*body)(void*), void* ctx);

template <class T>
__forceinline__ T exchange(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_exchange(mask, bits, src);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
__forceinline__ int lane_id() {
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return int(t & 31u);
}

template <class... A, std::size_t... I>
void call_unpacked(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
/// Runs kernel `k` over the grid of `cfg`, unpacking the cuLaunchKernel-style `args` into its
/// typed parameters for every thread.
template <class... A>
int launch_kernel(const r3emu_launch* cfg, void** args, void (*k)(A...)) {
    struct Ctx {
        void (*k)(A...);
        void** args;
    } ctx{k, args};
    return run(
        cfg,
        [](void* p) {
            auto* c = static_cast<Ctx*>(p);
            call_unpacked(c->k, c->args, std::index_sequence_for<A...>{});
        },
        &ctx);
}
}  // namespace r3emu

// (Two levels so that a kernel name renamed by a -D macro, as the mutants are, is expanded first.)
#define R3_EMU_EXPORT(name) R3_EMU_EXPORT_(name)
#define R3_EMU_EXPORT_(name)                                                       \
    extern "C" int r3emu_##name(const r3emu_launch* cfg, void** args) {            \
        return r3emu::launch_kernel(cfg, args, &name);                             \
    }

// ---- synchronisation and warp intrinsics -------------------------------------------------------
inline void __syncthreads() { r3emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { r3emu::syncwarp(mask); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = r3emu::lane_id();
    return r3emu::exchange(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = r3emu::lane_id();
    int src = lane ^ lane_mask;
    // A source in a later width-group returns the caller's own value (CUDA's rule).
    if ((src & ~(width - 1)) > (lane & ~(width - 1))) src = -1;
    return r3emu::exchange(mask, v, src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = r3emu::lane_id();
    int src = lane + int(delta);
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = -1;
    return r3emu::exchange(mask, v, src);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = r3emu::lane_id();
    int src = lane - int(delta);
    if (src < 0 || (src & ~(width - 1)) != (lane & ~(width - 1))) src = -1;
    return r3emu::exchange(mask, v, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return r3emu::warp_ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return r3emu::warp_ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    return (r3emu::warp_ballot(mask, pred != 0) & mask) == (r3emu::warp_ballot(mask, true) & mask);
}

// ---- atomics (std::atomic_ref: blocks may run on several OS threads) ----------------------------
template <class T>
T r3emu_atomic_add(T* p, T v) {
    std::atomic_ref<T> a(*p);
    if constexpr (std::is_floating_point_v<T>) {
        T old = a.load(std::memory_order_relaxed);
        while (!a.compare_exchange_weak(old, old + v, std::memory_order_relaxed)) {
        }
        return old;
    } else {
        return a.fetch_add(v, std::memory_order_relaxed);
    }
}
inline float atomicAdd(float* p, float v) { return r3emu_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return r3emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return r3emu_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return r3emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return r3emu_atomic_add(p, v);
}
template <class T>
T r3emu_atomic_max(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
inline int atomicMax(int* p, int v) { return r3emu_atomic_max(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return r3emu_atomic_max(p, v); }
inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load(std::memory_order_relaxed);
    while (old > v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
    std::atomic_ref<int> a(*p);
    a.compare_exchange_strong(cmp, v);
    return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    a.compare_exchange_strong(cmp, v);
    return cmp;
}
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }

// ---- device math that host libm lacks ------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return unsigned((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
