//! retrom3: train and serve BGE-M3-style retrieval models.
//!
//! The CPU backend is the reference and the default device; the `cuda` feature adds the fast path.

pub mod autograd;
pub mod data;
pub mod device;
pub mod error;
pub mod io;
pub mod model;
pub mod ops;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, Shape, Storage, Tensor};
