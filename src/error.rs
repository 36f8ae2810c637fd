//! One error type for the whole crate. Every fallible path returns `Result<T, Error>`; the
//! variants carry enough context (file, line, field, tensor name, shapes) for a one-line report.

use std::path::PathBuf;

/// The crate-wide result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in retrom3, with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content does not follow its format (truncated, corrupt, unsupported).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A JSON / JSONL input with a problem at a given line (1-based) and field.
    #[error("{path}:{line}: {msg}")]
    Input {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A configuration value that is missing or out of range.
    #[error("config {field}: {msg}")]
    Config { field: String, msg: String },
    /// A tensor whose shape differs from what the op or the model expects.
    #[error("shape mismatch in {what}: expected {expected:?}, got {got:?}")]
    Shape {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor with an unexpected dtype.
    #[error("dtype mismatch in {what}: expected {expected}, got {got}")]
    DType {
        what: String,
        expected: String,
        got: String,
    },
    /// A named tensor is absent from a checkpoint.
    #[error("{path}: missing tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    /// An op was recorded for backward that has no backward implementation.
    #[error("op {0} has no backward; it cannot be used while recording gradients")]
    NoBackward(&'static str),
    /// The op is not available on this device (e.g. a CUDA-only path on the CPU build).
    #[error("{op} is not supported on device {device}")]
    Unsupported { op: String, device: String },
    /// The CUDA driver library could not be loaded.
    #[error("no CUDA driver: libcuda.so could not be loaded (is an NVIDIA driver installed?)")]
    NoCudaDriver,
    /// A CUDA driver is present but the requested GPU cannot be used by this build (no device,
    /// no such ordinal, a driver older than the kernels need, a compute capability the fatbins
    /// do not cover, a kernel missing from them).
    #[error("CUDA device unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver or library call failed (out of memory, launch failure, a kernel fault).
    #[error("CUDA {op} failed: {msg}")]
    Cuda { op: String, msg: String },
    /// A device allocation failed for lack of memory (after the caching allocator gave its free
    /// blocks back): the request, the device and what to change.
    #[error(
        "out of memory on {device}: {requested} bytes requested ({detail}); reduce the batch \
         size or sequence length, or use --sub-batch"
    )]
    OutOfMemory {
        device: String,
        requested: usize,
        detail: String,
    },
    /// The crate was built without the requested backend.
    #[error("retrom3 was built without the `{0}` feature")]
    FeatureMissing(&'static str),
    /// A tokenizer failure (loading or encoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A non-finite value where a finite one is required (NaN loss, inf gradient).
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// A data-parallel process group failed: a peer that stopped or disagrees, a bad launch
    /// environment, an NCCL error.
    #[error("distributed training: {0}")]
    Dist(String),
    /// Invalid argument given by the caller (CLI flags, API options).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Error {
    /// Attach a path to an `std::io::Error`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A shape mismatch.
    pub fn shape(what: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    /// An invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
