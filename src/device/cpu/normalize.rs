//! Row-wise L2 normalisation, y = x / max(‖x‖₂, eps) (PyTorch F.normalize, eps = 1e-12).

/// Forward over rows of `dim`; zero rows stay zero.
pub fn l2_normalize_fwd(x: &[f32], dim: usize, eps: f32, y: &mut [f32]) {
    if dim == 0 {
        return;
    }
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let n = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let denom = n.max(eps as f64);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v as f64 / denom) as f32;
        }
    }
}

/// Backward: for ‖x‖ > eps, dx = (dy - y (y·dy)) / ‖x‖; below eps the map is x / eps.
pub fn l2_normalize_bwd(x: &[f32], dy: &[f32], dim: usize, eps: f32, dx: &mut [f32]) {
    if dim == 0 {
        return;
    }
    for ((xr, dyr), dxr) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let n = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if n > eps as f64 {
            let ydy: f64 = xr
                .iter()
                .zip(dyr)
                .map(|(&a, &g)| a as f64 / n * g as f64)
                .sum();
            for i in 0..dim {
                dxr[i] = ((dyr[i] as f64 - xr[i] as f64 / n * ydy) / n) as f32;
            }
        } else {
            for i in 0..dim {
                dxr[i] = (dyr[i] as f64 / eps as f64) as f32;
            }
        }
    }
}
