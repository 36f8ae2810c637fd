// The emulator's scheduler: runs a grid of CUDA blocks on the CPU (see emu.cuh for the model).
//
// Blocks are dealt round-robin to `workers` OS threads. On a worker, a block's threads are fibers
// (own stack each, cooperative switching): a fiber runs until it waits at a barrier
// (__syncthreads, a warp exchange) or ends; the worker then resumes the next fiber in thread order
// (the lockstep schedule: warps advance together, one warp op at a time; or in descending order),
// or, in the warp-serial schedules, the next fiber of the same warp until that warp can go no
// further (it waits at a __syncthreads or has ended), then the next warp (ascending, or descending
// with the lanes descending too). Warp-serial lets a warp run a whole barrier interval ahead of
// the others, which exposes a write into shared memory (or a cp.async into a buffer) that another
// warp has yet to read when no barrier separates them; the descending orders expose a lane (or
// warp) that reads what a lower one writes with no __syncwarp / __syncthreads between them.
// A barrier completes when every live thread it waits for has arrived; a full pass over the fibers
// in which nothing arrived, completed or ended is a deadlock (e.g. __syncthreads in divergent code,
// a shuffle whose mask names a lane that never joins), reported as a launch error.
// Dynamic shared memory is filled with 0xFF bytes (a NaN pattern for f32/bf16) before each block,
// so reading shared memory that no thread wrote shows up in the comparison; shuffles from lanes
// that do not exist in the block return the same pattern.
#include "emu.cuh"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread uint3 blockDim;
__thread uint3 gridDim;

namespace r3emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kGuardBytes = 4096;
constexpr uint64_t kPoison = ~uint64_t(0);

// ---- context switching ---------------------------------------------------------------------------
#if defined(__x86_64__)
// switch_to(&save_sp, new_sp): pushes the callee-saved registers (and MXCSR / x87 control word),
// stores the stack pointer into *save_sp, loads new_sp and pops the same frame from there.
extern "C" void r3emu_switch(void** save_sp, void* new_sp);
extern "C" void r3emu_fiber_start();
asm(R"(
    .pushsection .text
    .globl r3emu_switch
    .type r3emu_switch,@function
r3emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size r3emu_switch, .-r3emu_switch

    .globl r3emu_fiber_start
    .type r3emu_fiber_start,@function
r3emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size r3emu_fiber_start, .-r3emu_fiber_start
    .popsection
)");
#else
#error "the CUDA emulator's fiber switch is written for x86_64 only"
#endif

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable byte (above the guard page)
    uint3 idx{};
    bool done = false;
};

struct Warp {
    unsigned present = 0;  // lanes that exist in this block
    unsigned live = 0;     // present and not yet ended
    unsigned arrived = 0;  // lanes waiting at the current warp barrier
    unsigned need = 0;     // the lanes the current barrier waits for
    unsigned gen = 0;
    unsigned phase = 0;    // per-lane bit: which exchange buffer the lane uses next
    uint64_t buf[2][32];
};

struct Worker {
    void* sched_sp = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int cur = 0;
    int live = 0;
    int bar_arrived = 0;
    unsigned bar_gen = 0;
    uint64_t epoch = 0;  // bumped on every arrival, completion and thread end
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    unsigned char* smem = nullptr;
    std::size_t smem_bytes = 0;
    std::string error;
};

__thread Worker* tw = nullptr;
thread_local std::string last_error;

// A process-wide pool of fiber stacks, each with a PROT_NONE guard page below it.
std::mutex pool_mu;
std::vector<char*> pool;

char* take_stack() {
    {
        std::lock_guard<std::mutex> g(pool_mu);
        if (!pool.empty()) {
            char* s = pool.back();
            pool.pop_back();
            return s;
        }
    }
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        std::fprintf(stderr, "r3emu: out of memory for fiber stacks\n");
        std::abort();
    }
    mprotect(m, kGuardBytes, PROT_NONE);
    return static_cast<char*>(m) + kGuardBytes;
}

void give_stacks(std::vector<Fiber>& fs) {
    std::lock_guard<std::mutex> g(pool_mu);
    for (auto& f : fs) pool.push_back(f.stack);
}

Fiber& me() { return tw->fibers[tw->cur]; }
int linear_tid() { return tw->cur; }

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() { r3emu_switch(&me().sp, tw->sched_sp); }

void complete_block_barrier_if_ready(Worker* w) {
    if (w->bar_arrived > 0 && w->bar_arrived >= w->live) {
        w->bar_arrived = 0;
        w->bar_gen++;
        w->epoch++;
    }
}

void complete_warp_barrier_if_ready(Worker* w, Warp& wp) {
    unsigned need = wp.need & wp.live;
    if (wp.arrived != 0 && (wp.arrived & need) == need) {
        wp.arrived = 0;
        wp.gen++;
        w->epoch++;
    }
}

