//! Inverted index over token ids with quantised impacts, and exact top-k by block-max pruning.
//!
//! Every posting stores a document number (u32) and a 16-bit impact: `round(w / scale)` with one
//! `scale = max_weight / 65535` per index (at least 1, so no posting vanishes). Queries are
//! quantised the same way with 20 bits, so a document's score is an exact integer
//! `Σ_t q_t · impact_{t,d}` (u64): pruning bounds are exact, ties are exact, and the returned top-k
//! is exactly the brute-force top-k of that score (score desc, then document number asc). The
//! float score reported is `int · scale · query_scale`; against the float lexical score
//! (SPEC 3.3) the error is at most `max_doc_weight / 131070 · Σ w_q` plus the query rounding.
//!
//! [`ImpactIndex::search`] is a document-range block-max search (in the spirit of Mallia et al.,
//! "Faster Learned Sparse Retrieval with Block-Max Pruning", SIGIR 2024): the documents are cut
//! into blocks of [`BLOCK_DOCS`] consecutive numbers and every posting list knows its largest
//! impact in each block (stored densely for long lists, computed from the postings at query time
//! for short ones). A query first sums `q_t · blockmax_t(b)` into an upper bound per block, scores
//! the most promising blocks exactly to get a threshold θ (the k-th best score so far), then walks
//! the remaining blocks in document order and scores only those whose bound can still beat the
//! current k-th entry (`(bound, first doc) > (θ, k-th doc)`, so ties by document number are exact).
//! Long lists have a skip entry every [`SKIP_DOCS`] documents, so a block's postings are found
//! without searching the list from the previous cursor. Scoring a block is random access, so
//! when the blocks that survive the first threshold would cost more than streaming every query
//! posting (a fixed cost model), the query is scored term-at-a-time into a per-document integer
//! accumulator instead and the top-k taken in one pass; both paths are exact. The block maxima and skips are derived
//! data: rebuilt from the postings by [`ImpactIndex::build`] and [`ImpactIndex::from_container`]
//! (the file format does not store them).
//!
//! [`ImpactIndex::search_maxscore`] keeps the earlier document-at-a-time MaxScore (Turtle & Flood
//! 1995) as a second exact reference; it is slower on BGE-M3-shaped corpora (docs/perf.md).

use super::index_format::{Buf, Container, SectionData};
use super::Hit;
use crate::error::Result;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Query weights are quantised to this many levels (20 bits).
const QUERY_LEVELS: f64 = ((1u32 << 20) - 1) as f64;
/// Document impacts are u16.
const DOC_LEVELS: f64 = u16::MAX as f64;
/// log2 of the documents per block of the block-max bounds.
const BLOCK_SHIFT: u32 = 3;
/// Documents per block of the block-max bounds.
pub const BLOCK_DOCS: usize = 1 << BLOCK_SHIFT;
/// log2 of the documents per skip entry of a long list.
const SKIP_SHIFT: u32 = 6;
/// Documents per skip entry of a long list.
pub const SKIP_DOCS: usize = 1 << SKIP_SHIFT;
/// A list gets a stored block-max row and skips when `len · LONG_LIST_DIV >= n_blocks` (so the
/// row costs at most `2 · LONG_LIST_DIV` bytes per posting; the postings cost 6).
const LONG_LIST_DIV: usize = 4;
/// Postings streamed term-at-a-time that cost about as much as scoring one block of one long
/// list by random access (the switch between the two exact strategies of a query).
const BLOCK_COST: usize = 128;

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
    /// Block maxima and skips of the long lists (derived from the postings, not stored).
    blocks: BlockMax,
}

/// Per-block maxima and skip entries of the long posting lists.
#[derive(Clone)]
struct BlockMax {
    /// Number of blocks of [`BLOCK_DOCS`] documents.
    n_blocks: usize,
    /// Number of skip groups of [`SKIP_DOCS`] documents.
    n_groups: usize,
    /// `[vocab]` the row of a long list in `max`/`skip`, `u32::MAX` for a short one.
    row: Vec<u32>,
    /// `[rows × n_blocks]` the largest impact of the list in each block (0 where absent).
    max: Vec<u16>,
    /// `[rows × (n_groups + 1)]` position in the list of the first posting with document
    /// `>= g · SKIP_DOCS`.
    skip: Vec<u32>,
}

