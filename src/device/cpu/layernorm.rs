//! LayerNorm over the last dimension, with statistics in f64.

/// y = (x - mean) * rstd * gamma + beta per row of `dim`; saves mean and rstd per row.
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
    for (r, (xr, yr)) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)).enumerate() {
        let m = xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = xr.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / dim as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..dim {
            yr[i] = (((xr[i] as f64 - m) * rs) as f32) * gamma[i] + beta[i];
        }
        mean[r] = m as f32;
        rstd[r] = rs as f32;
    }
}

/// LayerNorm backward: dx assigned; dgamma, dbeta accumulated.
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
    let mut dg = vec![0.0f64; dim];
    let mut db = vec![0.0f64; dim];
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
    for i in 0..dim {
        dgamma[i] += dg[i] as f32;
        dbeta[i] += db[i] as f32;
    }
}
