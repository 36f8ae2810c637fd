//! `Device::Cuda(i)`: the CUDA runtime (feature `cuda`). One [`CudaDevice`] is a context on GPU
//! `i`, one stream that every launch, copy and GEMM goes to, the registry of every kernel of the
//! build (`registry`), a caching allocator (`alloc`) and, on first use, a cuBLAS handle (`blas`).
//! It implements the same `Launcher` / `KernelDevice` traits as the emulator, so the launch
//! wrappers of `device::kernels` and the selftest run unchanged on a real GPU.
//!
//! Opening a device never panics: cudarc (dynamic loading) panics on the first driver call when
//! libcuda.so is missing, so its presence is checked first ([`Error::NoCudaDriver`]); a driver
//! without a GPU, a bad ordinal, a driver older than the kernels' toolkit and a GPU architecture
//! the fatbins do not cover are [`Error::CudaUnavailable`] with the reason.

mod alloc;
pub mod blas;
pub mod registry;
pub mod selftest;

pub use alloc::{bucket, PoolStats};
pub use blas::Blas;
pub use registry::{arch_coverage, build_archs, ArchUse};

use crate::device::launch::{
    DevBuf, DevPtr, DeviceGemm, DeviceMemory, KernelArgs, KernelDevice, LaunchConfig, Launcher,
};
use crate::device::Device;
use crate::error::{Error, Result};
use alloc::CachingAllocator;
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use registry::KernelRegistry;
use std::sync::{Arc, Mutex, OnceLock};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use generated::{KERNEL_ARCHS, KERNEL_FUNCTIONS, KERNEL_MODULES, KERNEL_NVCC, KERNEL_PTX_ARCH};

/// Whether libcuda.so (the NVIDIA driver's user-space library) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen libcuda under its candidate names and closes
    // it again; it runs no driver code and touches no cudarc state.
    unsafe { sys::is_culib_present() }
}

/// `NAME (description)` of a driver error.
pub(crate) fn describe_driver_error(e: DriverError) -> String {
    let name = e.error_name().map_or_else(
        |_| format!("{:?}", e.0),
        |s| s.to_string_lossy().into_owned(),
    );
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// A failed driver call as the crate's error.
pub(crate) fn driver_error(op: &str, e: DriverError) -> Error {
    Error::Cuda {
        op: op.to_string(),
        msg: describe_driver_error(e),
    }
}

/// The CUDA version the kernels were compiled with, from `nvcc --version` (`release 13.0, ...`),
/// as the driver API encodes it (13000).
fn kernel_toolkit_version() -> Option<i32> {
    let rel = KERNEL_NVCC.split("release ").nth(1)?;
    let ver = rel.split(',').next()?.trim();
    let (major, minor) = ver.split_once('.')?;
    Some(major.parse::<i32>().ok()? * 1000 + minor.parse::<i32>().ok()? * 10)
}

fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// What was loaded, from where: printed at the top of `retrom3 selftest --device cuda`.
#[derive(Clone, Debug)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sm_count: i32,
    /// Shared memory one SM has for its resident blocks (bytes).
    pub smem_per_sm: usize,
    pub total_mem: usize,
    /// cuDriverGetVersion (13000 = CUDA 13.0).
    pub driver_version: i32,
    /// The libcuda file the process mapped (from /proc/self/maps).
    pub libcuda: Option<String>,
    /// How this GPU runs the kernels (native SASS or JIT-compiled PTX).
    pub arch_use: ArchUse,
    pub modules: usize,
    pub kernels: usize,
}

impl CudaInfo {
    /// One line: `NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB, driver CUDA 13.0`.
    pub fn summary(&self) -> String {
        format!(
            "{}, sm_{}{}, {} SMs, {:.1} GiB, driver CUDA {}, kernels: {} ({})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            self.total_mem as f64 / (1u64 << 30) as f64,
            version_text(self.driver_version),
            build_archs(),
            self.arch_use
        )
    }
}

/// The path of a shared library the process has mapped whose file name starts with `prefix`
/// (`libcuda.so`), from /proc/self/maps.
pub fn loaded_library(prefix: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(prefix))
        })
        .map(str::to_string)
}

