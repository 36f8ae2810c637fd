//! AdamW (decoupled weight decay, PyTorch's `torch.optim.AdamW`) over flat f32 buffers, and the
//! squared gradient norm used for global clipping: the reference of kernels/adamw.cu.

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay; 0 for biases and LayerNorm parameters.
    pub weight_decay: f32,
}

/// One AdamW step (`step` counts from 1) on a parameter segment:
/// p ← p − lr·wd·p; m ← β1 m + (1−β1) g̃; v ← β2 v + (1−β2) g̃²;
/// p ← p − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + eps), with g̃ = grad_scale · g (clipping).
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(step as i32);
    let (lr, wd) = (h.lr as f64, h.weight_decay as f64);
    for i in 0..p.len() {
        let gi = (g[i] * grad_scale) as f64;
        let mut pi = p[i] as f64;
        pi -= lr * wd * pi;
        let mi = h.beta1 as f64 * m[i] as f64 + (1.0 - h.beta1 as f64) * gi;
        let vi = h.beta2 as f64 * v[i] as f64 + (1.0 - h.beta2 as f64) * gi * gi;
        pi -= lr * (mi / bc1) / ((vi / bc2).sqrt() + h.eps as f64);
        m[i] = mi as f32;
        v[i] = vi as f32;
        p[i] = pi as f32;
    }
}

/// Σ g² in f64 (one term of the global gradient norm).
pub fn grad_norm_sq(g: &[f32]) -> f64 {
    g.iter().map(|&x| x as f64 * x as f64).sum()
}

/// PyTorch's clip_grad_norm_ factor: min(1, max_norm / (norm + 1e-6)).
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    ((max_norm as f64) / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction, the first update is lr · g / (|g| + eps) ≈ lr · sign(g).
        let h = AdamWHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut p = vec![1.0, 1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        adamw_step(&mut p, &[0.5, -2.0], &mut m, &mut v, &h, 1, 1.0);
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6,
            "{p:?}"
        );
        // Weight decay is decoupled: p shrinks by lr·wd·p before the Adam update.
        let h = AdamWHyper {
            weight_decay: 0.5,
            ..h
        };
        let mut p = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        adamw_step(&mut p, &[0.0], &mut m, &mut v, &h, 1, 1.0);
        assert!((p[0] - 1.9).abs() < 1e-6, "{p:?}");
    }
}
