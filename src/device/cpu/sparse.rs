//! Lexical (sparse) weights: per-text max by token id, and the lexical match score.
//!
//! Never builds a [L, V] or [B, V] matrix: each text becomes a list of (token id, weight, position)
//! sorted by id, and scores are sorted-list merge joins.

/// One entry of a text's lexical weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LexEntry {
    /// Vocabulary id.
    pub id: u32,
    /// The max term weight over the positions holding `id`.
    pub weight: f32,
    /// The position the max came from (first on ties): the backward sends the gradient there.
    pub pos: u32,
}

/// Max term weight per token id for one text: `weights[l]` belongs to `ids[l]`. Ids in `drop` and
/// weights <= 0 are left out. The result is sorted by id.
pub fn max_by_token_id(weights: &[f32], ids: &[u32], drop: &[u32]) -> Vec<LexEntry> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&l| (ids[l], l));
    let mut out: Vec<LexEntry> = Vec::new();
    for l in order {
        let (id, w) = (ids[l], weights[l]);
        if drop.contains(&id) || w.is_nan() || w <= 0.0 {
            continue;
        }
        match out.last_mut() {
            Some(e) if e.id == id => {
                if w > e.weight {
                    e.weight = w;
                    e.pos = l as u32;
                }
            }
            _ => out.push(LexEntry {
                id,
                weight: w,
                pos: l as u32,
            }),
        }
    }
    out
}

/// Σ over shared ids of w_q · w_p (both lists sorted by id), accumulated in f64.
pub fn lexical_score(q: &[LexEntry], p: &[LexEntry]) -> f32 {
    let mut acc = 0.0f64;
    merge_join(q, p, |a, b| acc += a.weight as f64 * b.weight as f64);
    acc as f32
}

/// Backward of [`lexical_score`] with upstream gradient `g`: dq[pos] += g w_p, dp[pos] += g w_q,
/// where dq / dp are the per-position gradients of the two texts' term weights.
pub fn lexical_score_bwd(q: &[LexEntry], p: &[LexEntry], g: f32, dq: &mut [f32], dp: &mut [f32]) {
    merge_join(q, p, |a, b| {
        dq[a.pos as usize] += g * b.weight;
        dp[b.pos as usize] += g * a.weight;
    });
}

fn merge_join(q: &[LexEntry], p: &[LexEntry], mut f: impl FnMut(&LexEntry, &LexEntry)) {
    let (mut i, mut j) = (0, 0);
    while i < q.len() && j < p.len() {
        match q[i].id.cmp(&p[j].id) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                f(&q[i], &p[j]);
                i += 1;
                j += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_by_id_drops_specials_and_nonpositive() {
        let ids = [0, 5, 7, 5, 2, 9, 1];
        let w = [0.9, 0.2, -0.1, 0.4, 0.8, 0.0, 0.5];
        let e = max_by_token_id(&w, &ids, &[0, 1, 2, 3]);
        assert_eq!(
            e,
            vec![LexEntry {
                id: 5,
                weight: 0.4,
                pos: 3
            }]
        );
    }

    #[test]
    fn lexical_score_is_sum_over_shared_ids() {
        let q = max_by_token_id(&[0.5, 0.25, 2.0], &[4, 6, 8], &[]);
        let p = max_by_token_id(&[3.0, 1.0, 7.0], &[6, 8, 10], &[]);
        assert_eq!(lexical_score(&q, &p), 0.25 * 3.0 + 2.0 * 1.0);
        let (mut dq, mut dp) = (vec![0.0; 3], vec![0.0; 3]);
        lexical_score_bwd(&q, &p, 2.0, &mut dq, &mut dp);
        assert_eq!(dq, vec![0.0, 6.0, 2.0]);
        assert_eq!(dp, vec![0.5, 4.0, 0.0]);
    }
}
