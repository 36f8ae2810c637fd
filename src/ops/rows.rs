//! Row selection and pooling: CLS rows, ColBERT rows, mean pooling, per-row scaling, and the
//! weighted sum used by tests and simple losses.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// The same values with other dims (gradient reshaped back).
pub fn reshape(tape: &mut Tape, x: &Var, dims: &[usize]) -> Result<Var> {
    let out = x.value().reshape(dims)?;
    let back = x.dims().to_vec();
    Ok(tape.record("reshape", &[x], out, move |dy| {
        Ok(vec![Some(dy.reshape(&back)?)])
    }))
}

/// x viewed as rows [R, C] (all leading dims flattened) -> the rows listed, [len, C].
pub fn select_rows(tape: &mut Tape, x: &Var, rows: &[usize]) -> Result<Var> {
    let (r, c) = x.value().shape().rows_cols();
    if let Some(&bad) = rows.iter().find(|&&i| i >= r) {
        return Err(Error::invalid(format!("select_rows: row {bad} of {r}")));
    }
    let xs = x.value().f32s()?;
    let mut y = Vec::with_capacity(rows.len() * c);
    for &i in rows {
        y.extend_from_slice(&xs[i * c..(i + 1) * c]);
    }
    let out = tensor(y, &[rows.len(), c])?;
    let rows = rows.to_vec();
    let in_dims = x.dims().to_vec();
    Ok(tape.record("select_rows", &[x], out, move |dy| {
        let mut dx = vec![0.0; r * c];
        for (k, &i) in rows.iter().enumerate() {
            for (d, &g) in dx[i * c..(i + 1) * c]
                .iter_mut()
                .zip(&dy.f32s()?[k * c..(k + 1) * c])
            {
                *d += g;
            }
        }
        Ok(vec![Some(tensor(dx, &in_dims)?)])
    }))
}

/// Multiply row i of x (rows = all leading dims) by f\[i\].
pub fn mul_rows(tape: &mut Tape, x: &Var, f: Arc<[f32]>) -> Result<Var> {
    let (r, c) = x.value().shape().rows_cols();
    if f.len() != r {
        return Err(Error::shape("mul_rows factors", &[r], &[f.len()]));
    }
    let xs = x.value().f32s()?;
    let y: Vec<f32> = xs.iter().enumerate().map(|(i, &v)| v * f[i / c]).collect();
    let out = tensor(y, x.dims())?;
    let dims = x.dims().to_vec();
    Ok(tape.record("mul_rows", &[x], out, move |dy| {
        let dx: Vec<f32> = dy
            .f32s()?
            .iter()
            .enumerate()
            .map(|(i, &g)| g * f[i / c])
            .collect();
        Ok(vec![Some(tensor(dx, &dims)?)])
    }))
}

/// Mean pooling: x [B, L, C], mask \[B*L\] (1 = real) -> [B, C], Σ mask·x / max(Σ mask, 1e-9)
/// (sentence-transformers clamps the count at 1e-9).
pub fn masked_mean(tape: &mut Tape, x: &Var, mask: &[u8]) -> Result<Var> {
    let (b, l, c) = x.value().shape().dims3("masked_mean input")?;
    if mask.len() != b * l {
        return Err(Error::shape("masked_mean mask", &[b, l], &[mask.len()]));
    }
    let xs = x.value().f32s()?;
    let mut y = vec![0.0f32; b * c];
    let mut inv = vec![0.0f32; b];
    for bi in 0..b {
        let count = mask[bi * l..(bi + 1) * l]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        inv[bi] = (1.0 / (count as f64).max(1e-9)) as f32;
        let mut acc = vec![0.0f64; c];
        for li in 0..l {
            if mask[bi * l + li] != 0 {
                for (a, &v) in acc.iter_mut().zip(&xs[(bi * l + li) * c..][..c]) {
                    *a += v as f64;
                }
            }
        }
        for (o, a) in y[bi * c..(bi + 1) * c].iter_mut().zip(acc) {
            *o = (a * inv[bi] as f64) as f32;
        }
    }
    let out = tensor(y, &[b, c])?;
    let mask = mask.to_vec();
    Ok(tape.record("masked_mean", &[x], out, move |dy| {
        let dys = dy.f32s()?;
        let mut dx = vec![0.0; b * l * c];
        for bi in 0..b {
            for li in 0..l {
                if mask[bi * l + li] != 0 {
                    for k in 0..c {
                        dx[(bi * l + li) * c + k] = dys[bi * c + k] * inv[bi];
                    }
                }
            }
        }
        Ok(vec![Some(tensor(dx, &[b, l, c])?)])
    }))
}

/// Σ x ⊙ r (a scalar, shape \[1\]); r is a constant of the same element count.
pub fn dot_sum(tape: &mut Tape, x: &Var, r: &Tensor) -> Result<Var> {
    if x.value().numel() != r.numel() {
        return Err(Error::shape("dot_sum weights", x.dims(), r.dims()));
    }
    let s: f64 = x
        .value()
        .f32s()?
        .iter()
        .zip(r.f32s()?)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let out = tensor(vec![s as f32], &[1])?;
    let (r, dims) = (r.clone(), x.dims().to_vec());
    Ok(tape.record("dot_sum", &[x], out, move |dy| {
        let g = dy.f32s()?[0];
        let dx: Vec<f32> = r.f32s()?.iter().map(|&v| v * g).collect();
        Ok(vec![Some(tensor(dx, &dims)?)])
    }))
}

/// x viewed as rows [R, C] with the listed rows replaced by `values` [len, C] (the RetroMAE
/// content stream puts the sentence embedding into slot 0). Gradient: dx = dy with those rows
/// zeroed; dvalues = dy at those rows.
pub fn replace_rows(tape: &mut Tape, x: &Var, rows: &[usize], values: &Var) -> Result<Var> {
    let (r, c) = x.value().shape().rows_cols();
    let (vr, vc) = values.value().shape().rows_cols();
    if vr != rows.len() || vc != c {
        return Err(Error::shape(
            "replace_rows values",
            &[rows.len(), c],
            values.dims(),
        ));
    }
    if let Some(&bad) = rows.iter().find(|&&i| i >= r) {
        return Err(Error::invalid(format!("replace_rows: row {bad} of {r}")));
    }
    // A row given twice would take the last value, and the backward would hand the row's
    // gradient to the first: refused.
    let mut seen = vec![false; r];
    if let Some(&twice) = rows
        .iter()
        .find(|&&i| std::mem::replace(&mut seen[i], true))
    {
        return Err(Error::invalid(format!(
            "replace_rows: row {twice} is given twice"
        )));
    }
    let mut y = x.value().f32s()?.to_vec();
    let vs = values.value().f32s()?;
    for (k, &i) in rows.iter().enumerate() {
        y[i * c..(i + 1) * c].copy_from_slice(&vs[k * c..(k + 1) * c]);
    }
    let out = tensor(y, x.dims())?;
    let (rows, dims, vdims) = (rows.to_vec(), x.dims().to_vec(), values.dims().to_vec());
    Ok(tape.record("replace_rows", &[x, values], out, move |dy| {
        let mut dx = dy.f32s()?.to_vec();
        let mut dv = vec![0.0; rows.len() * c];
        for (k, &i) in rows.iter().enumerate() {
            dv[k * c..(k + 1) * c].copy_from_slice(&dx[i * c..(i + 1) * c]);
            dx[i * c..(i + 1) * c].fill(0.0);
        }
        Ok(vec![Some(tensor(dx, &dims)?), Some(tensor(dv, &vdims)?)])
    }))
}