void warp_barrier(unsigned mask) {
    Worker* w = tw;
    int t = linear_tid();
    Warp& wp = w->warps[t >> 5];
    unsigned bit = 1u << (t & 31);
    if (wp.arrived == 0) wp.need = mask & wp.present;
    unsigned g = wp.gen;
    wp.arrived |= bit;
    w->epoch++;
    complete_warp_barrier_if_ready(w, wp);
    while (wp.gen == g) yield();
}

[[noreturn]] void fiber_main(Fiber* f) {
    Worker* w = tw;
    w->body(w->ctx);
    f->done = true;
    w->live--;
    w->epoch++;
    int t = int(f - w->fibers.data());
    Warp& wp = w->warps[t >> 5];
    // Its exchange slots keep their last values: lanes that passed the last barrier together
    // with it may not have read them yet.
    wp.live &= ~(1u << (t & 31));
    complete_warp_barrier_if_ready(w, wp);
    complete_block_barrier_if_ready(w);
    r3emu_switch(&f->sp, w->sched_sp);
    std::abort();  // an ended fiber is never resumed
}

void start_fiber(Fiber& f) {
    // Frame popped by r3emu_switch: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp ret. The `ret` slot is
    // placed so that rsp is 16-byte aligned at r3emu_fiber_start's call (SysV ABI).
    uint64_t top = (reinterpret_cast<uint64_t>(f.stack) + kStackBytes) & ~uint64_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 24);  // ret slot: rsp = top-16 after `ret`
    sp[0] = reinterpret_cast<uint64_t>(&r3emu_fiber_start);
    sp -= 7;
    uint32_t ctl[2] = {0x1F80u, 0x037Fu};
    std::memcpy(&sp[0], ctl, 8);
    sp[1] = 0;                                               // r15
    sp[2] = 0;                                               // r14
    sp[3] = reinterpret_cast<uint64_t>(&fiber_main);         // r13: entry
    sp[4] = reinterpret_cast<uint64_t>(&f);                  // r12: argument
    sp[5] = 0;                                               // rbx
    sp[6] = 0;                                               // rbp
    f.sp = sp;
    f.done = false;
}

// Runs blocks first, first+stride, ... of the grid on the calling OS thread.
void run_blocks(const r3emu_launch& cfg, unsigned first, unsigned stride, void (*body)(void*),
                void* ctx, Worker& w) {
    tw = &w;
    w.body = body;
    w.ctx = ctx;
    unsigned bx = cfg.block[0], by = cfg.block[1], bz = cfg.block[2];
    unsigned n = bx * by * bz;
    blockDim = uint3{bx, by, bz};
    gridDim = uint3{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
    w.fibers.assign(n, Fiber{});
    for (unsigned t = 0; t < n; t++) {
        w.fibers[t].stack = take_stack();
        w.fibers[t].idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
    }
    w.warps.assign((n + 31) / 32, Warp{});
    w.smem_bytes = cfg.shared_bytes;
    w.smem = cfg.shared_bytes ? static_cast<unsigned char*>(std::aligned_alloc(
                                    128, (cfg.shared_bytes + 127) / 128 * 128))
                              : nullptr;
    unsigned total = cfg.grid[0] * cfg.grid[1] * cfg.grid[2];
    for (unsigned b = first; b < total && w.error.empty(); b += stride) {
        blockIdx = uint3{b % cfg.grid[0], (b / cfg.grid[0]) % cfg.grid[1],
                         b / (cfg.grid[0] * cfg.grid[1])};
        if (w.smem) std::memset(w.smem, 0xFF, w.smem_bytes);
        for (unsigned i = 0; i < w.warps.size(); i++) {
            Warp& wp = w.warps[i];
            unsigned lanes = std::min(32u, n - 32 * i);
            wp = Warp{};
            wp.present = lanes == 32 ? ~0u : ((1u << lanes) - 1);
            wp.live = wp.present;
            std::memset(wp.buf, 0xFF, sizeof wp.buf);
        }
        for (auto& f : w.fibers) start_fiber(f);
        w.live = int(n);
        w.bar_arrived = 0;
        w.bar_gen = 0;
        // Resumes the live fibers of threads [lo, hi) once each, in thread order (descending in
        // the reversed schedules).
        const bool rev = cfg.schedule == 2 || cfg.schedule == 3;
        auto pass = [&](unsigned lo, unsigned hi) {
            for (unsigned i = lo; i < hi; i++) {
                unsigned t = rev ? lo + hi - 1 - i : i;
                Fiber& f = w.fibers[t];
                if (f.done) continue;
                w.cur = int(t);
                threadIdx = f.idx;
                r3emu_switch(&w.sched_sp, f.sp);
            }
        };
        const unsigned nw = unsigned(w.warps.size());
        while (w.live > 0) {
            uint64_t before = w.epoch;
            if (cfg.schedule == 0 || cfg.schedule == 3) {
                pass(0, n);
            } else {
                for (unsigned k = 0; k < nw; k++) {
                    unsigned wi = cfg.schedule == 2 ? nw - 1 - k : k;
                    // This warp runs until a pass over it changes nothing: every lane waits at
                    // __syncthreads (or for a lane of another warp, which no warp op allows) or
                    // has ended.
                    for (uint64_t e = w.epoch - 1; e != w.epoch;) {
                        e = w.epoch;
                        pass(32 * wi, std::min(n, 32 * wi + 32));
                    }
                }
            }
            if (w.live > 0 && w.epoch == before) {
                char msg[256];
                std::snprintf(msg, sizeof msg,
                              "deadlock in block (%u,%u,%u): %d live threads wait at barriers that "
                              "cannot complete (__syncthreads or a warp op in divergent code?)",
                              blockIdx.x, blockIdx.y, blockIdx.z, w.live);
                w.error = msg;
                break;
            }
        }
    }
    give_stacks(w.fibers);
    std::free(w.smem);
    w.smem = nullptr;
    tw = nullptr;
}

}  // namespace

