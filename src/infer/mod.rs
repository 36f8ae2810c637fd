//! Inference: encoding with length-sorted batches, and pair scores.

mod encode;
mod score;

pub use encode::{
    insert_mcls, ColbertVecs, EncodeOptions, EncodeOutput, LexicalWeights, MAX_BATCH,
};
pub use score::{colbert_score, dense_score, lexical_score, PairScores, ScoreOptions};
