//! ColBERT MaxSim scores between query and passage vector sets.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::maxsim::{self as k, MaxSimDims};
use crate::error::{Error, Result};
use std::sync::Arc;

/// q [B, Lq, D] with qmask \[B*Lq\], p [N, Lp, D] with pmask \[N*Lp\] -> scores [B, N].
pub fn maxsim(
    tape: &mut Tape,
    q: &Var,
    qmask: Arc<[u8]>,
    p: &Var,
    pmask: Arc<[u8]>,
) -> Result<Var> {
    let (queries, q_len, dim) = q.value().shape().dims3("maxsim q")?;
    let (passages, p_len, pdim) = p.value().shape().dims3("maxsim p")?;
    if pdim != dim {
        return Err(Error::shape("maxsim p", &[passages, p_len, dim], p.dims()));
    }
    if qmask.len() != queries * q_len || pmask.len() != passages * p_len {
        return Err(Error::shape(
            "maxsim masks",
            &[queries * q_len, passages * p_len],
            &[qmask.len(), pmask.len()],
        ));
    }
    let d = MaxSimDims {
        queries,
        q_len,
        passages,
        p_len,
        dim,
    };
    let mut scores = vec![0.0; queries * passages];
    let mut argmax = vec![0u32; queries * passages * q_len];
    k::maxsim_fwd(
        q.value().f32s()?,
        &qmask,
        p.value().f32s()?,
        &pmask,
        d,
        &mut scores,
        &mut argmax,
    );
    let out = tensor(scores, &[queries, passages])?;
    let (qt, pt) = (q.value().clone(), p.value().clone());
    Ok(tape.record("maxsim", &[q, p], out, move |ds| {
        let mut dq = vec![0.0; qt.numel()];
        let mut dp = vec![0.0; pt.numel()];
        k::maxsim_bwd(
            qt.f32s()?,
            &qmask,
            pt.f32s()?,
            &argmax,
            ds.f32s()?,
            d,
            &mut dq,
            &mut dp,
        );
        Ok(vec![
            Some(tensor(dq, qt.dims())?),
            Some(tensor(dp, pt.dims())?),
        ])
    }))
}
