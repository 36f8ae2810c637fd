//! Cross-entropy losses over rows of logits.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::loss as k;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Mean hard-target cross-entropy of logits [N, C] against targets \[N\] (`k::IGNORE_INDEX` rows
/// are skipped). Returns a scalar \[1\].
pub fn cross_entropy(tape: &mut Tape, logits: &Var, targets: &[i64]) -> Result<Var> {
    let (n, c) = logits.value().shape().rows_cols();
    if c == 0 {
        return Err(Error::invalid("cross_entropy: logits without a class"));
    }
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
/// `targets` [N, C] (a constant: no gradient reaches the teacher). Returns a scalar \[1\].
pub fn soft_cross_entropy(tape: &mut Tape, logits: &Var, targets: &Tensor) -> Result<Var> {
    let (n, c) = logits.value().shape().rows_cols();
    if c == 0 {
        return Err(Error::invalid("soft_cross_entropy: logits without a class"));
    }
    if targets.dims() != logits.dims() {
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

/// FlagEmbedding's `m3_kd_loss` (SPEC §4.5): Σ_g mean_b T\[b,g\] · CE(S_b with columns
/// b·G .. b·G+g−1 removed, target b·G+g). `s` is [B, N] (N ≥ B·G, in-batch candidates) and
/// `teacher` [B, G] probabilities (a constant).
pub fn m3_kd_loss(tape: &mut Tape, s: &Var, teacher: &Tensor, group: usize) -> Result<Var> {
    let (b, n) = s.value().shape().dims2("m3_kd_loss scores")?;
    if group == 0 || n < b * group || teacher.dims() != [b, group] {
        return Err(Error::shape(
            "m3_kd_loss teacher [B, G]",
            &[b, group],
            teacher.dims(),
        ));
    }
    let (sv, tv) = (s.value().f32s()?, teacher.f32s()?);
    // Per (b, g): the masked log-sum-exp.
    let mut lse = vec![0.0f64; b * group];
    let mut total = 0.0f64;
    for bi in 0..b {
        let row = &sv[bi * n..(bi + 1) * n];
        for g in 0..group {
            let hidden = bi * group..bi * group + g;
            let max = row
                .iter()
                .enumerate()
                .filter(|(j, _)| !hidden.contains(j))
                .fold(f32::NEG_INFINITY, |a, (_, &x)| a.max(x)) as f64;
            let sum: f64 = row
                .iter()
                .enumerate()
                .filter(|(j, _)| !hidden.contains(j))
                .map(|(_, &x)| (x as f64 - max).exp())
                .sum();
            let l = max + sum.ln();
            lse[bi * group + g] = l;
            total += tv[bi * group + g] as f64 * (l - row[bi * group + g] as f64);
        }
    }
    let loss = (total / b as f64) as f32;
    if !loss.is_finite() {
        return Err(Error::NonFinite("m3_kd_loss".into()));
    }
    let out = tensor(vec![loss], &[1])?;
    let (st, tt) = (s.value().clone(), teacher.clone());
    Ok(tape.record("m3_kd_loss", &[s], out, move |dy| {
        let g0 = dy.f32s()?[0] as f64;
        let (sv, tv) = (st.f32s()?, tt.f32s()?);
        let mut ds = vec![0.0f32; b * n];
        for bi in 0..b {
            for g in 0..group {
                let w = g0 * tv[bi * group + g] as f64 / b as f64;
                if w == 0.0 {
                    continue;
                }
                let l = lse[bi * group + g];
                for j in 0..n {
                    if j >= bi * group && j < bi * group + g {
                        continue;
                    }
                    let p = (sv[bi * n + j] as f64 - l).exp();
                    let onehot = if j == bi * group + g { 1.0 } else { 0.0 };
                    ds[bi * n + j] += (w * (p - onehot)) as f32;
                }
            }
        }
        Ok(vec![Some(tensor(ds, st.dims())?)])
    }))
}

/// Each row's own group of columns: [B, N] -> [B, G] with out[b, g] = s[b, b·G + g] (the
/// no-in-batch / KL view of an in-batch score matrix).
pub fn group_columns(tape: &mut Tape, s: &Var, group: usize) -> Result<Var> {
    let (b, n) = s.value().shape().dims2("group_columns scores")?;
    if n < b * group {
        return Err(Error::shape("group_columns", &[b, b * group], s.dims()));
    }
    let sv = s.value().f32s()?;
    let y: Vec<f32> = (0..b)
        .flat_map(|bi| (0..group).map(move |g| (bi, g)))
        .map(|(bi, g)| sv[bi * n + bi * group + g])
        .collect();
    let out = tensor(y, &[b, group])?;
    Ok(tape.record("group_columns", &[s], out, move |dy| {
        let dy = dy.f32s()?;
        let mut ds = vec![0.0; b * n];
        for bi in 0..b {
            for g in 0..group {
                ds[bi * n + bi * group + g] = dy[bi * group + g];
            }
        }
        Ok(vec![Some(tensor(ds, &[b, n])?)])
    }))
}
