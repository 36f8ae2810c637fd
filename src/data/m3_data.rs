//! M3 fine-tuning data (SPEC §4.1-4.2): FlagEmbedding's training JSONL as is, validated with file
//! and line in every error, and the per-query passage sampling (one positive, G−1 negatives with
//! the repeat rule for short lists, sorted by teacher score when scores exist).

use super::jsonl::read_jsonl;
use super::rng::Rng;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// One training line.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TrainExample {
    pub query: String,
    pub pos: Vec<String>,
    #[serde(default)]
    pub neg: Vec<String>,
    #[serde(default)]
    pub pos_scores: Option<Vec<f32>>,
    #[serde(default)]
    pub neg_scores: Option<Vec<f32>>,
    /// Per-sample query instruction (prepended with the format "{}{}").
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// Read and validate a training file: `pos` and `neg` non-empty, score lists aligned, no empty
/// query, finite scores.
pub fn read_train_file(path: &Path) -> Result<Vec<TrainExample>> {
    let rows: Vec<TrainExample> = read_jsonl(path)?;
    for (i, r) in rows.iter().enumerate() {
        let bad = |msg: String| Error::Input {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        if r.query.trim().is_empty() {
            return Err(bad("field query: empty text".into()));
        }
        if r.pos.is_empty() {
            return Err(bad("field pos: needs at least one positive".into()));
        }
        if r.neg.is_empty() {
            return Err(bad(
                "field neg: needs at least one negative (FlagEmbedding divides by len(neg))".into(),
            ));
        }
        for (field, scores, n) in [
            ("pos_scores", &r.pos_scores, r.pos.len()),
            ("neg_scores", &r.neg_scores, r.neg.len()),
        ] {
            if let Some(s) = scores {
                if s.len() != n {
                    return Err(bad(format!(
                        "field {field}: {} scores for {n} texts",
                        s.len()
                    )));
                }
                if s.iter().any(|x| !x.is_finite()) {
                    return Err(bad(format!("field {field}: non-finite score")));
                }
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            line: 0,
            msg: "no training example".into(),
        });
    }
    Ok(rows)
}

/// One sampled group: the query and its G passages (positive first).
#[derive(Clone, Debug, PartialEq)]
pub struct SampledGroup {
    pub query: String,
    pub passages: Vec<String>,
    /// Teacher scores aligned with `passages` (both score lists present).
    pub teacher: Option<Vec<f32>>,
}

/// SPEC §4.2: a uniform positive; G−1 distinct negatives, or with repetition from the list
/// repeated ceil((G−1)/n) times when there are fewer; negatives re-sorted by teacher score
/// (descending) when scores exist (the research code's order, decision §10.5).
pub fn sample_group(ex: &TrainExample, group: usize, rng: &mut Rng) -> SampledGroup {
    let pi = rng.below(ex.pos.len());
    let want = group.saturating_sub(1);
    let n = ex.neg.len();
    let mut pool: Vec<usize> = if n >= want {
        (0..n).collect()
    } else {
        (0..want.div_ceil(n)).flat_map(|_| 0..n).collect()
    };
    // Sample `want` without replacement: a partial Fisher-Yates.
    for i in 0..want.min(pool.len()) {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    let mut negs: Vec<usize> = pool[..want.min(pool.len())].to_vec();
    let teacher_all = match (&ex.pos_scores, &ex.neg_scores) {
        (Some(p), Some(ns)) => Some((p[pi], ns)),
        _ => None,
    };
    if let Some((_, ns)) = teacher_all {
        negs.sort_by(|&a, &b| ns[b].total_cmp(&ns[a]));
    }
    let query = match &ex.prompt {
        Some(p) => format!("{p}{}", ex.query),
        None => ex.query.clone(),
    };
    let mut passages = vec![ex.pos[pi].clone()];
    passages.extend(negs.iter().map(|&i| ex.neg[i].clone()));
    let teacher = teacher_all.map(|(p, ns)| {
        std::iter::once(p)
            .chain(negs.iter().map(|&i| ns[i]))
            .collect()
    });
    SampledGroup {
        query,
        passages,
        teacher,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n_neg: usize, scores: bool) -> TrainExample {
        TrainExample {
            query: "q".into(),
            pos: vec!["p0".into(), "p1".into()],
            neg: (0..n_neg).map(|i| format!("n{i}")).collect(),
            pos_scores: scores.then(|| vec![0.9, 0.8]),
            neg_scores: scores.then(|| (0..n_neg).map(|i| i as f32 / 10.0).collect()),
            prompt: None,
            kind: None,
        }
    }

    #[test]
    fn distinct_negatives_when_enough_and_repeats_when_short() {
        let mut rng = Rng::new(1, 0);
        for _ in 0..50 {
            let g = sample_group(&ex(10, false), 8, &mut rng);
            assert_eq!(g.passages.len(), 8);
            assert!(g.passages[0].starts_with('p'));
            let mut n: Vec<&String> = g.passages[1..].iter().collect();
            n.sort();
            n.dedup();
            assert_eq!(n.len(), 7, "distinct negatives");
            let g = sample_group(&ex(3, false), 8, &mut rng);
            assert_eq!(g.passages.len(), 8);
            // 3 negatives repeated ceil(7/3) = 3 times: each appears at most 3 times.
            for k in 0..3 {
                let c = g.passages.iter().filter(|p| **p == format!("n{k}")).count();
                assert!(c <= 3);
            }
        }
    }

    #[test]
    fn negatives_sorted_by_teacher_score() {
        let mut rng = Rng::new(2, 0);
        let g = sample_group(&ex(10, true), 5, &mut rng);
        let t = g.teacher.unwrap();
        assert_eq!(t.len(), 5);
        assert!(t[1..].windows(2).all(|w| w[0] >= w[1]), "{t:?}");
    }
}
