//! Element-wise kernels: exact-erf GELU, ReLU, dropout, and the erf they need.

/// The error function, from the Chebyshev fit of erfc in Numerical Recipes (§6.2, `erfcc`):
/// relative error of erfc below 1.2e-7 everywhere, so erf is within 1.2e-7 absolute — below
/// half an f32 ulp of GELU's output scale — at the cost of one exp and ten multiply-adds.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let erfc = t * erfc_poly(z, t).exp();
    (1.0 - erfc).copysign(x)
}

/// The exponent of [`erf`]'s fit: erfc(z) = t · exp(poly(z, t)), t = 1 / (1 + z/2).
fn erfc_poly(z: f64, t: f64) -> f64 {
    -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))))
}

/// [`erf`] in f32 arithmetic (the polynomial in f32, `expf`): within 3e-7 of the f64 form, and
/// about half the cost of the f64 `exp`, which dominated GELU.
pub fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    (1.0 - erfc).copysign(x)
}

/// Elements per task of the element-wise kernels' rayon split (each element is independent, so
/// the result does not depend on the split).
const CHUNK: usize = 1 << 14;

/// GELU (exact erf form, PyTorch's default): y = x * Φ(x) = 0.5 x (1 + erf(x / √2)).
pub fn gelu_fwd(x: &[f32], y: &mut [f32]) {
    use rayon::prelude::*;
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = 0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
}

/// GELU backward: dx = dy * (Φ(x) + x φ(x)).
pub fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    use rayon::prelude::*;
    let inv_sqrt_2pi = (1.0 / (2.0 * std::f64::consts::PI).sqrt()) as f32;
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((dx, x), dy)| {
            for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = 0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = inv_sqrt_2pi * (-0.5 * v * v).exp();
                *d = g * (cdf + v * pdf);
            }
        });
}

/// ReLU forward.
pub fn relu_fwd(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.max(0.0);
    }
}

/// ReLU backward (the gradient at exactly 0 is 0, as in PyTorch).
pub fn relu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d = if v > 0.0 { g } else { 0.0 };
    }
}

/// A counter-based 32-bit hash (splitmix-style finaliser over a 64-bit key): the same function
/// serves dropout and the RetroMAE decoder mask on every device, so masks are reproducible from
/// (seed, counters) without storing them.
pub fn hash_u32(seed: u64, a: u64, b: u64) -> u32 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Uniform in [0, 1) from the hash.
pub fn hash_unit(seed: u64, a: u64, b: u64) -> f32 {
    (hash_u32(seed, a, b) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A 32-bit integer mix (Wellons' lowbias32: xor-shift / multiply, a bijection with good
/// avalanche): two 32-bit multiplies, cheap on a GPU where 64-bit ones are emulated.
#[inline]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The RetroMAE decoder mask's per-row key: (seed, example b, row i) mixed to 32 bits once per
/// row, so each (row, key) draw is one more [`mix32`] ([`vis_unit`]).
#[inline]
pub fn vis_row_key(seed: u64, b: u32, i: u32) -> u32 {
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(b.wrapping_mul(0x9E37_79B9) ^ i)))
}

/// Uniform in [0, 1) for (row key, word): the draw that hides `word` from the row when < p.
#[inline]
pub fn vis_unit(row_key: u32, word: u32) -> f32 {
    (mix32(row_key ^ word.wrapping_mul(0x85EB_CA6B)) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Attention dropout's per-row key: (seed, stream, score row r = (b·H + h)·Lq + i) mixed to 32
/// bits once per row (a bijection of r below 2^32 for each seed and stream, so no two rows share
/// a key), so each (row, key) draw is one more [`mix32`] ([`drop_unit`]).
#[inline]
pub fn drop_row_key(seed: u64, stream: u64, row: u64) -> u32 {
    let s = mix32(
        seed as u32
            ^ mix32((seed >> 32) as u32 ^ mix32(stream as u32 ^ mix32((stream >> 32) as u32))),
    );
    mix32(s ^ mix32(row as u32 ^ mix32((row >> 32) as u32 ^ s)))
}

/// Uniform in [0, 1) for (row key, key j): attention dropout keeps p_ij when this is >= p.
#[inline]
pub fn drop_unit(row_key: u32, j: u32) -> f32 {
    (mix32(row_key ^ j.wrapping_mul(0xC2B2_AE35)) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Inverted dropout: element i is kept when hash_unit(seed, stream, i) >= p, and scaled by 1/(1-p).
/// Backward uses the same function, so no mask is stored.
pub fn dropout_fwd(x: &[f32], y: &mut [f32], p: f32, seed: u64, stream: u64) {
    let scale = 1.0 / (1.0 - p);
    for (i, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        *o = if hash_unit(seed, stream, i as u64) >= p {
            v * scale
        } else {
            0.0
        };
    }
}

/// Dropout backward: the same keep mask applied to the gradient.
pub fn dropout_bwd(dy: &[f32], dx: &mut [f32], p: f32, seed: u64, stream: u64) {
    dropout_fwd(dy, dx, p, seed, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Reference values of erf (Abramowitz & Stegun table 7.1 / high-precision tables).
        let cases = [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (4.5, 0.999_999_999_803_383),
            (-1.0, -0.842_700_792_949_714_9),
        ];
        for (x, want) in cases {
            let got = erf(x);
            assert!((got - want).abs() < 2e-7, "erf({x}) = {got}, want {want}");
            let got32 = erf_f32(x as f32) as f64;
            assert!(
                (got32 - want).abs() < 5e-7,
                "erf_f32({x}) = {got32}, want {want}"
            );
        }
        // Over a fine grid the f32 form stays within 3e-7 of the f64 one.
        let worst = (-6000..=6000)
            .map(|i| i as f64 / 1000.0)
            .map(|x| (erf_f32(x as f32) as f64 - erf((x as f32) as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 3e-7, "erf_f32 differs from erf by {worst}");
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_scales() {
        let x = vec![1.0f32; 100_000];
        let mut y = vec![0.0; x.len()];
        dropout_fwd(&x, &mut y, 0.1, 42, 7);
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept fraction {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    }
}