impl std::fmt::Debug for BlockMax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMax[{} blocks, {} long lists]",
            self.n_blocks,
            self.max.len() / self.n_blocks.max(1)
        )
    }
}

impl BlockMax {
    fn new(n_docs: usize, offsets: &[u64], docs: &[u32], impacts: &[u16]) -> BlockMax {
        let n_blocks = n_docs.div_ceil(BLOCK_DOCS);
        let n_groups = n_docs.div_ceil(SKIP_DOCS);
        let vocab = offsets.len().saturating_sub(1);
        let mut row = vec![u32::MAX; vocab];
        let mut max = Vec::new();
        let mut skip = Vec::new();
        let mut rows = 0u32;
        for t in 0..vocab {
            let (a, b) = (offsets[t] as usize, offsets[t + 1] as usize);
            if b == a || (b - a) * LONG_LIST_DIV < n_blocks {
                continue;
            }
            row[t] = rows;
            rows += 1;
            let (ds, is) = (&docs[a..b], &impacts[a..b]);
            let m0 = max.len();
            max.resize(m0 + n_blocks, 0u16);
            let m = &mut max[m0..];
            for (&d, &i) in ds.iter().zip(is) {
                let x = &mut m[(d >> BLOCK_SHIFT) as usize];
                *x = (*x).max(i);
            }
            let mut p = 0usize;
            for g in 0..=n_groups {
                let first = (g << SKIP_SHIFT) as u64;
                while p < ds.len() && (ds[p] as u64) < first {
                    p += 1;
                }
                skip.push(p as u32);
            }
        }
        BlockMax {
            n_blocks,
            n_groups,
            row,
            max,
            skip,
        }
    }
}