/// A CUDA GPU with this build's kernels loaded.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: KernelRegistry,
    pool: Arc<CachingAllocator>,
    blas: OnceLock<std::result::Result<Blas, String>>,
    info: CudaInfo,
    /// The kernel most recently launched, named in errors that surface at the next synchronise.
    last_launch: Mutex<Option<String>>,
}

impl CudaDevice {
    /// Open GPU `ordinal`: check the driver, create the context and stream, check the
    /// architecture, load every kernel.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        if !driver_present() {
            return Err(Error::NoCudaDriver);
        }
        let mut driver_version = 0i32;
        // SAFETY: libcuda is present (checked above); cuDriverGetVersion only writes the int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| driver_error("cuDriverGetVersion", e))?;
        if let Some(need) = kernel_toolkit_version() {
            if driver_version < need {
                return Err(Error::CudaUnavailable(format!(
                    "the NVIDIA driver supports CUDA {}, but the kernels were built with CUDA {} \
                     ({KERNEL_NVCC}) and need a driver for CUDA {} or newer",
                    version_text(driver_version),
                    version_text(need),
                    version_text(need)
                )));
            }
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => {
                return Err(Error::CudaUnavailable(format!(
                    "the driver did not initialise: {}",
                    describe_driver_error(e)
                )))
            }
        };
        if count == 0 {
            return Err(Error::CudaUnavailable(
                "the NVIDIA driver is loaded but sees no GPU (CUDA_ERROR_NO_DEVICE; check \
                 nvidia-smi and CUDA_VISIBLE_DEVICES)"
                    .into(),
            ));
        }
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s) \
                 (cuda:0..cuda:{})",
                count - 1
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::CudaUnavailable(format!(
                "creating a context on cuda:{ordinal}: {}",
                describe_driver_error(e)
            ))
        })?;
        let name = ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| driver_error("compute capability query", e))?;
        let arch_use = arch_coverage(cc, KERNEL_ARCHS, KERNEL_PTX_ARCH)
            .map_err(|why| Error::CudaUnavailable(format!("cuda:{ordinal} ({name}): {why}")))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("multiprocessor count query", e))?;
        let smem_per_sm = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(|e| driver_error("shared memory per multiprocessor query", e))?;
        let total_mem = ctx
            .total_mem()
            .map_err(|e| driver_error("cuDeviceTotalMem", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        let kernels = KernelRegistry::load(&ctx)?;
        let (modules, nkernels) = kernels.counts();
        let pool = CachingAllocator::new(Arc::clone(&ctx), Arc::clone(&stream));
        let info = CudaInfo {
            ordinal,
            name,
            compute_capability: cc,
            sm_count,
            smem_per_sm: smem_per_sm.max(0) as usize,
            total_mem,
            driver_version,
            libcuda: loaded_library("libcuda.so"),
            arch_use,
            modules,
            kernels: nkernels,
        };
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            kernels,
            pool,
            blas: OnceLock::new(),
            info,
            last_launch: Mutex::new(None),
        })
    }

    /// The GPU, driver and kernel build.
    pub fn info(&self) -> &CudaInfo {
        &self.info
    }

    /// Several lines: device, driver (and the libcuda file), cuBLAS (loaded from where, or why
    /// not), kernels (modules, count, architectures).
    pub fn describe(&self) -> String {
        let i = &self.info;
        let blas = match self.blas() {
            Ok(_) => format!(
                "loaded from {}",
                loaded_library("libcublas.so").unwrap_or_else(|| "(path unknown)".into())
            ),
            Err(e) => format!("NOT available: {e}"),
        };
        format!(
            "device   cuda:{}  {}  compute capability {}.{}  {} SMs  {:.1} GiB\n\
             driver   CUDA {}  ({})\n\
             cublas   {blas}\n\
             kernels  {} modules, {} kernels, {} (this GPU: {}), built by nvcc {}",
            i.ordinal,
            i.name,
            i.compute_capability.0,
            i.compute_capability.1,
            i.sm_count,
            i.total_mem as f64 / (1u64 << 30) as f64,
            version_text(i.driver_version),
            i.libcuda.as_deref().unwrap_or("libcuda path unknown"),
            i.modules,
            i.kernels,
            build_archs(),
            i.arch_use,
            KERNEL_NVCC
        )
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation of this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// cuBLAS on this device's stream, created on first use (libcublas is loaded then).
    pub fn blas(&self) -> Result<&Blas> {
        self.blas
            .get_or_init(|| Blas::new(&self.stream))
            .as_ref()
            .map_err(|msg| Error::CudaUnavailable(msg.clone()))
    }

    /// A device buffer of `bytes` (contents undefined) from the caching allocator.
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.pool.alloc(bytes)
    }

    /// A zero-filled device buffer of `bytes` (zeroed on the stream).
    pub fn alloc_zeros(&self, bytes: usize) -> Result<DevBuf> {
        let buf = self.pool.alloc(bytes)?;
        self.bind()?;
        // SAFETY: buf addresses at least `bytes` bytes of device memory; the memset is queued on
        // the stream that every later use of the buffer goes to.
        unsafe { result::memset_d8_async(buf.ptr.0, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_error("cuMemsetD8Async", e))?;
        Ok(buf)
    }

    /// The allocator's counters.
    pub fn memory_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Give the allocator's free blocks back to the driver.
    pub fn release_cached_memory(&self) -> Result<()> {
        self.pool.release_cached()
    }

    /// Wait for everything queued on the stream. A kernel fault surfaces here (or at the next
    /// download); the error names the last kernel launched.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| self.sync_error(e))
    }

    fn sync_error(&self, e: DriverError) -> Error {
        let last = self
            .last_launch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "none".into());
        driver_error(
            &format!(
                "stream synchronize (last kernel launched: {last}; rerun with \
                 CUDA_LAUNCH_BLOCKING=1 or under compute-sanitizer to find the faulting one)"
            ),
            e,
        )
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))
    }
}