void syncthreads() {
    Worker* w = tw;
    unsigned g = w->bar_gen;
    w->bar_arrived++;
    w->epoch++;
    complete_block_barrier_if_ready(w);
    while (w->bar_gen == g) yield();
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane) {
    Worker* w = tw;
    int t = linear_tid();
    Warp& wp = w->warps[t >> 5];
    int lane = t & 31;
    unsigned ph = (wp.phase >> lane) & 1u;
    wp.buf[ph][lane] = value;
    warp_barrier(mask);
    uint64_t out = value;
    if (src_lane >= 0) {
        // Double buffering makes one barrier per exchange enough: a lane can write this buffer
        // again only after the next barrier, which every reader must have reached first.
        out = ((wp.present >> (src_lane & 31)) & 1u) ? wp.buf[ph][src_lane & 31] : kPoison;
    }
    wp.phase ^= 1u << lane;
    return out;
}

unsigned warp_ballot(unsigned mask, bool pred) {
    Worker* w = tw;
    int t = linear_tid();
    Warp& wp = w->warps[t >> 5];
    int lane = t & 31;
    unsigned ph = (wp.phase >> lane) & 1u;
    wp.buf[ph][lane] = pred ? 1 : 0;
    warp_barrier(mask);
    unsigned need = wp.need;
    unsigned out = 0;
    for (int i = 0; i < 32; i++)
        if (((need >> i) & 1u) && ((wp.live >> i) & 1u) && wp.buf[ph][i] == 1) out |= 1u << i;
    wp.phase ^= 1u << lane;
    return out;
}

void syncwarp(unsigned mask) { warp_barrier(mask); }

unsigned char* dyn_smem() { return tw->smem; }
std::size_t dyn_smem_bytes() { return tw->smem_bytes; }

int run(const r3emu_launch* cfg, void (*body)(void*), void* ctx) {
    unsigned n = cfg->block[0] * cfg->block[1] * cfg->block[2];
    unsigned total = cfg->grid[0] * cfg->grid[1] * cfg->grid[2];
    if (n == 0 || n > 1024 || cfg->block[2] > 64 || total == 0 || cfg->grid[1] > 65535 ||
        cfg->grid[2] > 65535) {
        last_error = "invalid launch shape: grid " + std::to_string(cfg->grid[0]) + "x" +
                     std::to_string(cfg->grid[1]) + "x" + std::to_string(cfg->grid[2]) +
                     ", block " + std::to_string(cfg->block[0]) + "x" +
                     std::to_string(cfg->block[1]) + "x" + std::to_string(cfg->block[2]) +
                     " (a block holds 1..1024 threads)";
        return 1;
    }
    if (cfg->shared_bytes > 227 * 1024) {
        last_error = "dynamic shared memory " + std::to_string(cfg->shared_bytes) +
                     " bytes exceeds the 227 KiB an sm_90 block can have";
        return 1;
    }
    unsigned workers = std::max(1u, std::min(cfg->workers, total));
    std::vector<Worker> ws(workers);
    if (workers == 1) {
        run_blocks(*cfg, 0, 1, body, ctx, ws[0]);
    } else {
        std::vector<std::thread> th;
        for (unsigned i = 0; i < workers; i++)
            th.emplace_back([&, i] { run_blocks(*cfg, i, workers, body, ctx, ws[i]); });
        for (auto& t : th) t.join();
    }
    for (auto& w : ws) {
        if (!w.error.empty()) {
            last_error = w.error;
            return 2;
        }
    }
    return 0;
}

}  // namespace r3emu

extern "C" const char* r3emu_last_error(void) { return r3emu::last_error.c_str(); }
