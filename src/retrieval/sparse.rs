//! Inverted index over token ids with quantised impacts, and exact top-k by MaxScore.
//!
//! Every posting stores a document number (u32) and a 16-bit impact: `round(w / scale)` with one
//! `scale = max_weight / 65535` per index (at least 1, so no posting vanishes). Queries are
//! quantised the same way with 20 bits, so a document's score is an exact integer
//! `Σ_t q_t · impact_{t,d}` (u64): pruning bounds are exact, ties are exact, and the returned top-k
//! is exactly the brute-force top-k of that score (score desc, then document number asc). The
//! float score reported is `int · scale · query_scale`; against the float lexical score
//! (SPEC 3.3) the error is at most `max_doc_weight / 131070 · Σ w_q` plus the query rounding.
//!
//! MaxScore (Turtle & Flood 1995, document-at-a-time): query terms are sorted by their score upper
//! bound `q_t · max_impact_t`; the longest prefix whose bounds sum to at most the current k-th
//! score θ is "non-essential" — a document found only there cannot enter the top-k — so only the
//! essential lists drive the traversal and the others are probed (galloping) for candidates, in
//! decreasing bound order, until the remaining bounds cannot lift the document above θ. Documents
//! are visited in increasing number, so a later document enters only with a score strictly above
//! θ, which keeps ties resolved by document number exactly as brute force does.

use super::index_format::{Buf, Container, SectionData};
use super::Hit;
use crate::error::Result;
use std::collections::BinaryHeap;

/// Query weights are quantised to this many levels (20 bits).
const QUERY_LEVELS: f64 = ((1u32 << 20) - 1) as f64;
/// Document impacts are u16.
const DOC_LEVELS: f64 = u16::MAX as f64;

/// BM25 parameters (Pyserini's defaults).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Bm25Params { k1: 0.9, b: 0.4 }
    }
}

/// An impact-ordered inverted index (postings in document order) over token ids.
#[derive(Clone, Debug)]
pub struct ImpactIndex {
    n_docs: u32,
    /// Dequantisation factor of the document impacts.
    scale: f32,
    /// `[vocab + 1]` posting-list boundaries into `docs` / `impacts`.
    offsets: Buf<u64>,
    docs: Buf<u32>,
    impacts: Buf<u16>,
    /// `[vocab]` the largest impact of each list (0 for an empty list).
    max_impact: Buf<u16>,
}

/// A quantised query term.
#[derive(Clone, Copy, Debug)]
struct QTerm {
    term: u32,
    weight: u64,
    bound: u64,
}

impl ImpactIndex {
    /// Build from per-document weights `(token id, weight)` (weights <= 0 or non-finite are
    /// dropped). `vocab` bounds the token ids.
    pub fn build(docs: &[Vec<(u32, f32)>], vocab: usize) -> Result<ImpactIndex> {
        if docs.len() > u32::MAX as usize {
            return Err(crate::Error::invalid("more than 2^32 - 1 documents"));
        }
        let mut counts = vec![0u64; vocab + 1];
        let mut max_w = 0f32;
        for d in docs {
            for &(t, w) in d {
                if (t as usize) >= vocab {
                    return Err(crate::Error::invalid(format!(
                        "token id {t} outside the vocabulary ({vocab})"
                    )));
                }
                if w > 0.0 && w.is_finite() {
                    counts[t as usize + 1] += 1;
                    max_w = max_w.max(w);
                }
            }
        }
        for i in 0..vocab {
            counts[i + 1] += counts[i];
        }
        let total = counts[vocab] as usize;
        let scale = if max_w > 0.0 {
            (max_w as f64 / DOC_LEVELS) as f32
        } else {
            1.0
        };
        let mut fill: Vec<u64> = counts[..vocab].to_vec();
        let mut pdocs = vec![0u32; total];
        let mut imps = vec![0u16; total];
        let mut max_impact = vec![0u16; vocab];
        for (d, terms) in docs.iter().enumerate() {
            for &(t, w) in terms {
                if w > 0.0 && w.is_finite() {
                    let q = ((w as f64 / scale as f64).round()).clamp(1.0, DOC_LEVELS) as u16;
                    let p = fill[t as usize] as usize;
                    fill[t as usize] += 1;
                    pdocs[p] = d as u32;
                    imps[p] = q;
                    max_impact[t as usize] = max_impact[t as usize].max(q);
                }
            }
        }
        Ok(ImpactIndex {
            n_docs: docs.len() as u32,
            scale,
            offsets: counts.into(),
            docs: pdocs.into(),
            impacts: imps.into(),
            max_impact: max_impact.into(),
        })
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.n_docs as usize
    }

