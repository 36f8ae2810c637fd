//! Learning-rate schedules.

/// transformers' `get_linear_schedule_with_warmup` multiplier for the update made after `step`
/// completed updates (0-based): `step / warmup` during warm-up (so the very first update uses lr 0
/// when warm-up is on, as in the reference trainers), then linear decay to 0 at `total`.
pub fn linear_warmup_decay(step: u64, total: u64, warmup: u64) -> f32 {
    if step < warmup {
        return step as f32 / warmup.max(1) as f32;
    }
    let rest = total.saturating_sub(warmup).max(1);
    (total.saturating_sub(step) as f32 / rest as f32).max(0.0)
}

/// Warm-up steps for a ratio of the total (HF: ceil(ratio · total)).
pub fn warmup_steps(total: u64, ratio: f64) -> u64 {
    (ratio * total as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_linear_schedule() {
        // total 10, warmup 2: 0, 0.5, 1.0, 7/8, 6/8, ..., 1/8, 0
        let got: Vec<f32> = (0..=10).map(|s| linear_warmup_decay(s, 10, 2)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
        assert_eq!(warmup_steps(100, 0.1), 10);
        assert_eq!(linear_warmup_decay(0, 5, 0), 1.0);
    }
}
