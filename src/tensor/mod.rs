//! `Tensor`: a shape, a dtype and contiguous storage. Cheap to clone (the storage is shared).
//!
//! The CPU engine computes in f32; f16 / bf16 / i64 storage exists so checkpoints can be loaded and
//! written in the dtype they were stored in.

mod shape;

pub use shape::Shape;

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::sync::Arc;

/// Element types a tensor can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
        }
    }

    /// Lower-case name as used in messages and safetensors headers (F32, F16, BF16, I64).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host storage of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
}

impl Storage {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::I64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::I64(_) => DType::I64,
        }
    }

    /// Little-endian bytes of the elements (the layout of safetensors and torch storages).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Decode little-endian bytes of `dtype`. `bytes.len()` must be a multiple of the element size.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Storage> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "{} bytes is not a whole number of {} elements",
                bytes.len(),
                dtype
            )));
        }
        Ok(match dtype {
            DType::F32 => Storage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => Storage::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::BF16 => Storage::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::I64 => Storage::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
        })
    }
}

/// A dense, contiguous, row-major tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Shape,
    storage: Arc<Storage>,
}

impl Tensor {
    /// Whether `other` is this very tensor (same storage, same shape), not merely equal values.
    pub fn is_same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage) && self.dims() == other.dims()
    }

    /// A tensor over `storage` with `dims`; the element count must match.
    pub fn new(storage: Storage, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::from(dims);
        if shape.numel() != storage.len() {
            return Err(Error::invalid(format!(
                "shape {:?} needs {} elements, storage has {}",
                dims,
                shape.numel(),
                storage.len()
            )));
        }
        Ok(Tensor {
            shape,
            storage: Arc::new(storage),
        })
    }

    /// An f32 tensor from a vector.
    pub fn from_vec(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
        Tensor::new(Storage::F32(data), dims)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(dims: &[usize]) -> Tensor {
        let n = dims.iter().product();
        Tensor {
            shape: Shape::from(dims),
            storage: Arc::new(Storage::F32(vec![0.0; n])),
        }
    }

    /// An f32 scalar (shape `[]`).
    pub fn scalar(x: f32) -> Tensor {
        Tensor {
            shape: Shape::from(&[][..]),
            storage: Arc::new(Storage::F32(vec![x])),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The f32 elements; an error for other dtypes (convert with [`Tensor::to_f32`] first).
    pub fn f32s(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::F32(v) => Ok(v),
            s => Err(Error::DType {
                what: "tensor access".into(),
                expected: "f32".into(),
                got: s.dtype().to_string(),
            }),
        }
    }

    /// The f32 elements as an owned vector (no copy when this is the only reference).
    pub fn into_f32_vec(self) -> Result<Vec<f32>> {
        let t = self.to_f32();
        match Arc::try_unwrap(t.storage) {
            Ok(Storage::F32(v)) => Ok(v),
            Ok(_) => unreachable!("to_f32 returns f32 storage"),
            Err(arc) => match &*arc {
                Storage::F32(v) => Ok(v.clone()),
                _ => unreachable!("to_f32 returns f32 storage"),
            },
        }
    }

    /// The same values as f32 (a cheap clone when already f32).
    pub fn to_f32(&self) -> Tensor {
        let data = match &*self.storage {
            Storage::F32(_) => return self.clone(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::I64(v) => v.iter().map(|&x| x as f32).collect(),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Arc::new(Storage::F32(data)),
        }
    }

    /// Convert to `dtype` (rounding to nearest for f16 / bf16; truncation for i64).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32();
        let v = f.f32s().expect("f32");
        let storage = match dtype {
            DType::F32 => return f,
            DType::F16 => Storage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::I64 => Storage::I64(v.iter().map(|&x| x as i64).collect()),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Arc::new(storage),
        }
    }

    /// The same storage viewed with other dimensions of equal element count.
    pub fn reshape(&self, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::from(dims);
        if shape.numel() != self.numel() {
            return Err(Error::shape("reshape", dims, self.dims()));
        }
        Ok(Tensor {
            shape,
            storage: self.storage.clone(),
        })
    }

    /// Check that the dims equal `expected`, naming `what` in the error.
    pub fn expect_dims(&self, what: &str, expected: &[usize]) -> Result<()> {
        if self.dims() != expected {
            return Err(Error::shape(what, expected, self.dims()));
        }
        Ok(())
    }

    /// Check that every value is finite, naming `what` and the first bad element in the error.
    pub fn ensure_finite(&self, what: &str) -> Result<()> {
        let t = self.to_f32();
        match t.f32s()?.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(Error::NonFinite(format!("{what} element {i}"))),
            None => Ok(()),
        }
    }

    /// Largest absolute difference to `other` (same shape required), in f32; NaN if an element
    /// of either is NaN.
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f32> {
        if self.dims() != other.dims() {
            return Err(Error::shape("max_abs_diff", self.dims(), other.dims()));
        }
        let a = self.to_f32();
        let b = other.to_f32();
        Ok(a.f32s()?
            .iter()
            .zip(b.f32s()?)
            // Equal values (infinities too) differ by 0.
            .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
            // NaN wins (f32::max would drop it): a NaN element is no agreement.
            .fold(0.0, |m: f32, d| {
                if m.is_nan() || d.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            }))
    }
}
