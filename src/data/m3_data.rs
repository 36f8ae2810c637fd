//! M3 fine-tuning data (SPEC §4.1-4.2): FlagEmbedding's training JSONL as is, validated with file
//! and line in every error, and the per-query passage sampling (one positive, G−1 negatives with
//! the repeat rule for short lists, sorted by teacher score when scores exist).

use super::jsonl::read_jsonl;
use super::rng::Rng;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

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

/// The suffix of a file stem or directory name that marks "no in-batch negatives" (SPEC §4.1).
pub const NO_IN_BATCH_SUFFIX: &str = "no_in_batch_neg";

/// One training file: its own dataset (batches never mix datasets, SPEC §5.2).
#[derive(Clone, Debug)]
pub struct TrainDataset {
    pub source: PathBuf,
    pub examples: Vec<TrainExample>,
    /// The file's stem, or the directory it was listed from, ends with `no_in_batch_neg`.
    pub no_in_batch: bool,
}

fn ends_no_in_batch(name: Option<&std::ffi::OsStr>) -> bool {
    name.and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(NO_IN_BATCH_SUFFIX))
}

/// Read `--train` paths: each file is a dataset; a directory contributes each of its .json/.jsonl
/// files (sorted by name) as a dataset. A file whose stem ends with `no_in_batch_neg`, or any
/// file of a directory whose name ends with it, is in no-in-batch mode.
pub fn read_train_paths(paths: &[PathBuf]) -> Result<Vec<TrainDataset>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl" || x == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no .json/.jsonl file in the directory",
                    ),
                ));
            }
            let dir_flag = ends_no_in_batch(p.file_name());
            for f in files {
                out.push(TrainDataset {
                    examples: read_train_file(&f)?,
                    no_in_batch: dir_flag || ends_no_in_batch(f.file_stem()),
                    source: f,
                });
            }
        } else {
            out.push(TrainDataset {
                examples: read_train_file(p)?,
                no_in_batch: ends_no_in_batch(p.file_stem()),
                source: p.clone(),
            });
        }
    }
    Ok(out)
}

/// Length buckets (SPEC §5.1) and their per-device batch sizes (SPEC §5.2).
#[derive(Clone, Debug, PartialEq)]
pub struct BucketSpec {
    /// Increasing lower bounds of buckets 1..: bucket k holds lengths in
    /// [boundaries[k-1], boundaries[k]), bucket 0 lengths below boundaries[0]. Empty = one bucket.
    pub boundaries: Vec<usize>,
    /// One batch size per bucket (`boundaries.len() + 1` values).
    pub batch_sizes: Vec<usize>,
}

impl BucketSpec {
    /// One bucket of `batch_size`.
    pub fn single(batch_size: usize) -> BucketSpec {
        BucketSpec {
            boundaries: Vec::new(),
            batch_sizes: vec![batch_size],
        }
    }

    /// From the CLI lists: boundaries (strictly increasing, > 0) and either one batch size per
    /// bucket or none (then every bucket uses `default_batch`).
    pub fn new(
        boundaries: Vec<usize>,
        batch_sizes: Option<Vec<usize>>,
        default_batch: usize,
    ) -> Result<BucketSpec> {
        if boundaries.first() == Some(&0) || boundaries.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(format!(
                "--length-buckets {boundaries:?}: boundaries must be > 0 and strictly increasing"
            )));
        }
        let n = boundaries.len() + 1;
        let batch_sizes = batch_sizes.unwrap_or_else(|| vec![default_batch; n]);
        if batch_sizes.len() != n || batch_sizes.contains(&0) {
            return Err(Error::invalid(format!(
                "--bucket-batch-sizes {batch_sizes:?}: need {n} values >= 1 (one per bucket of {} boundaries)",
                boundaries.len()
            )));
        }
        Ok(BucketSpec {
            boundaries,
            batch_sizes,
        })
    }

    /// The bucket of an example whose longest text has `len` tokens.
    pub fn bucket_of(&self, len: usize) -> usize {
        self.boundaries.partition_point(|&b| b <= len)
    }
}

/// The longest text of an example (query, positives, negatives) under `len_of`.
pub fn example_max_len(
    ex: &TrainExample,
    len_of: &mut dyn FnMut(&str) -> Result<usize>,
) -> Result<usize> {
    let mut m = len_of(&ex.query)?;
    for t in ex.pos.iter().chain(&ex.neg) {
        m = m.max(len_of(t)?);
    }
    Ok(m)
}

/// A (dataset, length bucket) pair with its examples: the unit of the batch plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanUnit {
    pub dataset: usize,
    pub bucket: usize,
    /// Indices into the dataset's examples.
    pub examples: Vec<usize>,
    /// Per-device batch size.
    pub batch_size: usize,
    pub no_in_batch: bool,
}

