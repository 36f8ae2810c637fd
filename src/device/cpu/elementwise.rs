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

/// e^x in f32 arithmetic without a libm call and without branches, so that loops over slices
/// vectorise: x = n ln2 + r (Cody-Waite split of ln2, |r| <= ln2/2), e^r by its Taylor series
/// through r^7 (truncation below 6e-9 relative), 2^n as two exponent-field factors so that it
/// overflows to +inf above ~88.72 and underflows through the subnormals to 0 as libm does.
/// Within 2 ulp of e^x (test); NaN stays NaN, e^-inf = 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // 355/512: few enough bits that n · LN2_HI is exact for every n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer (|v| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    // Past these bounds e^x is +inf or below half the smallest subnormal either way.
    let xc = x.clamp(-110.0, 89.0);
    let nf = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n in [-159, 128]: both halves keep a normal exponent field (47..=191).
    let n = nf as i32;
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    p * s1 * s2
}

/// [`erf`] in f32 arithmetic (the polynomial in f32, [`exp_f32`]): within 3e-7 of the f64 form,
/// and branch-free, so GELU's loops vectorise.
#[inline(always)]
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
    let erfc = t * exp_f32(poly);
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
        .for_each(|(y, x)| gelu_fwd_span(x, y));
}

/// GELU backward: dx = dy * (Φ(x) + x φ(x)).
pub fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    use rayon::prelude::*;
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((dx, x), dy)| gelu_bwd_span(x, dy, dx));
}

crate::multiversion! {
    /// One task of [`gelu_fwd`].
    pub fn gelu_fwd_span / gelu_fwd_span_at(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

crate::multiversion! {
    /// One task of [`gelu_bwd`].
    pub fn gelu_bwd_span / gelu_bwd_span_at(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let inv_sqrt_2pi = (1.0 / (2.0 * std::f64::consts::PI).sqrt()) as f32;
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = inv_sqrt_2pi * exp_f32(-0.5 * v * v);
            *d = g * (cdf + v * pdf);
        }
    }
}

/// ReLU forward. NaN stays NaN, as in PyTorch (`f32::max` would turn it into 0 and hide a
/// broken model behind plausible zeros).
pub fn relu_fwd(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = relu(v);
    }
}

/// ReLU of one value: 0 for v <= 0, v otherwise (NaN included).
#[inline]
pub fn relu(v: f32) -> f32 {
    if v <= 0.0 {
        0.0
    } else {
        v
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
/// row and forced odd, so each (row, word) draw is one 32-bit product ([`vis_u32`]).
#[inline]
pub fn vis_row_key(seed: u64, b: u32, i: u32) -> u32 {
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(b.wrapping_mul(0x9E37_79B9) ^ i))) | 1
}

/// The decoder mask's per-word key: the word index mixed to 32 bits and forced odd (computed once
/// per key, not per score).
#[inline]
pub fn vis_word_key(word: u32) -> u32 {
    mix32(word ^ 0x85EB_CA6B) | 1
}

/// The 64-bit product of two 32-bit keys folded to 32 bits (its low half xor its high half, as
/// wyhash's `mum`): attention dropout's per-score draw ([`drop_unit`]). One wide multiply and one
/// xor, where a [`mix32`] per score cost ten integer instructions on a GPU.
#[inline]
pub fn mum32(a: u32, b: u32) -> u32 {
    let p = u64::from(a) * u64::from(b);
    p as u32 ^ (p >> 32) as u32
}

/// The decoder mask's 32 random bits for (row key, word key): their product modulo 2^32 (both
/// odd, so for a fixed row key it permutes the odd word keys, and the reverse; the draw takes its
/// top 24 bits). One multiply per score on a GPU: the folded 64-bit product ([`mum32`], which
/// attention dropout keeps) spent one more instruction per score on its xor, an eighth of the
/// two-stream attention's per-score work (docs/perf.md), and its draws were no more independent
/// by the tests here (rows, words, examples, seeds, 2 x 2 squares).
#[inline]
pub fn vis_u32(row_key: u32, word_key: u32) -> u32 {
    row_key.wrapping_mul(word_key)
}

