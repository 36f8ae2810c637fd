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
/// Element-wise, in parallel blocks (the result does not depend on the split).
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 14;
    assert!(
        g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
        "adamw_step: segment lengths"
    );
    p.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(m.par_chunks_mut(BLOCK).zip(v.par_chunks_mut(BLOCK)))
        .for_each(|((p, g), (m, v))| adamw_span(p, g, m, v, h, step, grad_scale));
}

crate::multiversion! {
    /// [`adamw_step`] on one block.
    fn adamw_span / adamw_span_at(
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
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = (g * grad_scale) as f64;
            let mut pi = *p as f64;
            pi -= lr * wd * pi;
            let mi = h.beta1 as f64 * *m as f64 + (1.0 - h.beta1 as f64) * gi;
            let vi = h.beta2 as f64 * *v as f64 + (1.0 - h.beta2 as f64) * gi * gi;
            pi -= lr * (mi / bc1) / ((vi / bc2).sqrt() + h.eps as f64);
            *m = mi as f32;
            *v = vi as f32;
            *p = pi as f32;
        }
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
    fn every_vector_level_gives_the_same_bits() {
        let n = 1000;
        let val = |i: usize, a: f32| ((i * 7919) % 101) as f32 * a - 0.5;
        let h = AdamWHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        crate::device::cpu::simd::assert_same_bits("adamw", |level| {
            let mut p: Vec<f32> = (0..n).map(|i| val(i, 0.01)).collect();
            let mut m: Vec<f32> = (0..n).map(|i| val(i + 1, 0.001)).collect();
            let mut v: Vec<f32> = (0..n).map(|i| val(i + 2, 0.001).abs()).collect();
            let g: Vec<f32> = (0..n).map(|i| val(i + 5, 0.02)).collect();
            adamw_span_at(level, &mut p, &g, &mut m, &mut v, &h, 3, 0.7);
            [p, m, v].concat()
        });
    }

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
