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
/// weights <= 0 are left out. The result is sorted by id. A NaN weight is kept and wins its id's
/// max (as PyTorch's amax propagates it), so a broken model's output fails the callers' finite
/// checks instead of vanishing from the list.
pub fn max_by_token_id(weights: &[f32], ids: &[u32], drop: &[u32]) -> Vec<LexEntry> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&l| (ids[l], l));
    let mut out: Vec<LexEntry> = Vec::new();
    for l in order {
        let (id, w) = (ids[l], weights[l]);
        if drop.contains(&id) || w <= 0.0 {
            continue;
        }
        match out.last_mut() {
            Some(e) if e.id == id => {
                if w > e.weight || (w.is_nan() && !e.weight.is_nan()) {
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

/// Backward of [`lexical_score`] with upstream gradient `g`: dq\[pos\] += g w_p, dp\[pos\] += g w_q,
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

/// Term weights of the sparse head (SPEC §3.1): w\[r\] = ReLU(h\[r\] · ws + b) for the rows of
/// h [rows, hidden], the dot product in f64 (the reference of kernels/sparse.cu sparse_fwd).
pub fn term_weights_fwd(h: &[f32], ws: &[f32], b: f32, w: &mut [f32]) {
    let hidden = ws.len();
    for (r, out) in w.iter_mut().enumerate() {
        let row = &h[r * hidden..(r + 1) * hidden];
        let s: f64 = row.iter().zip(ws).map(|(&a, &c)| a as f64 * c as f64).sum();
        *out = super::elementwise::relu((s + b as f64) as f32);
    }
}

/// Backward of [`term_weights_fwd`] given the forward's weights `w` (the ReLU gate is w > 0):
/// dh [rows, hidden] assigned, dws \[hidden\] and db accumulated (`+=`, summed in f64).
pub fn term_weights_bwd(
    h: &[f32],
    ws: &[f32],
    w: &[f32],
    dw: &[f32],
    dh: &mut [f32],
    dws: &mut [f32],
    db: &mut f32,
) {
    let hidden = ws.len();
    let mut acc = vec![0.0f64; hidden];
    let mut bsum = 0.0f64;
    for (r, (&wr, &g)) in w.iter().zip(dw).enumerate() {
        let g = if wr > 0.0 { g } else { 0.0 };
        let (row, drow) = (
            &h[r * hidden..(r + 1) * hidden],
            &mut dh[r * hidden..(r + 1) * hidden],
        );
        for ((d, &c), (a, &x)) in drow.iter_mut().zip(ws).zip(acc.iter_mut().zip(row)) {
            *d = g * c;
            *a += g as f64 * x as f64;
        }
        bsum += g as f64;
    }
    for (d, a) in dws.iter_mut().zip(acc) {
        *d = (*d as f64 + a) as f32;
    }
    *db = (*db as f64 + bsum) as f32;
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
    fn nan_weights_survive_the_relu_and_the_max() {
        // A broken model's NaN must reach the callers' finite checks (f32::max and fmaxf drop
        // it: encode wrote `{}` and score 0 for a sparse head that overflowed).
        let mut w = [0.0f32; 4];
        term_weights_fwd(
            &[
                1.0,
                f32::NAN,
                2.0,
                1.0,
                -1.0,
                0.0,
                f32::INFINITY,
                -f32::INFINITY,
            ],
            &[1.0, 1.0],
            0.0,
            &mut w,
        );
        assert!(w[0].is_nan() && w[1] == 3.0 && w[2] == 0.0 && w[3].is_nan());
        let e = max_by_token_id(&[0.5, f32::NAN, 0.7, 0.2], &[4, 4, 4, 6], &[]);
        assert_eq!(e.len(), 2);
        assert!(e[0].weight.is_nan() && e[0].pos == 1 && e[1].weight == 0.2);
        let mut y = [0.0f32; 3];
        crate::device::cpu::elementwise::relu_fwd(&[f32::NAN, -1.0, 2.0], &mut y);
        assert!(y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0);
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
