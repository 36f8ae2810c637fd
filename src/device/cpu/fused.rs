//! CPU twins of kernels/encoder.cu: the "add & norm" of a post-LN layer with its dropout, bias
//! addition and bias gradients. The device encoder (`engine`) uses the kernels; the selftest
//! compares them with these.

use super::elementwise::{dropout_fwd, hash_unit};
use super::layernorm::layernorm_fwd;

/// z = Dropout(a + bias) + res (keep element i when `hash_unit(seed, stream, i) >= p`), then
/// y = LN(z). Returns (z, y, mean, rstd).
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_fwd(
    a: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    drop: Option<(f32, u64, u64)>,
    dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut z: Vec<f32> = match bias {
        Some(b) => a.iter().enumerate().map(|(i, &v)| v + b[i % dim]).collect(),
        None => a.to_vec(),
    };
    if let Some((p, seed, stream)) = drop.filter(|d| d.0 > 0.0) {
        let scale = 1.0 / (1.0 - p);
        for (i, v) in z.iter_mut().enumerate() {
            *v = if hash_unit(seed, stream, i as u64) >= p {
                *v * scale
            } else {
                0.0
            };
        }
    }
    if let Some(r) = res {
        z.iter_mut().zip(r).for_each(|(v, r)| *v += r);
    }
    let rows = a.len() / dim.max(1);
    let (mut y, mut mean, mut rstd) = (vec![0.0; z.len()], vec![0.0; rows], vec![0.0; rows]);
    layernorm_fwd(&z, gamma, beta, eps, dim, &mut y, &mut mean, &mut rstd);
    (z, y, mean, rstd)
}

/// The dropout kernel's twin: y = x * keep / (1 - p).
pub fn dropout(x: &[f32], p: f32, seed: u64, stream: u64) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    dropout_fwd(x, &mut y, p, seed, stream);
    y
}

/// x[r, :] += bias.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len().max(1)) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// db\[c\] += Σ_r dy[r, c].
pub fn colsum(dy: &[f32], db: &mut [f32]) {
    for row in dy.chunks_exact(db.len().max(1)) {
        db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_layernorm_is_add_then_norm() {
        let dim = 4;
        let a = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, 0.0];
        let r = [0.5; 8];
        let b = [0.1, 0.2, 0.3, 0.4];
        let (z, y, _, _) = residual_layernorm_fwd(
            &a,
            Some(&b),
            Some(&r),
            &[1.0; 4],
            &[0.0; 4],
            1e-5,
            None,
            dim,
        );
        assert_eq!(z[0], 1.6);
        assert_eq!(z[7], 0.9);
        let m: f32 = y[..4].iter().sum::<f32>() / 4.0;
        assert!(m.abs() < 1e-6);
        let dz = dropout(&a, 0.5, 7, 3);
        let (z2, _, _, _) = residual_layernorm_fwd(
            &a,
            None,
            None,
            &[1.0; 4],
            &[0.0; 4],
            1e-5,
            Some((0.5, 7, 3)),
            dim,
        );
        assert_eq!(dz, z2, "the fused dropout draws the dropout kernel's mask");
        let mut db = [0.0; 4];
        colsum(&a, &mut db);
        assert_eq!(db, [0.0, 2.5, 5.0, 4.0]);
    }
}