    /// Number of postings.
    pub fn n_postings(&self) -> usize {
        self.docs.len()
    }

    /// Vocabulary size (number of posting lists).
    pub fn vocab(&self) -> usize {
        self.max_impact.len()
    }

    fn list(&self, t: u32) -> (&[u32], &[u16]) {
        let (a, b) = (
            self.offsets[t as usize] as usize,
            self.offsets[t as usize + 1] as usize,
        );
        (&self.docs[a..b], &self.impacts[a..b])
    }

    /// Quantise a query: merge duplicate ids (sum), drop ids outside the vocabulary / empty lists.
    fn quantise(&self, query: &[(u32, f32)]) -> (Vec<QTerm>, f64) {
        let mut q: Vec<(u32, f32)> = query
            .iter()
            .copied()
            .filter(|&(t, w)| (t as usize) < self.vocab() && w > 0.0 && w.is_finite())
            .collect();
        q.sort_by_key(|x| x.0);
        q.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        let max_q = q.iter().map(|x| x.1).fold(0f32, f32::max) as f64;
        let qscale = if max_q > 0.0 {
            max_q / QUERY_LEVELS
        } else {
            1.0
        };
        let terms = q
            .into_iter()
            .filter(|&(t, _)| self.max_impact[t as usize] > 0)
            .map(|(t, w)| {
                let weight = (w as f64 / qscale).round().clamp(1.0, QUERY_LEVELS) as u64;
                QTerm {
                    term: t,
                    weight,
                    bound: weight * self.max_impact[t as usize] as u64,
                }
            })
            .collect();
        (terms, qscale)
    }

    fn to_score(&self, s: u64, qscale: f64) -> f32 {
        (s as f64 * self.scale as f64 * qscale) as f32
    }

    /// The exact top-k documents by the quantised score (MaxScore). Documents with no query
    /// term score 0 and are never returned, so fewer than k hits may come back.
    pub fn search(&self, query: &[(u32, f32)], k: usize) -> Vec<Hit> {
        let (mut terms, qscale) = self.quantise(query);
        if k == 0 || terms.is_empty() {
            return Vec::new();
        }
        terms.sort_by_key(|t| t.bound);
        let n = terms.len();
        // prefix[i] = Σ bound of terms[..i]
        let mut prefix = vec![0u64; n + 1];
        for i in 0..n {
            prefix[i + 1] = prefix[i] + terms[i].bound;
        }
        let lists: Vec<(&[u32], &[u16])> = terms.iter().map(|t| self.list(t.term)).collect();
        let mut pos = vec![0usize; n];
        // Min-heap of the current top-k by (score, Reverse(doc)) — its top is the worst entry.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u64, std::cmp::Reverse<u32>)>> =
            BinaryHeap::with_capacity(k + 1);
        let mut theta = 0u64; // meaningful only when the heap is full
        let mut first_essential = 0usize;
        loop {
            // Next document: the smallest current doc over the essential lists.
            let mut d = u32::MAX;
            let mut any = false;
            for i in first_essential..n {
                if let Some(&x) = lists[i].0.get(pos[i]) {
                    any = true;
                    d = d.min(x);
                }
            }
            if !any {
                break;
            }
            let mut score = 0u64;
            for i in first_essential..n {
                let (ds, is) = lists[i];
                if ds.get(pos[i]) == Some(&d) {
                    score += terms[i].weight * is[pos[i]] as u64;
                    pos[i] += 1;
                }
            }
            let full = heap.len() == k;
            let mut alive = true;
            for i in (0..first_essential).rev() {
                if full && score + prefix[i + 1] <= theta {
                    alive = false;
                    break;
                }
                let (ds, is) = lists[i];
                pos[i] = gallop(ds, pos[i], d);
                if ds.get(pos[i]) == Some(&d) {
                    score += terms[i].weight * is[pos[i]] as u64;
                }
            }
            if !alive || (full && score <= theta) {
                continue;
            }
            heap.push(std::cmp::Reverse((score, std::cmp::Reverse(d))));
            if heap.len() > k {
                heap.pop();
            }
            if heap.len() == k {
                theta = heap.peek().map(|r| r.0 .0).unwrap_or(0);
                while first_essential < n && prefix[first_essential + 1] <= theta {
                    first_essential += 1;
                }
            }
        }
        let mut hits: Vec<(u64, u32)> = heap.into_iter().map(|r| (r.0 .0, r.0 .1 .0)).collect();
        hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        hits.into_iter()
            .map(|(s, d)| Hit {
                doc: d,
                score: self.to_score(s, qscale),
            })
            .collect()
    }

