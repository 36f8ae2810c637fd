//! The device engine: the encoder and the M3 heads run as our kernels plus GEMMs on a
//! [`KernelDevice`] (a CUDA GPU, or the emulator that runs the same kernels on CPU threads), with
//! every activation kept on the device; the host sends token ids and receives head outputs.
//!
//! Like llm.c's `train_gpt2.cu`, there is no tape here: [`DeviceEncoder::forward`] saves what the
//! backward needs and [`DeviceEncoder::backward`] is written out by hand, layer by layer, in the
//! reverse order. The CPU engine (tape + `device::cpu`) is the reference it is tested against.

pub mod bench;
pub mod dense;
pub mod encoder;
pub mod lm_head;
pub mod m3;
pub mod m3_heads;
pub mod optim;
pub mod retromae;

pub use encoder::{DeviceEncoder, EncoderForward};
pub use m3::M3Engine;

use crate::device::launch::{DevBuf, DevPtr, KDType, KernelDevice};
use crate::device::Device;
use crate::error::{Error, Result};

/// A device the engine can run on (shared between threads behind a lock by its owners).
pub type Gpu = dyn KernelDevice + Send + Sync;

/// Open the kernel device behind `device`: a CUDA context (needs the `cuda` feature and a
/// driver) or the emulator (needs the `emu` feature). The CPU has no kernel device: the CPU
/// engine runs there.
pub fn open(device: Device) -> Result<Box<Gpu>> {
    match device {
        Device::Cpu => Err(Error::invalid(
            "the device engine needs a kernel device (cuda or emu); cpu runs the CPU engine",
        )),
        Device::Emu => open_emu(),
        Device::Cuda(i) => open_cuda(i),
    }
}

#[cfg(feature = "emu")]
fn open_emu() -> Result<Box<Gpu>> {
    Ok(Box::new(crate::device::emu::EmuDevice::try_new()?))
}

