//! Device-agnostic kernel launching: a launch shape, the argument array in cuLaunchKernel's
//! `kernelParams` convention (one pointer per argument, pointing at the argument's value), and the
//! [`Launcher`] / [`KernelDevice`] traits that the emulator implements now and the CUDA runtime
//! will implement with cudarc. Building the arguments once serves both: the same `void**` goes to
//! `cuLaunchKernel` or to an emulated `r3emu_<kernel>` entry point.

use crate::device::cpu::gemm::Trans;
use crate::device::Device;
use crate::error::Result;
use std::ffi::c_void;

/// A device address: a `CUdeviceptr` on CUDA, a host address under emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The null pointer (an absent optional argument).
    pub const NULL: DevPtr = DevPtr(0);
}

/// Storage dtype of a kernel variant: the `_f32` / `_bf16` suffix of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KDType {
    F32,
    BF16,
}

impl KDType {
    /// The name suffix (`f32`, `bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            KDType::F32 => "f32",
            KDType::BF16 => "bf16",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KDType::F32 => 4,
            KDType::BF16 => 2,
        }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch.
    pub fn linear(grid: u32, block: u32, shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [grid.max(1), 1, 1],
            block: [block, 1, 1],
            shared_bytes,
        }
    }
}

/// One argument slot: 8 bytes, 8-aligned, the value in its first `size_of` bytes (native order).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
struct Slot([u8; 8]);

/// A value that can be passed to a kernel by value (scalars and device pointers).
pub trait KernelArg {
    /// The value's bytes as the kernel parameter expects them.
    fn bytes(&self) -> ([u8; 8], usize);
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn bytes(&self) -> ([u8; 8], usize) {
                let b = self.to_ne_bytes();
                let mut out = [0u8; 8];
                out[..b.len()].copy_from_slice(&b);
                (out, b.len())
            }
        }
    )*};
}
scalar_arg!(i32, u32, i64, u64, f32);

impl KernelArg for DevPtr {
    fn bytes(&self) -> ([u8; 8], usize) {
        (self.0.to_ne_bytes(), 8)
    }
}

/// The arguments of one launch, in order.
#[derive(Debug, Default)]
pub struct KernelArgs {
    slots: Vec<Slot>,
    ptrs: Vec<*mut c_void>,
}

impl KernelArgs {
    /// An empty argument list.
    pub fn new() -> KernelArgs {
        KernelArgs::default()
    }
    /// Append one argument.
    pub fn arg(&mut self, a: impl KernelArg) -> &mut KernelArgs {
        self.slots.push(Slot(a.bytes().0));
        self
    }
    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// True when there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// The `void**` of cuLaunchKernel: element i points at argument i. Valid while `self` lives
    /// and is not modified.
    pub fn params(&mut self) -> *mut *mut c_void {
        self.ptrs = self
            .slots
            .iter_mut()
            .map(|s| s.0.as_mut_ptr().cast::<c_void>())
            .collect();
        self.ptrs.as_mut_ptr()
    }
}

/// Something that runs kernels by name: the emulator, later the CUDA stream.
pub trait Launcher {
    /// The device the kernels run on.
    fn device(&self) -> Device;
    /// Launch `kernel` (its `extern "C"` name) with `args`.
    ///
    /// # Safety
    /// Every pointer argument must address device memory valid for everything the kernel reads
    /// and writes given the other arguments (the wrappers in `device::kernels` state the sizes).
    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, args: &mut KernelArgs) -> Result<()>;
    /// Streaming multiprocessors, for grids sized to the resident blocks (grid-stride kernels).
    fn multiprocessors(&self) -> usize;
    /// Shared memory per multiprocessor (bytes), which bounds the resident blocks of kernels
    /// with much dynamic shared memory.
    fn shared_memory_per_multiprocessor(&self) -> usize;
}

/// A device buffer: its address, its size, and whatever keeps the allocation alive.
pub struct DevBuf {
    pub ptr: DevPtr,
    pub bytes: usize,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl DevBuf {
    /// Wrap an allocation owned by `keep`, found at `ptr`.
    pub fn new(ptr: DevPtr, bytes: usize, keep: Box<dyn std::any::Any + Send + Sync>) -> DevBuf {
        DevBuf {
            ptr,
            bytes,
            _keep: keep,
        }
    }
}

/// One row-major matrix product `C[m,n] = alpha · op(A) · op(B) + beta · C` on the device
/// (`cpu::gemm::sgemm`'s convention): A and B stored as `ab`, C as `c`, f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceGemm {
    pub ta: Trans,
    pub tb: Trans,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub alpha: f32,
    pub beta: f32,
    /// Storage of A and B.
    pub ab: KDType,
    /// Storage of C (bf16 inputs may accumulate into an f32 C: parameter gradients).
    pub c: KDType,
}

