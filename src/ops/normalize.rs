//! Row-wise L2 normalisation.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::normalize as k;
use crate::error::Result;

/// x / max(‖x‖, eps) over the last dim.
pub fn l2_normalize(tape: &mut Tape, x: &Var, eps: f32) -> Result<Var> {
    let (rows, dim) = x.value().shape().rows_cols();
    let mut y = vec![0.0; rows * dim];
    k::l2_normalize_fwd(x.value().f32s()?, dim, eps, &mut y);
    let out = tensor(y, x.dims())?;
    let xt = x.value().clone();
    Ok(tape.record("l2_normalize", &[x], out, move |dy| {
        let mut dx = vec![0.0; rows * dim];
        k::l2_normalize_bwd(xt.f32s()?, dy.f32s()?, dim, eps, &mut dx);
        Ok(vec![Some(tensor(dx, xt.dims())?)])
    }))
}
