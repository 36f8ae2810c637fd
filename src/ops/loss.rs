//! Cross-entropy losses over rows of logits.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::loss as k;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Mean hard-target cross-entropy of logits [N, C] against targets [N] (`k::IGNORE_INDEX` rows
/// are skipped). Returns a scalar [1].
pub fn cross_entropy(tape: &mut Tape, logits: &Var, targets: &[i64]) -> Result<Var> {
    let (n, c) = logits.value().shape().rows_cols();
    if targets.len() != n {
        return Err(Error::shape(
            "cross_entropy targets",
            &[n],
            &[targets.len()],
        ));
    }
    if let Some(&t) = targets
        .iter()
        .find(|&&t| t != k::IGNORE_INDEX && (t < 0 || t as usize >= c))
    {
        return Err(Error::invalid(format!(
            "cross_entropy: target {t} outside 0..{c}"
        )));
    }
    let mut lse = vec![0.0; n];
    let (loss, count) = k::cross_entropy_fwd(logits.value().f32s()?, targets, c, &mut lse);
    if !loss.is_finite() {
        return Err(Error::NonFinite("cross_entropy loss".into()));
    }
    let out = tensor(vec![loss], &[1])?;
    let (lt, targets) = (logits.value().clone(), targets.to_vec());
    Ok(tape.record("cross_entropy", &[logits], out, move |dy| {
        let mut dl = vec![0.0; n * c];
        k::cross_entropy_bwd(lt.f32s()?, &targets, c, &lse, count, dy.f32s()?[0], &mut dl);
        Ok(vec![Some(tensor(dl, lt.dims())?)])
    }))
}

/// Mean soft-target cross-entropy -Σ t log softmax(s) of logits [N, C] against probabilities
/// `targets` [N, C] (a constant: no gradient reaches the teacher). Returns a scalar [1].
pub fn soft_cross_entropy(tape: &mut Tape, logits: &Var, targets: &Tensor) -> Result<Var> {
    let (n, c) = logits.value().shape().rows_cols();
    if targets.numel() != n * c {
        return Err(Error::shape(
            "soft_cross_entropy targets",
            logits.dims(),
            targets.dims(),
        ));
    }
    let mut lse = vec![0.0; n];
    let loss = k::soft_cross_entropy_fwd(logits.value().f32s()?, targets.f32s()?, c, &mut lse);
    if !loss.is_finite() {
        return Err(Error::NonFinite("soft_cross_entropy loss".into()));
    }
    let out = tensor(vec![loss], &[1])?;
    let (lt, tt) = (logits.value().clone(), targets.clone());
    Ok(
        tape.record("soft_cross_entropy", &[logits], out, move |dy| {
            let mut dl = vec![0.0; n * c];
            k::soft_cross_entropy_bwd(lt.f32s()?, tt.f32s()?, c, &lse, dy.f32s()?[0], &mut dl);
            Ok(vec![Some(tensor(dl, lt.dims())?)])
        }),
    )
}
