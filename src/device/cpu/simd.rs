//! Run-time choice of the vector width for the CPU kernels' hot loops.
//!
//! The release build targets baseline x86-64 (SSE2), so one binary runs on every x86-64 machine.
//! The loops that dominate a CPU training step after the GEMMs (GELU, the attention softmax,
//! probability recompute, dropout and score-gradient rows, LayerNorm, AdamW) are compiled three
//! times by [`multiversion!`](crate::multiversion) — for AVX-512, for AVX2 + FMA and for the
//! baseline — and the widest version this CPU supports runs. All versions execute the same IEEE
//! operations in the same order (Rust never fuses a multiply and an add, and never reorders a
//! float reduction), so they give bit-identical results: a run's numbers do not depend on the
//! machine's vector unit (each module using it tests that with `assert_same_bits`, which compares
//! the levels this CPU has). `RETROM3_SIMD=baseline|avx2|avx512` caps the level (read once), e.g.
//! to compare speeds.

use std::sync::OnceLock;

/// A vector instruction level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// SSE2 (x86-64's baseline) or a non-x86 target.
    Baseline,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4).
    Avx512,
}

/// The widest level this CPU supports, capped by `RETROM3_SIMD` when set.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        let cap = match std::env::var("RETROM3_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            Ok("avx512") | Err(_) => Level::Avx512,
            Ok(other) => {
                eprintln!(
                    "retrom3: RETROM3_SIMD={other:?} is not baseline, avx2 or avx512; ignored"
                );
                Level::Avx512
            }
        };
        detected().min(cap)
    })
}

/// What the CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // Every feature the versions enable (rustc's avx512f implies f16c), checked: a VM may
        // hide some of them.
        if !(has!("avx2") && has!("fma")) {
            return Level::Baseline;
        }
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("f16c")
        {
            Level::Avx512
        } else {
            Level::Avx2
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Baseline
}

/// Test helper: `run` gives the baseline's bits at every level (those above what this CPU has
/// run its widest).
#[cfg(test)]
pub(crate) fn assert_same_bits(what: &str, run: impl Fn(Level) -> Vec<f32>) {
    let bits = |l: Level| run(l).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let base = bits(Level::Baseline);
    for level in [Level::Avx2, Level::Avx512] {
        assert!(
            bits(level) == base,
            "{what}: {level:?} differs from the baseline (this CPU: {:?})",
            detected()
        );
    }
}

/// Define `fn name(args)` whose body is compiled for each [`Level`] and run at [`level()`], and
/// `fn name_at(level, args)` that runs a given level's version (capped at what the CPU has). The
/// body and every function it calls should be `#[inline(always)]` or generic, so that they are
/// compiled inside each version; closures handed to rayon run outside it, so the parallel split
/// belongs to the caller and the body is the sequential work of one task.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $name_at:ident ($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            $name_at($crate::device::cpu::simd::level(), $($arg),*)
        }

        /// The same at vector level `level` (capped at what this CPU supports).
        #[allow(dead_code, clippy::too_many_arguments)]
        $vis fn $name_at(level: $crate::device::cpu::simd::Level, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::device::cpu::simd::{detected, Level};
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                match level.min(detected()) {
                    // SAFETY: `detected` reports only features this CPU has.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Baseline => {}
                }
            }
            let _ = level;
            body($($arg),*)
        }
    };
}