/// Split datasets into (dataset, bucket) units; `lengths[d][i]` is example i's longest text
/// (ignored, may be empty, when the spec has one bucket). Empty units are dropped.
pub fn plan_units(
    datasets: &[TrainDataset],
    lengths: &[Vec<usize>],
    spec: &BucketSpec,
) -> Vec<PlanUnit> {
    let mut units = Vec::new();
    for (d, ds) in datasets.iter().enumerate() {
        let mut by: Vec<Vec<usize>> = vec![Vec::new(); spec.batch_sizes.len()];
        let lens = lengths.get(d).map_or(&[][..], Vec::as_slice);
        for i in 0..ds.examples.len() {
            let b = lens
                .get(i)
                .filter(|_| !spec.boundaries.is_empty())
                .map_or(0, |&l| spec.bucket_of(l));
            by[b].push(i);
        }
        for (bucket, examples) in by.into_iter().enumerate() {
            if !examples.is_empty() {
                units.push(PlanUnit {
                    dataset: d,
                    bucket,
                    examples,
                    batch_size: spec.batch_sizes[bucket],
                    no_in_batch: ds.no_in_batch,
                });
            }
        }
    }
    units
}

/// One global batch of the plan: `per_device × world` examples of one unit.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBatch {
    pub unit: usize,
    pub dataset: usize,
    /// Dataset example indices, rank r's slice is [r·bs, (r+1)·bs).
    pub examples: Vec<usize>,
    pub per_device: usize,
    pub no_in_batch: bool,
}

impl PlannedBatch {
    /// The examples of `rank`.
    pub fn rank_slice(&self, rank: usize) -> &[usize] {
        &self.examples[rank * self.per_device..(rank + 1) * self.per_device]
    }
}

/// Global batches per epoch (the same for every epoch): Σ over units ⌊n / (bs·W)⌋.
pub fn batches_per_epoch(units: &[PlanUnit], world: usize) -> usize {
    units
        .iter()
        .map(|u| u.examples.len() / (u.batch_size * world.max(1)))
        .sum()
}

/// The batch plan of `epoch` (SPEC §5.2): one RNG seeded by (seed, epoch), the same on every rank,
/// shuffles the unit order, then each unit's examples, cuts them into global batches of
/// per-device size × `world`, drops the incomplete tail (the new code's rule), and shuffles the
/// list of batches. Every rank thus trains on the same dataset and length bucket at each step.
pub fn epoch_plan(units: &[PlanUnit], seed: u64, epoch: u64, world: usize) -> Vec<PlannedBatch> {
    let world = world.max(1);
    let mut rng = Rng::new(seed, 0x5A3E_0000 + epoch);
    let mut order: Vec<usize> = (0..units.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for u in order {
        let unit = &units[u];
        let mut idx = unit.examples.clone();
        rng.shuffle(&mut idx);
        let global = unit.batch_size * world;
        for chunk in idx.chunks_exact(global) {
            batches.push(PlannedBatch {
                unit: u,
                dataset: unit.dataset,
                examples: chunk.to_vec(),
                per_device: unit.batch_size,
                no_in_batch: unit.no_in_batch,
            });
        }
    }
    rng.shuffle(&mut batches);
    batches
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
    fn buckets_and_plan() {
        let spec = BucketSpec::new(vec![500, 1000, 2000], Some(vec![4, 3, 2, 1]), 8).unwrap();
        assert_eq!(
            [0, 499, 500, 999, 1000, 5000].map(|l| spec.bucket_of(l)),
            [0, 0, 1, 1, 2, 3]
        );
        assert!(BucketSpec::new(vec![500, 500], None, 8).is_err());
        assert!(BucketSpec::new(vec![500], Some(vec![1]), 8).is_err());
        let ds = |n: usize, nib: bool| TrainDataset {
            source: PathBuf::from("x"),
            examples: (0..n).map(|_| ex(3, false)).collect(),
            no_in_batch: nib,
        };
        let data = [ds(23, false), ds(9, true)];
        let lengths = vec![
            (0..23).map(|i| [10, 600, 1500][i % 3]).collect::<Vec<_>>(),
            vec![3000; 9],
        ];
        let units = plan_units(&data, &lengths, &spec);
        assert_eq!(units.len(), 4);
        // 8 / 4 + 8 / 3 + 7 / 2 for dataset 0, 9 / 1 for dataset 1 (world 1).
        assert_eq!(batches_per_epoch(&units, 1), 2 + 2 + 3 + 9);
        let a = epoch_plan(&units, 7, 0, 1);
        assert_eq!(a, epoch_plan(&units, 7, 0, 1), "same seed, same plan");
        assert_ne!(a, epoch_plan(&units, 7, 1, 1), "each epoch reshuffles");
        assert_eq!(a.len(), 16);
        for b in &a {
            let u = &units[b.unit];
            assert_eq!(b.examples.len(), u.batch_size);
            assert!(b.examples.iter().all(|i| u.examples.contains(i)));
            assert_eq!(b.no_in_batch, b.dataset == 1);
        }
        // World 2: global batches of 2·bs, rank slices disjoint.
        let w = epoch_plan(&units, 7, 0, 2);
        assert_eq!(w.len(), batches_per_epoch(&units, 2));
        for b in &w {
            let (r0, r1) = (b.rank_slice(0), b.rank_slice(1));
            assert_eq!(r0.len(), b.per_device);
            assert!(r0.iter().all(|i| !r1.contains(i)));
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
