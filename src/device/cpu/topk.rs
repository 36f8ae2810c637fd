//! CPU twin of kernels/topk.cu: the k largest entries of each row of a score matrix, sorted by
//! score descending, ties by column ascending (NaN below every number).

/// Per row of `scores` ([rows, n]): `k` (column, score) pairs; `k` is capped at `n`.
pub fn topk_rows(scores: &[f32], n: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    let k = k.min(n);
    scores
        .chunks(n.max(1))
        .map(|row| {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
            idx.sort_by(|&a, &b| {
                let (x, y) = (row[a as usize], row[b as usize]);
                match (x.is_nan(), y.is_nan()) {
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ => key(y).total_cmp(&key(x)).then(a.cmp(&b)),
                }
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
    fn ties_keep_the_lowest_columns_and_nan_ranks_last() {
        let s = [1.0, 3.0, f32::NAN, 3.0, -0.0, 0.0];
        let r = topk_rows(&s, 6, 4);
        assert_eq!(r[0], vec![(1, 3.0), (3, 3.0), (0, 1.0), (5, 0.0)]); // +0 above -0, as the kernel's keys
        let r = topk_rows(&s, 6, 6);
        assert_eq!(r[0][5].0, 2);
    }
}
