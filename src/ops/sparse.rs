//! Lexical (sparse) scores between sets of texts from per-token term weights, with the gradient
//! going to the argmax position of each token id (SPEC §4.4). Never builds [B, L, V].

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::sparse::{lexical_score, lexical_score_bwd, max_by_token_id, LexEntry};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Term weights wq [Bq, Lq] of texts with ids q_ids \[Bq*Lq\], wp [Bp, Lp] with p_ids: scores
/// [Bq, Bp], S[i, j] = Σ over token ids shared by the two texts of (max weight in i)·(max weight in j).
/// Ids in `drop` (cls, eos, pad, unk) never count.
pub fn lexical_scores(
    tape: &mut Tape,
    wq: &Var,
    q_ids: Arc<[u32]>,
    wp: &Var,
    p_ids: Arc<[u32]>,
    drop: Arc<[u32]>,
) -> Result<Var> {
    let (bq, lq) = wq.value().shape().dims2("lexical query weights")?;
    let (bp, lp) = wp.value().shape().dims2("lexical passage weights")?;
    if q_ids.len() != bq * lq || p_ids.len() != bp * lp {
        return Err(Error::shape(
            "lexical ids",
            &[bq * lq, bp * lp],
            &[q_ids.len(), p_ids.len()],
        ));
    }
    let entries = |w: &[f32], ids: &[u32], n: usize, l: usize| -> Vec<Vec<LexEntry>> {
        (0..n)
            .map(|i| max_by_token_id(&w[i * l..(i + 1) * l], &ids[i * l..(i + 1) * l], &drop))
            .collect()
    };
    let eq = entries(wq.value().f32s()?, &q_ids, bq, lq);
    let ep = entries(wp.value().f32s()?, &p_ids, bp, lp);
    let mut s = vec![0.0; bq * bp];
    for i in 0..bq {
        for j in 0..bp {
            s[i * bp + j] = lexical_score(&eq[i], &ep[j]);
        }
    }
    let out = tensor(s, &[bq, bp])?;
    Ok(tape.record("lexical_scores", &[wq, wp], out, move |ds| {
        let ds = ds.f32s()?;
        let (mut dq, mut dp) = (vec![0.0; bq * lq], vec![0.0; bp * lp]);
        for i in 0..bq {
            for j in 0..bp {
                let g = ds[i * bp + j];
                if g != 0.0 {
                    let (a, b) = (&mut dq[i * lq..(i + 1) * lq], &mut dp[j * lp..(j + 1) * lp]);
                    lexical_score_bwd(&eq[i], &ep[j], g, a, b);
                }
            }
        }
        Ok(vec![
            Some(tensor(dq, &[bq, lq])?),
            Some(tensor(dp, &[bp, lp])?),
        ])
    }))
}
