//! Linear layer y = x Wᵀ + b over the last dimension (PyTorch weight layout [out, in]).

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::gemm;
use crate::error::{Error, Result};

/// x [.., in], w [out, in], b \[out\] -> [.., out].
pub fn linear(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let (dout, din) = w.value().shape().dims2("linear weight")?;
    let (n, xin) = x.value().shape().rows_cols();
    if xin != din || x.dims().is_empty() {
        return Err(Error::shape(
            "linear input (last dim = weight in-features)",
            &[din],
            x.dims(),
        ));
    }
    if let Some(b) = b {
        b.value().expect_dims("linear bias", &[dout])?;
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = dout;
    let mut y = vec![0.0; n * dout];
    let bias = match b {
        Some(b) => Some(b.value().f32s()?),
        None => None,
    };
    gemm::linear_fwd(
        x.value().f32s()?,
        w.value().f32s()?,
        bias,
        &mut y,
        n,
        din,
        dout,
    );
    let out = tensor(y, &out_dims)?;
    let (xt, wt) = (x.value().clone(), w.value().clone());
    let (need_dx, need_dw) = (x.is_tracked(), w.is_tracked());
    let has_b = b.is_some();
    let inputs: Vec<&Var> = match b {
        Some(b) => vec![x, w, b],
        None => vec![x, w],
    };
    Ok(tape.record("linear", &inputs, out, move |dy| {
        let mut dx = need_dx.then(|| vec![0.0; n * din]);
        let mut dw = need_dw.then(|| vec![0.0; dout * din]);
        let mut db = has_b.then(|| vec![0.0; dout]);
        gemm::linear_bwd(
            dy.f32s()?,
            xt.f32s()?,
            wt.f32s()?,
            dx.as_deref_mut(),
            dw.as_deref_mut(),
            db.as_deref_mut(),
            n,
            din,
            dout,
        );
        let mut grads = vec![
            dx.map(|d| tensor(d, xt.dims())).transpose()?,
            dw.map(|d| tensor(d, &[dout, din])).transpose()?,
        ];
        if has_b {
            grads.push(db.map(|d| tensor(d, &[dout])).transpose()?);
        }
        Ok(grads)
    }))
}
