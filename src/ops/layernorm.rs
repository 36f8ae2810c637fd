//! LayerNorm over the last dimension.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::layernorm as k;
use crate::error::Result;

/// y = LN(x) * gamma + beta, statistics over the last dim.
pub fn layernorm(tape: &mut Tape, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
    let (rows, dim) = x.value().shape().rows_cols();
    gamma.value().expect_dims("layernorm weight", &[dim])?;
    beta.value().expect_dims("layernorm bias", &[dim])?;
    let mut y = vec![0.0; rows * dim];
    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
    k::layernorm_fwd(
        x.value().f32s()?,
        gamma.value().f32s()?,
        beta.value().f32s()?,
        eps,
        dim,
        &mut y,
        &mut mean,
        &mut rstd,
    );
    let out = tensor(y, x.dims())?;
    let (xt, gt) = (x.value().clone(), gamma.value().clone());
    Ok(tape.record("layernorm", &[x, gamma, beta], out, move |dy| {
        let mut dx = vec![0.0; rows * dim];
        let (mut dg, mut db) = (vec![0.0; dim], vec![0.0; dim]);
        k::layernorm_bwd(
            xt.f32s()?,
            gt.f32s()?,
            &mean,
            &rstd,
            dy.f32s()?,
            dim,
            &mut dx,
            &mut dg,
            &mut db,
        );
        Ok(vec![
            Some(tensor(dx, xt.dims())?),
            Some(tensor(dg, &[dim])?),
            Some(tensor(db, &[dim])?),
        ])
    }))
}
