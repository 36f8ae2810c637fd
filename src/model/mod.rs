//! Models: configuration, the BERT / XLM-RoBERTa encoder, the M3 heads.

pub mod config;
pub mod encoder;
pub mod lm_head;
pub mod m3;
pub mod m3_train;
pub mod params;
pub mod retromae;

pub use encoder::{DropoutCfg, Encoder, EncoderInput};
pub use params::{ParamSet, ParamSpec};
