// The M3 contrastive losses over score matrices, forward and backward fused (the score rows are
// short: B·G <= a few thousand columns). References: src/device/cpu/loss.rs cross_entropy_* /
// soft_cross_entropy_* and src/ops/loss.rs m3_kd_loss, applied to x = scores * inv_t (+ mask).
//
// Layout: scores / dscores [B, N] in T (f32 or bf16; f32 arithmetic); x = scores * inv_t
// (inv_t = 1 / temperature; 1 when the scores are already scaled). dscores is the gradient
// w.r.t. the stored scores (the inv_t factor included) and is skipped when NULL; it may alias
// scores (each element is read, then written by the same thread).
//   infonce: + mask [B, N] f32 (additive, e.g. -inf for excluded columns; NULL = none),
//     targets [B] i64 (-100 = ignored row) -> lse [B] f32, row_loss [B] f32 = lse - x[target]
//     (0 for ignored rows), dscores = g (softmax(x) - onehot) inv_t (0 on ignored rows).
//     For the mean over the C counted rows pass g = upstream / C (cross_entropy_reduce of
//     kernels/loss.cu turns row_loss + targets into the mean).
//   soft_ce: + targets [B, N] f32 probabilities -> lse [B], row_loss [B] = -Σ_c t_c (x_c - lse),
//     dscores = g (softmax(x) Σ_c t_c - t) inv_t; for the mean over rows pass g = upstream / B.
//   m3_kd: + teacher [B, G] f32; row b's group is the columns c0 = b·col_stride .. c0 + G
//     (col_stride = G for in-batch [B, B·G] matrices, 0 for the local [B, G] blocks);
//     lse [B, G] f32 = log-sum-exp of row b without columns c0 .. c0 + g - 1,
//     row_loss [B] = Σ_g T[b,g] (lse[b,g] - x[b, c0 + g]); the loss is the mean of row_loss
//     over B (FlagEmbedding's m3_kd_loss); dscores = Σ_g g T[b,g] (softmax_g(x) - onehot_g) inv_t
//     with g = upstream / B. G <= 128.
//
// Launch: one block of 256 threads per row, grid B; no dynamic shared memory.
//
// Why it is fast: one online (max, sum-exp) pass and one gradient pass per row, both coalesced,
// loss and gradient in the same launch (no [B, N] probability matrix is stored). m3_kd never
// subtracts exponentials: the sum over the columns outside the group is computed once and each
// of the G masked log-sum-exps adds only the group's suffix, so the G softmaxes cost one pass.
#include "common.cuh"

namespace r3 {

constexpr long long kInfIgnore = -100;
constexpr int kKdMaxGroup = 128;

__device__ __forceinline__ void maxsum_push(MaxSum& acc, float v) {
    if (v > acc.m) {
        acc.s = acc.s * __expf(acc.m - v) + 1.f;
        acc.m = v;
    } else if (v != -INFINITY) {
        acc.s += __expf(v - acc.m);
    }
}

template <class T>
__device__ __forceinline__ void infonce_impl(const T* scores, const float* __restrict__ mask,
                                             const long long* __restrict__ targets, float inv_t,
                                             float g, float* __restrict__ lse,
                                             float* __restrict__ row_loss, T* dscores, int B,
                                             int N) {
    const long long row = blockIdx.x;
    if (row >= B) return;
    const T* sr = scores + row * N;
    const float* mr = mask ? mask + row * N : nullptr;
    MaxSum acc{-INFINITY, 0.f};
    for (int i = threadIdx.x; i < N; i += blockDim.x)
        maxsum_push(acc, load(sr, i) * inv_t + (mr ? mr[i] : 0.f));
    acc = block_maxsum(acc);
    const float l = acc.m + logf(acc.s);
    const long long t = targets[row];
    const bool ignored = t == kInfIgnore;
    if (threadIdx.x == 0) {
        lse[row] = l;
        row_loss[row] = ignored ? 0.f
                        : (t < 0 || t >= N) ? NAN
                                            : l - (load(sr, t) * inv_t + (mr ? mr[t] : 0.f));
    }
    if (!dscores) return;
    T* dr = dscores + row * N;
    const float scale = ignored ? 0.f : g * inv_t;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float x = load(sr, i) * inv_t + (mr ? mr[i] : 0.f);
        store(dr, i, scale * (__expf(x - l) - (i == t ? 1.f : 0.f)));
    }
}

template <class T>
__device__ __forceinline__ void soft_ce_impl(const T* scores, const float* __restrict__ targets,
                                             float inv_t, float g, float* __restrict__ lse,
                                             float* __restrict__ row_loss, T* dscores, int B,
                                             int N) {
    const long long row = blockIdx.x;
    if (row >= B) return;
    const T* sr = scores + row * N;
    const float* tr = targets + row * N;
    MaxSum acc{-INFINITY, 0.f};
    for (int i = threadIdx.x; i < N; i += blockDim.x) maxsum_push(acc, load(sr, i) * inv_t);
    acc = block_maxsum(acc);
    const float l = acc.m + logf(acc.s);
    float loss = 0.f, tsum = 0.f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float t = tr[i];
        tsum += t;
        if (t != 0.f) loss += t * (l - load(sr, i) * inv_t);
    }
    loss = block_sum(loss);
    tsum = block_sum(tsum);
    if (threadIdx.x == 0) {
        lse[row] = l;
        row_loss[row] = loss;
    }
    if (!dscores) return;
    T* dr = dscores + row * N;
    const float scale = g * inv_t;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float x = load(sr, i) * inv_t;
        store(dr, i, scale * (__expf(x - l) * tsum - tr[i]));
    }
}

