//! Element-wise ops: add (residual), GELU, ReLU, dropout.

use super::{tensor, Texts};
use crate::autograd::{Tape, Var};
use crate::device::cpu::elementwise as k;
use crate::error::{Error, Result};
use std::sync::Arc;

/// a + b (same shape).
pub fn add(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    if a.dims() != b.dims() {
        return Err(Error::shape("add", a.dims(), b.dims()));
    }
    let y: Vec<f32> = a
        .value()
        .f32s()?
        .iter()
        .zip(b.value().f32s()?)
        .map(|(x, y)| x + y)
        .collect();
    let out = tensor(y, a.dims())?;
    Ok(tape.record("add", &[a, b], out, |dy| {
        Ok(vec![Some(dy.clone()), Some(dy.clone())])
    }))
}

/// Exact-erf GELU.
pub fn gelu(tape: &mut Tape, x: &Var) -> Result<Var> {
    let xt = x.value().clone();
    let mut y = vec![0.0; xt.numel()];
    k::gelu_fwd(xt.f32s()?, &mut y);
    let out = tensor(y, xt.dims())?;
    Ok(tape.record("gelu", &[x], out, move |dy| {
        let mut dx = vec![0.0; xt.numel()];
        k::gelu_bwd(xt.f32s()?, dy.f32s()?, &mut dx);
        Ok(vec![Some(tensor(dx, xt.dims())?)])
    }))
}

/// ReLU.
pub fn relu(tape: &mut Tape, x: &Var) -> Result<Var> {
    let xt = x.value().clone();
    let mut y = vec![0.0; xt.numel()];
    k::relu_fwd(xt.f32s()?, &mut y);
    let out = tensor(y, xt.dims())?;
    Ok(tape.record("relu", &[x], out, move |dy| {
        let mut dx = vec![0.0; xt.numel()];
        k::relu_bwd(xt.f32s()?, dy.f32s()?, &mut dx);
        Ok(vec![Some(tensor(dx, xt.dims())?)])
    }))
}

/// Inverted dropout with probability `p`; the keep mask is a hash of (seed, stream, index), so
/// the backward regenerates it. `p == 0` is the identity.
pub fn dropout(tape: &mut Tape, x: &Var, p: f32, seed: u64, stream: u64) -> Result<Var> {
    dropout_blocks(tape, x, p, Arc::from([seed]), stream)
}

/// [`dropout`] of a batch of independent texts (rows [B, L, ..]): text b draws from
/// `texts.seeds[b]` with indices counted from its own first element, so its real rows get the
/// mask they get when the text is dropped out alone (`device::cpu::elementwise::dropout_texts_fwd`).
pub fn dropout_texts(tape: &mut Tape, x: &Var, p: f32, texts: &Texts, stream: u64) -> Result<Var> {
    if x.dims().first() != Some(&texts.seeds.len()) {
        return Err(Error::shape(
            "per-text dropout input",
            &[texts.seeds.len()],
            x.dims(),
        ));
    }
    dropout_blocks(tape, x, p, texts.seeds.clone(), stream)
}

/// Dropout of `x` as `seeds.len()` equal blocks, block b drawing from `seeds[b]`
/// (`device::cpu::elementwise::dropout_texts_fwd`; one block is plain dropout).
fn dropout_blocks(tape: &mut Tape, x: &Var, p: f32, seeds: Arc<[u64]>, stream: u64) -> Result<Var> {
    if p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(format!(
            "dropout probability {p} not in [0, 1)"
        )));
    }
    let dims = x.dims().to_vec();
    let mut y = vec![0.0; x.value().numel()];
    k::dropout_texts_fwd(x.value().f32s()?, &mut y, p, &seeds, stream);
    let out = tensor(y, &dims)?;
    Ok(tape.record("dropout", &[x], out, move |dy| {
        let mut dx = vec![0.0; dy.numel()];
        k::dropout_texts_fwd(dy.f32s()?, &mut dx, p, &seeds, stream);
        Ok(vec![Some(tensor(dx, &dims)?)])
    }))
}

/// c · x.
pub fn scale(tape: &mut Tape, x: &Var, c: f32) -> Result<Var> {
    let y: Vec<f32> = x.value().f32s()?.iter().map(|v| v * c).collect();
    let out = tensor(y, x.dims())?;
    let dims = x.dims().to_vec();
    Ok(tape.record("scale", &[x], out, move |dy| {
        let dx: Vec<f32> = dy.f32s()?.iter().map(|v| v * c).collect();
        Ok(vec![Some(tensor(dx, &dims)?)])
    }))
}