/// Uniform in [0, 1) for (row key, word): the draw that hides `word` from the row when < p.
#[inline]
pub fn vis_unit(row_key: u32, word: u32) -> f32 {
    (vis_u32(row_key, vis_word_key(word)) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Attention dropout's per-row key: (seed, stream, score row r = (b·H + h)·Lq + i) mixed to 32
/// bits once per row (a bijection of r below 2^32 for each seed and stream, so no two rows share
/// a key); each (row, key) draw is then one product with the key's [`drop_key`] ([`drop_unit`]).
#[inline]
pub fn drop_row_key(seed: u64, stream: u64, row: u64) -> u32 {
    let s = mix32(
        seed as u32
            ^ mix32((seed >> 32) as u32 ^ mix32(stream as u32 ^ mix32((stream >> 32) as u32))),
    );
    mix32(s ^ mix32(row as u32 ^ mix32((row >> 32) as u32 ^ s)))
}

/// Attention dropout's per-key key: the key index j mixed to 32 bits and forced odd (once per key,
/// shared by every row that draws for it).
#[inline]
pub fn drop_key(j: u32) -> u32 {
    mix32(j ^ 0xC2B2_AE35) | 1
}

/// Uniform in [0, 1) for (row key, key j): attention dropout keeps p_ij when this is >= p. The
/// draw is [`mum32`] of the row key and [`drop_key`]`(j)`, xor the key's key (one three-input xor
/// on a GPU; the row key may be 0, and the xor keeps that row's draws apart).
#[inline]
pub fn drop_unit(row_key: u32, j: u32) -> f32 {
    let k = drop_key(j);
    ((mum32(row_key, k) ^ k) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Inverted dropout: element i is kept when hash_unit(seed, stream, i) >= p, and scaled by 1/(1-p).
/// Backward uses the same function, so no mask is stored.
pub fn dropout_fwd(x: &[f32], y: &mut [f32], p: f32, seed: u64, stream: u64) {
    dropout_texts_fwd(x, y, p, &[seed], stream)
}

/// [`dropout_fwd`] of a batch of independent texts: `x` is `seeds.len()` equal blocks (one per
/// text, its rows padded to the batch's length) and block b draws from `seeds[b]` with indices
/// counted from the block's start, so a text's real rows get the mask it gets when it is
/// dropped out alone (M3's per-text seeds, `M3Student::encode_heads`).
pub fn dropout_texts_fwd(x: &[f32], y: &mut [f32], p: f32, seeds: &[u64], stream: u64) {
    use rayon::prelude::*;
    assert_eq!(x.len(), y.len(), "dropout_texts_fwd: lengths");
    if seeds.is_empty() || x.is_empty() {
        return;
    }
    assert_eq!(x.len() % seeds.len(), 0, "dropout_texts_fwd: blocks");
    let block = x.len() / seeds.len();
    // Tasks of about CHUNK elements that never straddle two texts.
    let per = block.div_ceil(block.div_ceil(CHUNK));
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(seeds)
        .for_each(|((y, x), &seed)| {
            y.par_chunks_mut(per)
                .zip(x.par_chunks(per))
                .enumerate()
                .for_each(|(c, (y, x))| dropout_span(x, y, p, seed, stream, c * per));
        });
}

/// Elements `from..from + x.len()` of one dropout stream.
fn dropout_span(x: &[f32], y: &mut [f32], p: f32, seed: u64, stream: u64, from: usize) {
    let scale = 1.0 / (1.0 - p);
    for (i, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        *o = if hash_unit(seed, stream, (from + i) as u64) >= p {
            v * scale
        } else {
            0.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let ulp = |v: f32| {
            let b = v.abs().to_bits();
            (f32::from_bits(b + 1) - f32::from_bits(b)).max(f32::from_bits(1))
        };
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let err = (got - want).abs() / ulp(want as f32) as f64;
            assert!(
                err <= 2.0,
                "exp_f32({x}) = {got}, want {want} ({err:.2} ulp)"
            );
            worst = worst.max(err);
            x += 0.000_731;
        }
        assert!(worst > 0.4, "the sweep did not exercise rounding ({worst})");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.72).is_finite());
        // Through the subnormals as libm goes.
        assert!((exp_f32(-100.0) as f64 - (-100.0f64).exp()).abs() <= f32::from_bits(1) as f64);
    }

    #[test]
    fn gelu_gives_the_same_bits_at_every_vector_level() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0173).collect();
        let dy: Vec<f32> = x.iter().map(|v| 1.0 - v * 0.3).collect();
        crate::device::cpu::simd::assert_same_bits("gelu", |level| {
            let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            gelu_fwd_span_at(level, &x, &mut y);
            gelu_bwd_span_at(level, &x, &dy, &mut dx);
            [y, dx].concat()
        });
    }

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
