//! CPU twin of kernels/topk.cu: the k largest entries of each row of a score matrix, sorted by
//! score descending, ties by column ascending (NaN above every number, ties among NaNs by column).

/// The ranking key of a score, compared by `f32::total_cmp`: the number itself, and every NaN
/// (either sign, any payload) the positive quiet NaN, one value above `+inf`. The kernel, the
/// host heap ([`crate::retrieval::TopK`]) and the hybrid ranking all rank by it.
#[inline]
pub fn rank_key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NAN
    } else {
        x
    }
}

/// Per row of `scores` ([rows, n]): `k` (column, score) pairs; `k` is capped at `n`.
pub fn topk_rows(scores: &[f32], n: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    let k = k.min(n);
    scores
        .chunks(n.max(1))
        .map(|row| {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            idx.sort_by(|&a, &b| {
                let (x, y) = (row[a as usize], row[b as usize]);
                rank_key(y).total_cmp(&rank_key(x)).then(a.cmp(&b))
            });
            idx.truncate(k);
            idx.into_iter().map(|i| (i, row[i as usize])).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keep_the_lowest_columns_and_nan_ranks_first() {
        let s = [1.0, 3.0, -0.0, 3.0, 0.0];
        let r = topk_rows(&s, 5, 4);
        // +0 above -0, as the kernel's keys.
        assert_eq!(r[0], vec![(1, 3.0), (3, 3.0), (0, 1.0), (4, 0.0)]);
        // NaN of either sign above +inf, NaNs among themselves by column.
        let s = [f32::INFINITY, -f32::NAN, 2.0, f32::NAN];
        let r = topk_rows(&s, 4, 3);
        assert_eq!(r[0].iter().map(|p| p.0).collect::<Vec<_>>(), [1, 3, 0]);
        assert!(r[0][0].1.is_nan() && r[0][1].1.is_nan());
    }
}
