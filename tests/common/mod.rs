//! Shared test helpers: a deterministic RNG and a finite-difference gradient checker.
#![allow(dead_code)]

use retrom3::autograd::{Tape, Var};
use retrom3::{Result, Tensor};

/// xorshift64* with uniform and normal draws.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7) as f64;
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn tensor(&mut self, dims: &[usize], scale: f32) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec((0..n).map(|_| self.normal() * scale).collect(), dims).unwrap()
    }
}

/// Check the backward of `f` against central finite differences of L = Σ f(inputs) ⊙ R with R a
/// fixed random projection. Returns the worst norm-wise relative error over the inputs
/// (‖analytic − numeric‖ / max(‖numeric‖, 1e-6)); the caller asserts a threshold.
pub fn grad_check(
    name: &str,
    inputs: &[Tensor],
    h: f32,
    f: impl Fn(&mut Tape, &[Var]) -> Result<Var>,
) -> f64 {
    let mut rng = Rng::new(0xC0FFEE);
    // Analytic.
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let out = f(&mut tape, &vars).unwrap();
    let r = rng.tensor(out.dims(), 1.0);
    let grads = tape.backward_with(&out, r.clone()).unwrap();
    let eval = |ins: &[Tensor]| -> f64 {
        let mut t = Tape::no_grad();
        let vs: Vec<Var> = ins.iter().map(|x| Var::constant(x.clone())).collect();
        let o = f(&mut t, &vs).unwrap();
        o.value()
            .f32s()
            .unwrap()
            .iter()
            .zip(r.f32s().unwrap())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let mut worst = 0.0f64;
    for (idx, v) in vars.iter().enumerate() {
        let analytic = match grads.get(v) {
            Some(g) => g.f32s().unwrap().to_vec(),
            None => vec![0.0; inputs[idx].numel()],
        };
        let base = inputs[idx].f32s().unwrap().to_vec();
        let mut num = vec![0.0f64; base.len()];
        for i in 0..base.len() {
            let mut ins = inputs.to_vec();
            let mut plus = base.clone();
            plus[i] += h;
            ins[idx] = Tensor::from_vec(plus, inputs[idx].dims()).unwrap();
            let lp = eval(&ins);
            let mut minus = base.clone();
            minus[i] -= h;
            ins[idx] = Tensor::from_vec(minus, inputs[idx].dims()).unwrap();
            let lm = eval(&ins);
            num[i] = (lp - lm) / (2.0 * h as f64);
        }
        let diff: f64 = analytic
            .iter()
            .zip(&num)
            .map(|(&a, &n)| (a as f64 - n).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = num.iter().map(|n| n * n).sum::<f64>().sqrt().max(1e-6);
        let rel = diff / norm;
        eprintln!("grad_check {name} input {idx}: rel err {rel:.2e} (|num| {norm:.3e})");
        worst = worst.max(rel);
    }
    worst
}

/// Compare a gradient with a reference dump: passes when the norm-wise relative error is within
/// `rtol` and the largest element difference within `max_abs`, or — for tensors whose true
/// gradient is 0 (key biases: softmax is shift-invariant) — when both sides hold only f32 noise.
/// Returns the norm-wise relative error, or None for such a zero gradient. Panics naming `name`.
pub fn check_grad(name: &str, got: &[f32], want: &[f32], rtol: f64, max_abs: f32) -> Option<f64> {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let diff = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
    let worst = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a - b).abs())
        .fold(0.0, f32::max);
    if norm < 1e-5 && worst <= 5e-6 {
        return None;
    }
    let rel = diff / norm.max(1e-12);
    assert!(
        rel <= rtol && worst <= max_abs,
        "{name}: norm-wise rel err {rel:.2e}, max abs {worst:.2e}"
    );
    Some(rel)
}

/// A file or directory under tests/fixtures.
pub fn fixture(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// A fresh (removed if present) temporary path for `tag`, unique to this test process.
pub fn tmp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// ‖a − b‖ / ‖b‖ (f64).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