/// Device memory as this process's allocator sees it ([`KernelDevice::memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in buffers alive now.
    pub live: usize,
    /// Most bytes alive at once since the last [`KernelDevice::reset_memory_peak`].
    pub peak_live: usize,
    /// Most bytes that could be alive at once: what is live, plus what the allocator holds
    /// free, plus what the driver has left (None: no known bound).
    pub capacity: Option<usize>,
}

/// A launcher with memory and matrix products: what the selftest and the device engine need from
/// a device. Every operation is queued in order on the device's one stream.
pub trait KernelDevice: Launcher {
    /// Copy host bytes into a new device buffer (16-byte aligned).
    fn upload(&self, bytes: &[u8]) -> Result<DevBuf>;
    /// Copy a device buffer back (waits for the launches before it).
    fn download(&self, buf: &DevBuf, out: &mut [u8]) -> Result<()>;
    /// Copy host bytes into existing device memory at `dst` (no allocation).
    ///
    /// # Safety
    /// `dst` must address at least `bytes.len()` bytes of live memory of this device.
    unsafe fn write(&self, dst: DevPtr, bytes: &[u8]) -> Result<()>;
    /// A new zero-filled buffer.
    fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf> {
        self.upload(&vec![0u8; bytes])
    }
    /// A new buffer whose contents are unspecified (every byte is written before it is read).
    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.alloc_zeroed(bytes)
    }
    /// Set `bytes` bytes at `ptr` to zero.
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of live memory of this device.
    unsafe fn memset_zero(&self, ptr: DevPtr, bytes: usize) -> Result<()>;
    /// Copy `bytes` bytes from `src` to `dst` (non-overlapping) on the device.
    ///
    /// # Safety
    /// Both pointers must address `bytes` bytes of live memory of this device.
    unsafe fn copy_d2d(&self, src: DevPtr, dst: DevPtr, bytes: usize) -> Result<()>;
    /// A matrix product (cuBLAS on CUDA; the CPU GEMM over host memory under emulation).
    ///
    /// # Safety
    /// a, b, c must address m·k, k·n and m·n elements of their storage types; c must not
    /// overlap a or b.
    unsafe fn gemm(&self, g: &DeviceGemm, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()>;
    /// Wait for everything queued so far (surfacing asynchronous kernel errors).
    fn synchronize(&self) -> Result<()>;
    /// A human name of the device (the GPU's product name on CUDA).
    fn name(&self) -> String {
        self.device().to_string()
    }
    /// This device's memory use and bound (None where the device does not count it).
    fn memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Restart [`DeviceMemory::peak_live`] from the bytes live now.
    fn reset_memory_peak(&self) {}
    /// The CUDA stream (`CUstream`) every operation of this device is queued on, for libraries
    /// that enqueue work of their own (NCCL); None off CUDA.
    fn cuda_stream(&self) -> Option<u64> {
        None
    }
}

/// Typed upload of a slice of plain values.
pub fn upload<T: bytemuck::Pod>(dev: &dyn KernelDevice, data: &[T]) -> Result<DevBuf> {
    dev.upload(bytemuck::cast_slice(data))
}

/// Typed download of `n` plain values.
pub fn download<T: bytemuck::Pod + Default>(
    dev: &dyn KernelDevice,
    buf: &DevBuf,
    n: usize,
) -> Result<Vec<T>> {
    let mut out = vec![T::default(); n];
    dev.download(buf, bytemuck::cast_slice_mut(&mut out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_point_at_native_values() {
        let mut a = KernelArgs::new();
        a.arg(DevPtr(0x1234)).arg(7i32).arg(2.5f32).arg(-3i64);
        let p = a.params();
        // SAFETY: `params` returns 4 pointers to live 8-byte slots holding the values pushed.
        unsafe {
            assert_eq!(*(*p.add(0)).cast::<u64>(), 0x1234);
            assert_eq!(*(*p.add(1)).cast::<i32>(), 7);
            assert_eq!(*(*p.add(2)).cast::<f32>(), 2.5);
            assert_eq!(*(*p.add(3)).cast::<i64>(), -3);
        }
    }
}
