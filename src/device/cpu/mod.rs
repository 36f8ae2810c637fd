//! The CPU reference kernels: plain loops over contiguous f32 slices, forward and backward side by
//! side (llm.c's `train_gpt2.c` role). Written to be obviously right; only the GEMM uses a tuned
//! crate. Parameter gradients accumulate (`+=`), activation gradients are assigned (`=`).

pub mod adamw;
pub mod attention;
pub mod attention_ref;
pub mod elementwise;
pub mod embedding;
pub mod fused;
pub mod gemm;
pub mod layernorm;
pub mod loss;
pub mod maxsim;
pub mod normalize;
pub mod simd;
pub mod sparse;
pub mod topk;