impl Launcher for CudaDevice {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn multiprocessors(&self) -> usize {
        self.info.sm_count.max(1) as usize
    }

    fn shared_memory_per_multiprocessor(&self) -> usize {
        self.info.smem_per_sm
    }

    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, args: &mut KernelArgs) -> Result<()> {
        let f = self.kernels.get(kernel).ok_or_else(|| Error::Unsupported {
            op: format!("kernel {kernel} (not in kernels/*.cu)"),
            device: self.device().to_string(),
        })?;
        self.bind()?;
        f.ensure_shared(kernel, cfg.shared_bytes)?;
        *self.last_launch.lock().unwrap_or_else(|p| p.into_inner()) = Some(kernel.to_string());
        // SAFETY: `f` was resolved from a module loaded on this context (kept alive by the
        // registry); `args.params()` holds one pointer per kernel parameter, pushed by the
        // wrappers of device::kernels in the .cu parameter order, and the driver copies the
        // values before returning; the caller guarantees that pointer arguments address live
        // device memory of the sizes the kernel uses.
        unsafe {
            sys::cuLaunchKernel(
                f.func.cu_function(),
                cfg.grid[0],
                cfg.grid[1],
                cfg.grid[2],
                cfg.block[0],
                cfg.block[1],
                cfg.block[2],
                cfg.shared_bytes,
                self.stream.cu_stream(),
                args.params(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| {
            driver_error(
                &format!(
                    "launch of {kernel} (grid {:?}, block {:?}, {} B shared)",
                    cfg.grid, cfg.block, cfg.shared_bytes
                ),
                e,
            )
        })
    }
}

impl KernelDevice for CudaDevice {
    fn upload(&self, bytes: &[u8]) -> Result<DevBuf> {
        let buf = self.pool.alloc(bytes.len())?;
        if !bytes.is_empty() {
            self.bind()?;
            // SAFETY: buf addresses at least bytes.len() bytes of device memory; the copy from
            // pageable host memory is staged before the call returns, so `bytes` may go away;
            // queued on the stream, it runs after earlier users of a reused block.
            unsafe { result::memcpy_htod_async(buf.ptr.0, bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_error(&format!("upload of {} bytes", bytes.len()), e))?;
        }
        Ok(buf)
    }

    fn download(&self, buf: &DevBuf, out: &mut [u8]) -> Result<()> {
        if out.len() > buf.bytes {
            return Err(Error::invalid(format!(
                "download of {} bytes from a {}-byte buffer",
                out.len(),
                buf.bytes
            )));
        }
        if out.is_empty() {
            return self.synchronize();
        }
        self.bind()?;
        // SAFETY: buf addresses at least out.len() bytes of device memory (checked above); the
        // copy is queued after the launches that write it, and `out` stays borrowed until the
        // stream synchronisation below has completed the copy.
        unsafe { result::memcpy_dtoh_async(out, buf.ptr.0, self.stream.cu_stream()) }
            .map_err(|e| driver_error(&format!("download of {} bytes", out.len()), e))?;
        self.stream.synchronize().map_err(|e| self.sync_error(e))
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf> {
        self.alloc_zeros(bytes)
    }

    fn memory(&self) -> Option<DeviceMemory> {
        let st = self.pool.stats();
        // What the driver has left, plus what this process holds (live and cached blocks).
        let free = self
            .bind()
            .ok()
            .and_then(|()| result::mem_get_info().ok())
            .map(|(free, _total)| free);
        Some(DeviceMemory {
            live: st.live_bytes,
            peak_live: st.peak_live_bytes,
            capacity: free.map(|f| f + st.live_bytes + st.cached_bytes),
        })
    }

    fn reset_memory_peak(&self) {
        self.pool.reset_peak_live();
    }

    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        CudaDevice::alloc(self, bytes)
    }

    unsafe fn write(&self, dst: DevPtr, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller guarantees `dst` addresses bytes.len() bytes of this device's
        // memory; the copy from pageable host memory is staged before the call returns (as in
        // `upload`), queued after earlier work on the stream.
        unsafe { result::memcpy_htod_async(dst.0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_error(&format!("write of {} bytes", bytes.len()), e))
    }

    unsafe fn memset_zero(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller guarantees `ptr` addresses `bytes` bytes of this device's memory;
        // queued on the stream every user of the buffer goes to.
        unsafe { result::memset_d8_async(ptr.0, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_error("cuMemsetD8Async", e))
    }

    unsafe fn copy_d2d(&self, src: DevPtr, dst: DevPtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller guarantees both ranges are live device memory of this context.
        unsafe { result::memcpy_dtod_async(dst.0, src.0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_error(&format!("device copy of {bytes} bytes"), e))
    }

    unsafe fn gemm(&self, g: &DeviceGemm, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        let blas = self.blas()?;
        // SAFETY: the caller guarantees the operand sizes (DeviceGemm's contract).
        unsafe { blas.gemm(g, a, b, c) }
    }

    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }

    fn name(&self) -> String {
        self.info().name.clone()
    }

    fn cuda_stream(&self) -> Option<u64> {
        Some(self.stream.cu_stream() as u64)
    }
}

/// The kernel build, for `retrom3 --version`: `kernels: 6 CUDA modules (SASS sm_80 sm_90 + PTX
/// compute_90), nvcc <version>`.
pub fn kernel_build() -> String {
    let kernels: usize = KERNEL_FUNCTIONS.iter().map(|(_, n)| n.len()).sum();
    format!(
        "kernels: {} CUDA modules, {kernels} kernels ({}), {KERNEL_NVCC}",
        KERNEL_MODULES.len(),
        build_archs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolkit_version_is_parsed_from_nvcc() {
        let v = kernel_toolkit_version();
        if KERNEL_NVCC.contains("release ") {
            assert!(v.is_some_and(|v| v >= 11000), "{KERNEL_NVCC} -> {v:?}");
        }
        assert_eq!(version_text(13000), "13.0");
        assert_eq!(version_text(12090), "12.9");
    }

    #[test]
    fn no_driver_is_a_clean_error_not_a_panic() {
        if driver_present() {
            return; // a GPU machine: the selftest covers opening the device.
        }
        assert!(matches!(CudaDevice::new(0), Err(Error::NoCudaDriver)));
    }

    #[test]
    fn kernel_build_names_the_archs() {
        let s = kernel_build();
        assert!(s.contains("sm_") && s.contains("compute_"), "{s}");
    }
}
