//! LayerNorm over the last dimension, with statistics in f64. Rows run in parallel in fixed blocks
//! of `ROWS` (the parameter-gradient sums are added block by block in order, so the result
//! does not depend on the thread count).

/// Rows per task.
const ROWS: usize = 32;

/// y = (x - mean) * rstd * gamma + beta per row of `dim`; saves mean and rstd per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    dim: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    use rayon::prelude::*;
    assert!(
        gamma.len() == dim && beta.len() == dim,
        "layernorm_fwd: parameter length"
    );
    if dim == 0 {
        return;
    }
    x.par_chunks(ROWS * dim)
        .zip(y.par_chunks_mut(ROWS * dim))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((x, y), (mean, rstd))| fwd_rows(x, gamma, beta, eps, y, mean, rstd));
}

crate::multiversion! {
    /// [`layernorm_fwd`] of one block of rows.
    fn fwd_rows / fwd_rows_at(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        let dim = gamma.len();
        for (r, (xr, yr)) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)).enumerate() {
            let m = xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = xr.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / dim as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (((v as f64 - m) * rs) as f32) * g + b;
            }
            mean[r] = m as f32;
            rstd[r] = rs as f32;
        }
    }
}

/// LayerNorm backward: dx assigned; dgamma, dbeta accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dim: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    use rayon::prelude::*;
    assert!(
        gamma.len() == dim && dgamma.len() == dim && dbeta.len() == dim,
        "layernorm_bwd: parameter length"
    );
    if dim == 0 {
        return;
    }
    // Each block's (Σ dy·xhat, Σ dy) per column in f64, summed over the blocks in order.
    let parts: Vec<Vec<f64>> = x
        .par_chunks(ROWS * dim)
        .zip(dy.par_chunks(ROWS * dim))
        .zip(dx.par_chunks_mut(ROWS * dim))
        .zip(mean.par_chunks(ROWS).zip(rstd.par_chunks(ROWS)))
        .map(|(((x, dy), dx), (mean, rstd))| {
            let mut acc = vec![0.0f64; 2 * dim];
            bwd_rows(x, gamma, mean, rstd, dy, dx, &mut acc);
            acc
        })
        .collect();
    let mut acc = vec![0.0f64; 2 * dim];
    for p in &parts {
        acc.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
    }
    for i in 0..dim {
        dgamma[i] += acc[i] as f32;
        dbeta[i] += acc[dim + i] as f32;
    }
}

crate::multiversion! {
    /// [`layernorm_bwd`] of one block of rows; `acc` [2 · dim] gathers Σ dy·xhat then Σ dy.
    fn bwd_rows / bwd_rows_at(
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        acc: &mut [f64],
    ) {
        let dim = gamma.len();
        let (dg, db) = acc.split_at_mut(dim);
        for (r, ((xr, dyr), dxr)) in x
            .chunks_exact(dim)
            .zip(dy.chunks_exact(dim))
            .zip(dx.chunks_exact_mut(dim))
            .enumerate()
        {
            let (m, rs) = (mean[r] as f64, rstd[r] as f64);
            // xhat_i = (x_i - m) rs; dxhat_i = dy_i gamma_i
            // dx_i = rs * (dxhat_i - mean(dxhat) - xhat_i * mean(dxhat * xhat))
            let mut sum_dxhat = 0.0f64;
            let mut sum_dxhat_xhat = 0.0f64;
            for i in 0..dim {
                let xhat = (xr[i] as f64 - m) * rs;
                let dxhat = dyr[i] as f64 * gamma[i] as f64;
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * xhat;
                dg[i] += dyr[i] as f64 * xhat;
                db[i] += dyr[i] as f64;
            }
            let (a, b) = (sum_dxhat / dim as f64, sum_dxhat_xhat / dim as f64);
            for i in 0..dim {
                let xhat = (xr[i] as f64 - m) * rs;
                let dxhat = dyr[i] as f64 * gamma[i] as f64;
                dxr[i] = (rs * (dxhat - a - xhat * b)) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vector_level_gives_the_same_bits() {
        let dim = 37;
        let val = |i: usize, a: f32| ((i * 7919) % 101) as f32 * a - 1.0;
        let x: Vec<f32> = (0..5 * dim).map(|i| val(i, 0.03)).collect();
        let dy: Vec<f32> = (0..5 * dim).map(|i| val(i + 3, 0.02)).collect();
        let (g, b): (Vec<f32>, Vec<f32>) = (0..dim)
            .map(|i| (val(i, 0.01) + 2.0, val(i, 0.005)))
            .unzip();
        crate::device::cpu::simd::assert_same_bits("layernorm", |level| {
            let (mut y, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; 5], vec![0.0; 5]);
            fwd_rows_at(level, &x, &g, &b, 1e-5, &mut y, &mut mean, &mut rstd);
            let mut dx = vec![0.0; x.len()];
            let mut acc = vec![0.0f64; 2 * dim];
            bwd_rows_at(level, &x, &g, &mean, &rstd, &dy, &mut dx, &mut acc);
            let acc: Vec<f32> = acc.iter().map(|&a| a as f32).collect();
            [y, mean, rstd, dx, acc].concat()
        });
    }
}