    /// Brute force: the quantised score of every document (term-at-a-time). The oracle for
    /// [`ImpactIndex::search`] in tests.
    pub fn score_all(&self, query: &[(u32, f32)]) -> Vec<f32> {
        let (terms, qscale) = self.quantise(query);
        let mut acc = vec![0u64; self.n_docs()];
        for t in &terms {
            let (ds, is) = self.list(t.term);
            for (&d, &i) in ds.iter().zip(is) {
                acc[d as usize] += t.weight * i as u64;
            }
        }
        acc.into_iter().map(|s| self.to_score(s, qscale)).collect()
    }

    /// The quantised scores of the given documents (binary search in each query list).
    pub fn score_docs(&self, query: &[(u32, f32)], docs: &[u32]) -> Vec<f32> {
        let (terms, qscale) = self.quantise(query);
        let mut acc = vec![0u64; docs.len()];
        for t in &terms {
            let (ds, is) = self.list(t.term);
            for (a, d) in acc.iter_mut().zip(docs) {
                if let Ok(p) = ds.binary_search(d) {
                    *a += t.weight * is[p] as u64;
                }
            }
        }
        acc.into_iter().map(|s| self.to_score(s, qscale)).collect()
    }

    /// Sections to persist, names prefixed by `prefix` (e.g. "sparse.").
    pub fn sections(&self, p: Prefix) -> Vec<SectionData<'_>> {
        vec![
            SectionData::array(p.0, &self.offsets),
            SectionData::array(p.1, &self.docs),
            SectionData::array(p.2, &self.impacts),
            SectionData::array(p.3, &self.max_impact),
        ]
    }

    /// Load and fully validate (offsets monotone and in bounds, documents in range and strictly
    /// increasing within a list, max impacts exact).
    pub fn from_container(c: &Container, p: Prefix, n_docs: usize, scale: f32) -> Result<Self> {
        let offsets: Buf<u64> = c.array(p.0)?;
        let docs: Buf<u32> = c.array(p.1)?;
        let impacts: Buf<u16> = c.array(p.2)?;
        let max_impact: Buf<u16> = c.array(p.3)?;
        let vocab = max_impact.len();
        if offsets.len() != vocab + 1 {
            return Err(c.err(
                p.0,
                format!("{} entries, expected {}", offsets.len(), vocab + 1),
            ));
        }
        if docs.len() != impacts.len() || offsets[0] != 0 || offsets[vocab] != docs.len() as u64 {
            return Err(c.err(p.0, "posting extents do not match the posting arrays"));
        }
        if !(scale.is_finite() && scale > 0.0) || n_docs > u32::MAX as usize {
            return Err(c.err("meta", "bad impact scale or document count"));
        }
        for t in 0..vocab {
            let (a, b) = (offsets[t], offsets[t + 1]);
            if a > b || b > docs.len() as u64 {
                return Err(c.err(p.0, format!("list {t}: bad extent {a}..{b}")));
            }
            let (ds, is) = (
                &docs[a as usize..b as usize],
                &impacts[a as usize..b as usize],
            );
            if ds.iter().any(|&d| d as usize >= n_docs) || ds.windows(2).any(|w| w[0] >= w[1]) {
                return Err(c.err(p.1, format!("list {t}: documents out of range or unsorted")));
            }
            if is.iter().copied().max().unwrap_or(0) != max_impact[t] || is.contains(&0) {
                return Err(c.err(
                    p.2,
                    format!("list {t}: impacts disagree with the list maximum"),
                ));
            }
        }
        Ok(ImpactIndex {
            n_docs: n_docs as u32,
            scale,
            offsets,
            docs,
            impacts,
            max_impact,
        })
    }

    /// The dequantisation scale (stored in the index metadata).
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// Section names of one impact index.
#[derive(Clone, Copy, Debug)]
pub struct Prefix(
    pub &'static str,
    pub &'static str,
    pub &'static str,
    pub &'static str,
);

