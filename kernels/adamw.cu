// Fused AdamW over one contiguous f32 parameter buffer, and the global squared gradient norm used
// for clipping (reference: src/device/cpu/adamw.rs adamw_step / grad_norm_sq / clip_factor).
//
// Layout: param, grad, m, v [n] f32 (master weights and moments, contiguous for the whole model);
// decay_mask [n] u8 (1: apply weight decay; null: decay everything); partials [blocks] f32;
// sumsq [1] f32.
//
// Launch: adamw_f32: block 256, grid-stride, grid = min(ceil(n / 256), max_blocks).
// grad_sumsq_partial_f32: block 256, grid = min(ceil(n / 256), 1024), one partial per block;
// sum_final_f32: one block of 256 threads over the partials (deterministic two-stage sum).
// Clipping needs no host round trip: adamw reads sumsq on the device and applies
// scale = min(1, max_norm / (sqrt(sumsq) + 1e-6)) when max_norm > 0 and sumsq is not null.
// gscale multiplies every gradient first (1/W after a sum over W ranks, or a clip factor the host
// computed over gradients living partly elsewhere). copy_bf16 / copy_f32 (either may be null):
// the updated master weight is also stored there (bf16 rounded to nearest even), the compute
// copy a device trainer's forward reads, so no separate cast pass runs.
//
// Why it is fast: one launch for the whole model, 16 bytes read + 12 written per parameter with
// every quantity in registers (bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t come from
// the host); the grad-norm reduction reads the gradient once.
#include "common.cuh"

namespace r3 {

__device__ __forceinline__ void adamw_impl(float* __restrict__ p, const float* __restrict__ g,
                                           float* __restrict__ m, float* __restrict__ v,
                                           const unsigned char* __restrict__ decay_mask,
                                           long long n, float lr, float beta1, float beta2,
                                           float eps, float weight_decay, float bc1, float bc2,
                                           const float* __restrict__ sumsq, float max_norm,
                                           float gscale, bf16* __restrict__ copy_bf16,
                                           float* __restrict__ copy_f32) {
    float scale = gscale;
    if (sumsq != nullptr && max_norm > 0.f)
        scale *= fminf(1.f, max_norm / (sqrtf(*sumsq) + 1e-6f));
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * scale;
        const float wd = (decay_mask == nullptr || decay_mask[i]) ? weight_decay : 0.f;
        float pi = p[i];
        pi -= lr * wd * pi;
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (copy_bf16 != nullptr) copy_bf16[i] = from_f32<bf16>(pi);
        if (copy_f32 != nullptr) copy_f32[i] = pi;
    }
}

__device__ __forceinline__ void grad_sumsq_partial_impl(const float* __restrict__ g, long long n,
                                                        float* __restrict__ partials) {
    float s = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__device__ __forceinline__ void sum_final_impl(const float* __restrict__ partials, int count,
                                               float* __restrict__ out) {
    float s = 0.f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

}  // namespace r3

extern "C" __global__ void __launch_bounds__(256)
    adamw_f32(float* p, const float* g, float* m, float* v, const unsigned char* decay_mask,
              long long n, float lr, float beta1, float beta2, float eps, float weight_decay,
              float bc1, float bc2, const float* sumsq, float max_norm, float gscale,
              r3::bf16* copy_bf16, float* copy_f32) {
    r3::adamw_impl(p, g, m, v, decay_mask, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, sumsq,
                   max_norm, gscale, copy_bf16, copy_f32);
}
extern "C" __global__ void __launch_bounds__(256)
    grad_sumsq_partial_f32(const float* g, long long n, float* partials) {
    r3::grad_sumsq_partial_impl(g, n, partials);
}
extern "C" __global__ void __launch_bounds__(256)
    sum_final_f32(const float* partials, int count, float* out) {
    r3::sum_final_impl(partials, count, out);
}

R3_EMU_EXPORT(adamw_f32)
R3_EMU_EXPORT(grad_sumsq_partial_f32)
R3_EMU_EXPORT(sum_final_f32)
