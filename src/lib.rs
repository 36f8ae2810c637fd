//! retrom3: train and serve BGE-M3-style retrieval models.
//!
//! The CPU backend is the reference and the default device; the `cuda` feature adds the fast path.

// Kernel entry points mirror CUDA launch signatures (pointers + sizes + options): many arguments
// are their nature, and bundling them into structs only for the lint would hide the layout.
#![allow(clippy::too_many_arguments)]

pub mod autograd;
pub mod capi;
pub mod data;
pub mod device;
pub mod dist;
pub mod engine;
pub mod error;
pub mod infer;
pub mod io;
pub mod model;
pub mod ops;
pub mod quickstart;
pub mod retrieval;
pub mod selftest;
pub mod tensor;
pub mod train;

pub use device::Device;
pub use error::{Error, Result};
pub use infer::{EncodeOptions, EncodeOutput, PairScores, ScoreOptions};
pub use model::config::{EncoderConfig, Pooling};
pub use model::m3::M3Model;
pub use tensor::{DType, Shape, Storage, Tensor};

/// The README's Rust example, compiled by `cargo test` so it keeps working as written.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