#[cfg(not(feature = "emu"))]
fn open_emu() -> Result<Box<Gpu>> {
    Err(Error::FeatureMissing("emu"))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Box<Gpu>> {
    Ok(Box::new(crate::device::cuda::CudaDevice::new(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Box<Gpu>> {
    Err(Error::FeatureMissing("cuda"))
}

/// The storage type the trainers and `encode` use on `device`: bf16 on CUDA (f32 accumulation,
/// mixed precision), f32 under emulation (which checks the kernels against the CPU engine).
pub fn compute_dtype(device: Device) -> KDType {
    match device {
        Device::Cuda(_) => KDType::BF16,
        _ => KDType::F32,
    }
}

/// A trainer's encoder on `device`: None on the CPU, else the opened device and the encoder's
/// weights uploaded in [`compute_dtype`].
pub fn trainer_encoder(
    device: Device,
    encoder: &crate::model::encoder::Encoder,
) -> Result<Option<(std::sync::Arc<Gpu>, DeviceEncoder)>> {
    if device == Device::Cpu {
        return Ok(None);
    }
    let dev: std::sync::Arc<Gpu> = open(device)?.into();
    let denc = DeviceEncoder::upload(&*dev, encoder, compute_dtype(device))?;
    Ok(Some((dev, denc)))
}

/// A typed device buffer: `len` elements of `dt`.
pub struct DBuf {
    buf: DevBuf,
    len: usize,
    dt: KDType,
}

impl std::fmt::Debug for DBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DBuf({} x {})", self.len, self.dt.suffix())
    }
}

impl DBuf {
    /// Zero-filled.
    pub fn zeros(dev: &dyn KernelDevice, len: usize, dt: KDType) -> Result<DBuf> {
        Ok(DBuf {
            buf: dev.alloc_zeroed(len * dt.size())?,
            len,
            dt,
        })
    }

    /// Contents unspecified (the caller writes every element before reading it).
    pub fn uninit(dev: &dyn KernelDevice, len: usize, dt: KDType) -> Result<DBuf> {
        Ok(DBuf {
            buf: dev.alloc(len * dt.size())?,
            len,
            dt,
        })
    }

    /// Upload f32 values stored as `dt` (rounded to nearest for bf16).
    pub fn from_f32(dev: &dyn KernelDevice, data: &[f32], dt: KDType) -> Result<DBuf> {
        let buf = match dt {
            KDType::F32 => dev.upload(bytemuck::cast_slice(data))?,
            KDType::BF16 => {
                let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                dev.upload(bytemuck::cast_slice(&v))?
            }
        };
        Ok(DBuf {
            buf,
            len: data.len(),
            dt,
        })
    }

    /// Overwrite the buffer with f32 values stored as its type (same length; no allocation).
    pub fn write_f32(&self, dev: &dyn KernelDevice, data: &[f32]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::shape(
                "device buffer write",
                &[self.len],
                &[data.len()],
            ));
        }
        // SAFETY: the buffer owns len elements of its type; the bytes written are exactly that.
        unsafe {
            match self.dt {
                KDType::F32 => dev.write(self.ptr(), bytemuck::cast_slice(data)),
                KDType::BF16 => {
                    let v: Vec<half::bf16> =
                        data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    dev.write(self.ptr(), bytemuck::cast_slice(&v))
                }
            }
        }
    }

    /// The values as f32 (waits for the device).
    pub fn to_f32(&self, dev: &dyn KernelDevice) -> Result<Vec<f32>> {
        Ok(match self.dt {
            KDType::F32 => crate::device::launch::download::<f32>(dev, &self.buf, self.len)?,
            KDType::BF16 => crate::device::launch::download::<u16>(dev, &self.buf, self.len)?
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect(),
        })
    }

    /// The device address.
    pub fn ptr(&self) -> DevPtr {
        self.buf.ptr
    }

    /// The address of element `i`.
    pub fn at(&self, i: usize) -> DevPtr {
        DevPtr(self.buf.ptr.0 + (i * self.dt.size()) as u64)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Storage type.
    pub fn dtype(&self) -> KDType {
        self.dt
    }

    /// Set every element to zero.
    pub fn zero(&self, dev: &dyn KernelDevice) -> Result<()> {
        // SAFETY: the buffer owns len * size bytes.
        unsafe { dev.memset_zero(self.ptr(), self.len * self.dt.size()) }
    }
}

/// Where each of several tensors lives in one flat buffer: offsets rounded up to 8 elements
/// (16 bytes in bf16, 32 in f32: every piece keeps the alignment of the vector loads). The gaps
/// are zero and stay zero under AdamW (no gradient, no moment, decay of zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    pub offsets: Vec<usize>,
    pub lens: Vec<usize>,
    pub total: usize,
}

impl FlatLayout {
    pub fn new(lens: &[usize]) -> FlatLayout {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &n in lens {
            offsets.push(at);
            at += n.div_ceil(8) * 8;
        }
        FlatLayout {
            offsets,
            lens: lens.to_vec(),
            total: at,
        }
    }
}

impl DBuf {
    /// One zero-filled buffer of `layout.total` elements and a view of each piece. The views keep
    /// the buffer alive; writing through a view writes the buffer.
    pub fn flat(
        dev: &dyn KernelDevice,
        layout: &FlatLayout,
        dt: KDType,
    ) -> Result<(std::sync::Arc<DBuf>, Vec<DBuf>)> {
        let parent = std::sync::Arc::new(DBuf::zeros(dev, layout.total, dt)?);
        let views = layout
            .offsets
            .iter()
            .zip(&layout.lens)
            .map(|(&o, &n)| DBuf {
                buf: DevBuf::new(
                    parent.at(o),
                    n * dt.size(),
                    Box::new(std::sync::Arc::clone(&parent)),
                ),
                len: n,
                dt,
            })
            .collect();
        Ok((parent, views))
    }
}

/// Upload plain values (ids, masks) as an untyped buffer.
pub fn upload_pod<T: bytemuck::Pod>(dev: &dyn KernelDevice, data: &[T]) -> Result<DevBuf> {
    dev.upload(bytemuck::cast_slice(data))
}
