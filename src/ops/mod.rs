//! Ops: shape checks, tape recording, forward and backward wiring, one file per op family
//! (mirroring `device/cpu/` and `kernels/`). Every op takes and returns [`Var`](crate::autograd::Var)s and records a
//! backward when the tape asks for it.

mod attention;
mod elementwise;
mod embedding;
mod layernorm;
mod linear;
mod loss;
mod maxsim;
mod normalize;
mod rows;
mod sparse;

pub use attention::{attention, attention_texts, AttentionMask, AttnDropout, Texts};
pub use elementwise::{add, dropout, dropout_texts, gelu, relu, scale};
pub use embedding::embedding;
pub use layernorm::layernorm;
pub use linear::linear;
pub use loss::{cross_entropy, group_columns, m3_kd_loss, soft_cross_entropy};
pub use maxsim::maxsim;
pub use normalize::l2_normalize;
pub use rows::{dot_sum, masked_mean, mul_rows, replace_rows, reshape, select_rows};
pub use sparse::lexical_scores;

use crate::error::Result;
use crate::tensor::Tensor;

/// An f32 tensor with the given dims from a freshly computed buffer.
pub(crate) fn tensor(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, dims)
}
