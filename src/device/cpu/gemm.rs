//! Matrix products. `sgemm` is the fast path (the `gemm` crate: cache-blocked SIMD micro-kernels
//! with runtime dispatch up to AVX-512, threads from rayon's pool); `sgemm_reference` is the
//! readable triple loop the tests compare it with.
//!
//! Threads: `MATMUL_NUM_THREADS` when set (the variable the benchmark scripts pin), else rayon's
//! pool size (`RAYON_NUM_THREADS`, default the core count); products under 2^20 multiply-adds, and
//! products called from inside a rayon task, run on the calling thread.

/// The strided product every entry point lands in: C = alpha · A B + beta · C, A m×k with
/// strides (rsa, csa), B k×n with (rsb, csb), C m×n with (rsc, csc), in elements.
///
/// # Safety
/// Every addressed element lies inside its allocation; C does not overlap A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    (rsa, csa): (isize, isize),
    b: *const f32,
    (rsb, csb): (isize, isize),
    beta: f32,
    c: *mut f32,
    (rsc, csc): (isize, isize),
) {
    // Inside a rayon task (attention runs one task per sequence) the pool is busy already.
    let par = match threads() {
        t if t > 1 && m * n * k >= 1 << 20 && rayon::current_thread_index().is_none() => {
            gemm::Parallelism::Rayon(t)
        }
        _ => gemm::Parallelism::None,
    };
    // The gemm crate computes dst = alpha·dst + beta·lhs·rhs (reading dst only when asked), so
    // its (alpha, beta) are our (beta, alpha); beta = 0 ignores C's contents, NaN included.
    // SAFETY: per the function contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            csc,
            rsc,
            beta != 0.0,
            a,
            csa,
            rsa,
            b,
            csb,
            rsb,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// Threads for a large product (read once).
fn threads() -> usize {
    static T: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MATMUL_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or_else(rayon::current_num_threads)
    })
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// C\[m,n\] = alpha * op(A)\[m,k\] * op(B)\[k,n\] + beta * C, all row-major and contiguous.
/// `op(A)` is A (\[m,k\]) or Aᵀ (A stored as \[k,m\]); likewise for B.
pub fn sgemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    assert_eq!(a.len(), m * k, "sgemm: A has the wrong length");
    assert_eq!(b.len(), k * n, "sgemm: B has the wrong length");
    assert_eq!(c.len(), m * n, "sgemm: C has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // beta = 0 ignores C (NaN included), as below.
        c.iter_mut()
            .for_each(|x| *x = if beta == 0.0 { 0.0 } else { *x * beta });
        return;
    }
    // Row-major strides (in elements) of op(A) and op(B).
    let (rsa, csa) = match ta {
        Trans::N => (k as isize, 1),
        Trans::T => (1, m as isize),
    };
    let (rsb, csb) = match tb {
        Trans::N => (n as isize, 1),
        Trans::T => (1, k as isize),
    };
    // SAFETY: the pointers cover exactly m*k, k*n and m*n elements (asserted above) and the
    // strides address only elements inside them; C does not alias A or B (distinct borrows).
    unsafe {
        raw_sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            (rsa, csa),
            b.as_ptr(),
            (rsb, csb),
            beta,
            c.as_mut_ptr(),
            (n as isize, 1),
        );
    }
}

/// C = alpha · A B + beta · C on strided views: `[row stride, col stride]` in elements for each
/// operand (A is m×k, B is k×n, C is m×n). Used for per-head blocks inside [B, L, H*D] buffers.
/// Panics if a view reaches past its slice (a bug in the caller, not a user error).
pub fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: [usize; 2],
    b: &[f32],
    sb: [usize; 2],
    beta: f32,
    c: &mut [f32],
    sc: [usize; 2],
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |r: usize, cc: usize, s: [usize; 2]| (r.max(1) - 1) * s[0] + (cc.max(1) - 1) * s[1];
    assert!(
        k == 0 || last(m, k, sa) < a.len(),
        "sgemm_strided: A view out of bounds"
    );
    assert!(
        k == 0 || last(k, n, sb) < b.len(),
        "sgemm_strided: B view out of bounds"
    );
    assert!(
        last(m, n, sc) < c.len(),
        "sgemm_strided: C view out of bounds"
    );
    // SAFETY: the asserts above keep every addressed element inside its slice; C is a distinct
    // mutable borrow, so it does not alias A or B.
    unsafe {
        raw_sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            (sa[0] as isize, sa[1] as isize),
            b.as_ptr(),
            (sb[0] as isize, sb[1] as isize),
            beta,
            c.as_mut_ptr(),
            (sc[0] as isize, sc[1] as isize),
        );
    }
}

/// The readable reference of [`sgemm`], with f64 accumulation.
pub fn sgemm_reference(
    ta: Trans,
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                let av = match ta {
                    Trans::N => a[i * k + p],
                    Trans::T => a[p * m + i],
                };
                let bv = match tb {
                    Trans::N => b[p * n + j],
                    Trans::T => b[j * k + p],
                };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] = alpha * acc as f32 + beta * c[i * n + j];
        }
    }
}

/// Linear layer forward: y\[n,out\] = x\[n,in\] · W\[out,in\]ᵀ + b\[out\] (PyTorch's weight layout).
pub fn linear_fwd(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    if dout == 0 {
        return;
    }
    match b {
        Some(b) => {
            for row in y.chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
            sgemm(Trans::N, Trans::T, n, din, dout, 1.0, x, w, 1.0, y);
        }
        None => sgemm(Trans::N, Trans::T, n, din, dout, 1.0, x, w, 0.0, y),
    }
}

/// Linear layer backward: dx = dy · W (assigned), dW += dyᵀ · x, db += Σ_rows dy.
pub fn linear_bwd(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    n: usize,
    din: usize,
    dout: usize,
) {
    if let Some(dx) = dx {
        sgemm(Trans::N, Trans::N, n, dout, din, 1.0, dy, w, 0.0, dx);
    }
    if let Some(dw) = dw {
        sgemm(Trans::T, Trans::N, dout, n, din, 1.0, dy, x, 1.0, dw);
    }
    if let Some(db) = db.filter(|_| dout > 0) {
        let mut acc = vec![0.0f64; dout];
        for row in dy.chunks_exact(dout) {
            for (a, &g) in acc.iter_mut().zip(row) {
                *a += g as f64;
            }
        }
        for (d, a) in db.iter_mut().zip(acc) {
            *d += a as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn sgemm_matches_reference_for_all_transposes() {
        let (m, k, n) = (7, 13, 5);
        for ta in [Trans::N, Trans::T] {
            for tb in [Trans::N, Trans::T] {
                let a = rand(m * k, 1);
                let b = rand(k * n, 2);
                let mut c1 = rand(m * n, 3);
                let mut c2 = c1.clone();
                sgemm(ta, tb, m, k, n, 0.5, &a, &b, 0.25, &mut c1);
                sgemm_reference(ta, tb, m, k, n, 0.5, &a, &b, 0.25, &mut c2);
                for (x, y) in c1.iter().zip(&c2) {
                    assert!((x - y).abs() < 1e-5, "{ta:?}{tb:?}: {x} vs {y}");
                }
            }
        }
    }
}