template <class T>
__device__ __forceinline__ void m3_kd_impl(const T* scores, const float* __restrict__ teacher,
                                           float inv_t, float g, int col_stride,
                                           float* __restrict__ lse, float* __restrict__ row_loss,
                                           T* dscores, int B, int N, int G) {
    __shared__ float gx[kKdMaxGroup], glse[kKdMaxGroup];
    const long long row = blockIdx.x;
    if (row >= B) return;
    const T* sr = scores + row * N;
    const float* tr = teacher + row * G;
    const long long c0 = row * col_stride;
    // The columns outside the group, once.
    MaxSum out{-INFINITY, 0.f};
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        if (i >= c0 && i < c0 + G) {
            gx[i - c0] = load(sr, i) * inv_t;
        } else {
            maxsum_push(out, load(sr, i) * inv_t);
        }
    }
    out = block_maxsum(out);  // (its barriers also publish gx)
    // Thread k < G: the log-sum-exp without group columns 0 .. k-1, and its loss term.
    float loss = 0.f, coef = 0.f;
    if ((int)threadIdx.x < G) {
        const int k = threadIdx.x;
        float m = out.m;
        for (int j = k; j < G; ++j) m = fmaxf(m, gx[j]);
        float s = out.m == -INFINITY ? 0.f : out.s * __expf(out.m - m);
        for (int j = k; j < G; ++j) s += __expf(gx[j] - m);
        const float l = m + logf(s);
        glse[k] = l;
        lse[row * G + k] = l;
        loss = tr[k] * (l - gx[k]);
        // Outside columns: Σ_g w_g exp(x - lse_g) = exp(x - m_out) Σ_g w_g exp(m_out - lse_g).
        if (out.m != -INFINITY) coef = g * tr[k] * __expf(out.m - l);
    }
    loss = block_sum(loss);  // (its barriers also publish glse)
    coef = block_sum(coef);
    if (threadIdx.x == 0) row_loss[row] = loss;
    if (!dscores) return;
    T* dr = dscores + row * N;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        float d;
        if (i >= c0 && i < c0 + G) {
            // Group column k is visible to the softmaxes g <= k; it is the target of g = k.
            const int k = (int)(i - c0);
            d = -g * tr[k];
            for (int j = 0; j <= k; ++j) d += g * tr[j] * __expf(gx[k] - glse[j]);
        } else {
            d = __expf(load(sr, i) * inv_t - out.m) * coef;
        }
        store(dr, i, d * inv_t);
    }
}

}  // namespace r3

using r3::bf16;

extern "C" __global__ void __launch_bounds__(256)
    infonce_f32(const float* scores, const float* mask, const long long* targets, float inv_t,
                float g, float* lse, float* row_loss, float* dscores, int B, int N) {
    r3::infonce_impl(scores, mask, targets, inv_t, g, lse, row_loss, dscores, B, N);
}
extern "C" __global__ void __launch_bounds__(256)
    infonce_bf16(const bf16* scores, const float* mask, const long long* targets, float inv_t,
                 float g, float* lse, float* row_loss, bf16* dscores, int B, int N) {
    r3::infonce_impl(scores, mask, targets, inv_t, g, lse, row_loss, dscores, B, N);
}
extern "C" __global__ void __launch_bounds__(256)
    soft_ce_f32(const float* scores, const float* targets, float inv_t, float g, float* lse,
                float* row_loss, float* dscores, int B, int N) {
    r3::soft_ce_impl(scores, targets, inv_t, g, lse, row_loss, dscores, B, N);
}
extern "C" __global__ void __launch_bounds__(256)
    soft_ce_bf16(const bf16* scores, const float* targets, float inv_t, float g, float* lse,
                 float* row_loss, bf16* dscores, int B, int N) {
    r3::soft_ce_impl(scores, targets, inv_t, g, lse, row_loss, dscores, B, N);
}
extern "C" __global__ void __launch_bounds__(256)
    m3_kd_f32(const float* scores, const float* teacher, float inv_t, float g, int col_stride,
              float* lse, float* row_loss, float* dscores, int B, int N, int G) {
    r3::m3_kd_impl(scores, teacher, inv_t, g, col_stride, lse, row_loss, dscores, B, N, G);
}
extern "C" __global__ void __launch_bounds__(256)
    m3_kd_bf16(const bf16* scores, const float* teacher, float inv_t, float g, int col_stride,
               float* lse, float* row_loss, bf16* dscores, int B, int N, int G) {
    r3::m3_kd_impl(scores, teacher, inv_t, g, col_stride, lse, row_loss, dscores, B, N, G);
}

R3_EMU_EXPORT(infonce_f32)
R3_EMU_EXPORT(infonce_bf16)
R3_EMU_EXPORT(soft_ce_f32)
R3_EMU_EXPORT(soft_ce_bf16)
R3_EMU_EXPORT(m3_kd_f32)
R3_EMU_EXPORT(m3_kd_bf16)