/// Section names of the learned sparse index.
pub const SPARSE_SECTIONS: Prefix = Prefix(
    "sparse.offsets",
    "sparse.docs",
    "sparse.impacts",
    "sparse.max_impact",
);
/// Section names of the BM25 index.
pub const BM25_SECTIONS: Prefix = Prefix(
    "bm25.offsets",
    "bm25.docs",
    "bm25.impacts",
    "bm25.max_impact",
);

/// First position >= `from` whose document is >= `d` (exponential then binary search).
fn gallop(ds: &[u32], from: usize, d: u32) -> usize {
    if from >= ds.len() || ds[from] >= d {
        return from;
    }
    let mut step = 1;
    let mut lo = from; // ds[lo] < d
    let mut hi = from + 1;
    while hi < ds.len() && ds[hi] < d {
        lo = hi;
        step *= 2;
        hi = (hi + step).min(ds.len());
    }
    let hi = hi.min(ds.len());
    lo + 1 + ds[lo + 1..hi].partition_point(|&x| x < d)
}

/// BM25 document impacts over token ids (Lucene's formula, as Pyserini runs it):
/// `idf(t) · tf / (tf + k1 · (1 − b + b · dl / avgdl))` with `idf = ln(1 + (N − df + 0.5) / (df + 0.5))`.
/// `docs` are token ids without special tokens. Lucene additionally stores document lengths
/// lossily (one byte, SmallFloat); we use exact lengths, so scores differ from Anserini's
/// in the third digit or so.
pub fn bm25_weights(docs: &[Vec<u32>], vocab: usize, p: Bm25Params) -> Vec<Vec<(u32, f32)>> {
    let n = docs.len() as f64;
    let mut df = vec![0u32; vocab];
    let mut total_len = 0f64;
    let tfs: Vec<Vec<(u32, u32)>> = docs
        .iter()
        .map(|d| {
            let mut ids: Vec<u32> = d
                .iter()
                .copied()
                .filter(|&t| (t as usize) < vocab)
                .collect();
            total_len += ids.len() as f64;
            ids.sort_unstable();
            let mut tf: Vec<(u32, u32)> = Vec::new();
            for t in ids {
                match tf.last_mut() {
                    Some(x) if x.0 == t => x.1 += 1,
                    _ => tf.push((t, 1)),
                }
            }
            for &(t, _) in &tf {
                df[t as usize] += 1;
            }
            tf
        })
        .collect();
    let avgdl = if n > 0.0 {
        (total_len / n).max(1e-9)
    } else {
        1.0
    };
    let (k1, b) = (p.k1 as f64, p.b as f64);
    tfs.iter()
        .map(|tf| {
            let dl: f64 = tf.iter().map(|x| x.1 as f64).sum();
            let norm = k1 * (1.0 - b + b * dl / avgdl);
            tf.iter()
                .map(|&(t, f)| {
                    let dft = df[t as usize] as f64;
                    let idf = (1.0 + (n - dft + 0.5) / (dft + 0.5)).ln();
                    let f = f as f64;
                    (t, (idf * f / (f + norm)) as f32)
                })
                .collect()
        })
        .collect()
}

/// A BM25 query: each distinct token id weighted by its count in the query (Lucene adds one
/// clause per query token).
pub fn bm25_query(ids: &[u32]) -> Vec<(u32, f32)> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    let mut q: Vec<(u32, f32)> = Vec::new();
    for t in ids {
        match q.last_mut() {
            Some(x) if x.0 == t => x.1 += 1.0,
            _ => q.push((t, 1.0)),
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gallop_finds_lower_bound() {
        let ds = [1u32, 3, 5, 7, 9, 11, 13, 15, 17];
        for from in 0..ds.len() {
            for d in 0..20 {
                let want = from + ds[from..].partition_point(|&x| x < d);
                assert_eq!(gallop(&ds, from, d), want, "from {from} d {d}");
            }
        }
    }
}
