//! Data: the tokenizer (HF `tokenizer.json` with our own truncation) and the JSONL / plain-text
//! readers of training and inference inputs.

pub mod corpus;
pub mod jsonl;
pub mod m3_data;
pub mod masking;
pub mod rng;
pub mod tokenizer;

pub use jsonl::{read_jsonl, read_pairs, read_texts, QueryPassage};
pub use tokenizer::TextTokenizer;
