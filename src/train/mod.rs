//! Training infrastructure shared by RetroMAE pre-training and M3 fine-tuning: AdamW with global
//! gradient clipping, the linear warm-up/decay schedule, metrics (JSONL + SVG curves) and atomic
//! checkpoints with everything needed for a bit-identical resume.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod retromae;
pub mod schedule;

pub use checkpoint::{atomic_dir, TrainState};
pub use metrics::MetricsLog;
pub use optim::AdamW;
pub use schedule::linear_warmup_decay;