/// The current top-k, keyed by (score, Reverse(document)): its smallest key is the k-th entry.
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<(u64, Reverse<u32>)>>,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(super::heap_capacity(k)),
        }
    }

    /// Whether a document whose key is at most `(score, Reverse(doc))` could still enter.
    #[inline]
    fn open(&self, score: u64, doc: u32) -> bool {
        self.heap.len() < self.k
            || self
                .heap
                .peek()
                .is_some_and(|r| (score, Reverse(doc)) > r.0)
    }

    #[inline]
    fn push(&mut self, score: u64, doc: u32) {
        if self.open(score, doc) {
            self.heap.push(Reverse((score, Reverse(doc))));
            if self.heap.len() > self.k {
                self.heap.pop();
            }
        }
    }

    /// (score, doc), score descending then document ascending.
    fn into_sorted(self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = self.heap.into_iter().map(|r| (r.0 .0, r.0 .1 .0)).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v
    }
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
        // 1 + the last document that listed each id: a repeat within a document would make two
        // postings of one (term, document), which the index format refuses on load.
        let mut seen = vec![0u32; vocab];
        for (i, d) in docs.iter().enumerate() {
            for &(t, w) in d {
                if (t as usize) >= vocab {
                    return Err(crate::Error::invalid(format!(
                        "token id {t} outside the vocabulary ({vocab})"
                    )));
                }
                if w > 0.0 && w.is_finite() {
                    if seen[t as usize] == i as u32 + 1 {
                        return Err(crate::Error::invalid(format!(
                            "document {i} lists token id {t} twice (one weight per id)"
                        )));
                    }
                    seen[t as usize] = i as u32 + 1;
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
        let blocks = BlockMax::new(docs.len(), &counts, &pdocs, &imps);
        Ok(ImpactIndex {
            n_docs: docs.len() as u32,
            scale,
            offsets: counts.into(),
            docs: pdocs.into(),
            impacts: imps.into(),
            max_impact: max_impact.into(),
            blocks,
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

    /// The exact top-k documents by the quantised score (block-max search, see the module
    /// docs). Documents with no query term score 0 and are never returned, so fewer than k hits
    /// may come back.
    pub fn search(&self, query: &[(u32, f32)], k: usize) -> Vec<Hit> {
        let (terms, qscale) = self.quantise(query);
        if k == 0 || terms.is_empty() || self.n_docs == 0 {
            return Vec::new();
        }
        self.search_blocks(&terms, k, true)
            .into_iter()
            .map(|(s, d)| Hit {
                doc: d,
                score: self.to_score(s, qscale),
            })
            .collect()
    }

    /// [`ImpactIndex::search`] without the term-at-a-time switch (always block by block), so
    /// tests exercise both exact paths.
    #[doc(hidden)]
    pub fn search_block_max_only(&self, query: &[(u32, f32)], k: usize) -> Vec<Hit> {
        let (terms, qscale) = self.quantise(query);
        if k == 0 || terms.is_empty() || self.n_docs == 0 {
            return Vec::new();
        }
        self.search_blocks(&terms, k, false)
            .into_iter()
            .map(|(s, d)| Hit {
                doc: d,
                score: self.to_score(s, qscale),
            })
            .collect()
    }

    fn search_blocks(&self, terms: &[QTerm], k: usize, allow_taat: bool) -> Vec<(u64, u32)> {
        let bm = &self.blocks;
        let nb = bm.n_blocks;
        // Upper bound of every block: Σ_t q_t · (largest impact of t in the block).
        let mut ub = vec![0u64; nb];
        for t in terms {
            let r = bm.row[t.term as usize];
            if r != u32::MAX {
                let row = &bm.max[r as usize * nb..(r as usize + 1) * nb];
                for (u, &m) in ub.iter_mut().zip(row) {
                    *u += t.weight * m as u64;
                }
            } else {
                let (ds, is) = self.list(t.term);
                let (mut cur, mut m) = (u32::MAX, 0u16);
                for (&d, &i) in ds.iter().zip(is) {
                    let b = d >> BLOCK_SHIFT;
                    if b != cur {
                        if cur != u32::MAX {
                            ub[cur as usize] += t.weight * m as u64;
                        }
                        cur = b;
                        m = 0;
                    }
                    m = m.max(i);
                }
                if cur != u32::MAX {
                    ub[cur as usize] += t.weight * m as u64;
                }
            }
        }
        let lists: Vec<(&[u32], &[u16])> = terms.iter().map(|t| self.list(t.term)).collect();
        let mut top = TopK::new(k);
        let mut eval = BlockEval {
            index: self,
            terms,
            lists: &lists,
            pos: vec![0; terms.len()],
            ordered: true,
            acc: [0; BLOCK_DOCS],
        };
        // Phase 1: score the blocks with the largest bounds (in document order) for a threshold.
        let p = (4 * k + 64).min(nb);
        let mut best: Vec<(u64, u32)> = ub
            .iter()
            .enumerate()
            .filter(|x| *x.1 > 0)
            .map(|(b, &u)| (u, b as u32))
            .collect();
        if best.len() > p {
            best.select_nth_unstable_by(p - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            best.truncate(p);
        }
        best.sort_unstable_by_key(|x| x.1);
        for &(_, b) in &best {
            eval.block(b as usize, &mut top);
            ub[b as usize] = 0;
        }
        // Phase 2: the other blocks whose bound can beat the k-th entry, in decreasing bound
        // (then increasing block) order, until one cannot: every later block's key is no larger.
        let mut rest: Vec<(u64, u32)> = ub
            .iter()
            .enumerate()
            .filter(|&(b, &u)| u > 0 && top.open(u, (b << BLOCK_SHIFT) as u32))
            .map(|(b, &u)| (u, b as u32))
            .collect();
        // Cost model (measured on the 1M-document bench, docs/perf.md): scoring a block costs
        // about as much as streaming BLOCK_COST postings per long list it touches (random access
        // against a sequential scan). When the surviving blocks would cost more than scoring
        // every posting, score term-at-a-time instead; both are exact.
        let long = terms
            .iter()
            .filter(|t| bm.row[t.term as usize] != u32::MAX)
            .count()
            .max(1);
        let postings: usize = lists.iter().map(|l| l.0.len()).sum();
        if allow_taat && rest.len().saturating_mul(long).saturating_mul(BLOCK_COST) > postings {
            return self.search_taat(terms, k);
        }
        rest.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        eval.ordered = false;
        for &(u, b) in &rest {
            if !top.open(u, b << BLOCK_SHIFT) {
                break;
            }
            eval.block(b as usize, &mut top);
        }
        top.into_sorted()
    }

    /// Exact top-k term-at-a-time: every query posting into a score per document, then one
    /// pass in document order (a later document enters only with a score strictly above the
    /// k-th, which keeps ties by document number).
    fn search_taat(&self, terms: &[QTerm], k: usize) -> Vec<(u64, u32)> {
        let mut acc = vec![0u64; self.n_docs()];
        for t in terms {
            let (ds, is) = self.list(t.term);
            let w = t.weight;
            for (&d, &i) in ds.iter().zip(is) {
                acc[d as usize] += w * i as u64;
            }
        }
        let mut top = TopK::new(k);
        let mut theta = 0u64;
        for (d, &s) in acc.iter().enumerate() {
            if s > theta {
                top.push(s, d as u32);
                if top.heap.len() == k {
                    theta = top.heap.peek().map_or(0, |r| r.0 .0);
                }
            }
        }
        top.into_sorted()
    }

    /// The exact top-k by document-at-a-time MaxScore (the earlier algorithm, kept as a second
    /// exact reference and for the side-by-side bench; [`ImpactIndex::search`] is faster).
    pub fn search_maxscore(&self, query: &[(u32, f32)], k: usize) -> Vec<Hit> {
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
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<u32>)>> =
            BinaryHeap::with_capacity(super::heap_capacity(k));
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
            heap.push(Reverse((score, Reverse(d))));
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

    /// The exact quantised integer score `Σ_t q_t · impact_{t,d}` of every document (the
    /// ranking key of [`ImpactIndex::search`]; an integer oracle for tests).
    pub fn score_all_quantised(&self, query: &[(u32, f32)]) -> Vec<u64> {
        let (terms, _) = self.quantise(query);
        let mut acc = vec![0u64; self.n_docs()];
        for t in &terms {
            let (ds, is) = self.list(t.term);
            for (&d, &i) in ds.iter().zip(is) {
                acc[d as usize] += t.weight * i as u64;
            }
        }
        acc
    }

    /// Brute force: the quantised score of every document (term-at-a-time). The oracle for
    /// [`ImpactIndex::search`] in tests.
    pub fn score_all(&self, query: &[(u32, f32)]) -> Vec<f32> {
        let (_, qscale) = self.quantise(query);
        self.score_all_quantised(query)
            .into_iter()
            .map(|s| self.to_score(s, qscale))
            .collect()
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
        // A writer's scale is a finite weight / 65535: a larger one would overflow the scores.
        let max_scale = f32::MAX as f64 / DOC_LEVELS * (1.0 + 1e-6);
        if !(scale.is_finite() && scale > 0.0 && scale as f64 <= max_scale)
            || n_docs > u32::MAX as usize
        {
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
        let blocks = BlockMax::new(n_docs, &offsets, &docs, &impacts);
        Ok(ImpactIndex {
            n_docs: n_docs as u32,
            scale,
            offsets,
            docs,
            impacts,
            max_impact,
            blocks,
        })
    }

    /// The dequantisation scale (stored in the index metadata).
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// Exact scoring of one block of documents, with a cursor per query list.
struct BlockEval<'a> {
    index: &'a ImpactIndex,
    terms: &'a [QTerm],
    lists: &'a [(&'a [u32], &'a [u16])],
    /// Cursors of the short lists, used while blocks come in increasing order.
    pos: Vec<usize>,
    /// Whether blocks come in increasing order (else short lists are binary searched).
    ordered: bool,
    acc: [u64; BLOCK_DOCS],
}

impl BlockEval<'_> {
    fn block(&mut self, b: usize, top: &mut TopK) {
        let bm = &self.index.blocks;
        let start = (b << BLOCK_SHIFT) as u32;
        let end = start.saturating_add(BLOCK_DOCS as u32);
        for ((t, &(ds, is)), pos) in self.terms.iter().zip(self.lists).zip(self.pos.iter_mut()) {
            let r = bm.row[t.term as usize];
            let mut p = if r != u32::MAX {
                let r = r as usize;
                if bm.max[r * bm.n_blocks + b] == 0 {
                    continue;
                }
                let g = (start >> SKIP_SHIFT) as usize;
                let sk = &bm.skip[r * (bm.n_groups + 1)..(r + 1) * (bm.n_groups + 1)];
                let (lo, hi) = (sk[g] as usize, sk[g + 1] as usize);
                lo + ds[lo..hi].partition_point(|&x| x < start)
            } else if self.ordered {
                gallop(ds, *pos, start)
            } else {
                ds.partition_point(|&x| x < start)
            };
            while p < ds.len() && ds[p] < end {
                self.acc[(ds[p] - start) as usize] += t.weight * is[p] as u64;
                p += 1;
            }
            *pos = p;
        }
        for (j, a) in self.acc.iter_mut().enumerate() {
            if *a > 0 {
                top.push(*a, start + j as u32);
                *a = 0;
            }
        }
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
