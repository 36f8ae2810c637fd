//! `Device::Emu`: the real kernels/*.cu compiled as host C++ (feature `emu`, see build.rs and
//! docs/emulation.md) and run on CPU threads. Kernels are found by name, as on CUDA, in the table
//! build.rs generates from the files' `R3_EMU_EXPORT` lines; "device memory" is host memory.

pub mod host;

use crate::device::cpu::gemm::sgemm;
use crate::device::launch::{
    DevBuf, DevPtr, DeviceGemm, DeviceMemory, KDType, KernelArgs, KernelDevice, LaunchConfig,
    Launcher,
};
use crate::device::Device;
use crate::error::{Error, Result};
use std::ffi::{c_void, CStr};

/// The launch record of kernels/emu/emu.cuh (`struct r3emu_launch`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmuLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    workers: u32,
    schedule: u32,
}

/// How the threads of an emulated block take turns (kernels/emu/runtime.cpp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum Schedule {
    /// Every thread runs to its next barrier or warp operation, in thread order: the warps of a
    /// block advance together (the default).
    #[default]
    Lockstep = 0,
    /// Each warp in turn, warp 0 first, runs as far as it can (to its next `__syncthreads`):
    /// a warp is a whole barrier interval ahead of the later ones, so a shared-memory write
    /// (or a `cp.async`) into data another warp has yet to read shows up without a barrier.
    WarpSerial = 1,
    /// The same from the last warp down, each warp's lanes from the last down (readers ahead of
    /// writers the other way round).
    WarpSerialReverse = 2,
    /// Lockstep in descending thread order: a lane (or warp) that reads what a lower one wrote
    /// with no `__syncwarp` / `__syncthreads` between them reads it before it is written.
    Reverse = 3,
}

impl Schedule {
    /// All schedules, for sweeps.
    pub const ALL: [Schedule; 4] = [
        Schedule::Lockstep,
        Schedule::Reverse,
        Schedule::WarpSerial,
        Schedule::WarpSerialReverse,
    ];

    /// The name `R3EMU_SCHEDULE` takes: `lockstep`, `reverse`, `warp`, `warp-reverse`.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Lockstep => "lockstep",
            Schedule::Reverse => "reverse",
            Schedule::WarpSerial => "warp",
            Schedule::WarpSerialReverse => "warp-reverse",
        }
    }

    /// Parses a name of [`Schedule::name`].
    pub fn parse(s: &str) -> Result<Schedule> {
        Schedule::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "emulator schedule (R3EMU_SCHEDULE) {s:?}: expected lockstep, reverse, warp \
                     or warp-reverse"
                ))
            })
    }
}

/// An emulated kernel entry point: `r3emu_<kernel>(cfg, args)`, 0 on success.
pub type EmuEntry = unsafe extern "C" fn(cfg: *const EmuLaunch, args: *mut *mut c_void) -> i32;

mod generated {
    use super::{EmuEntry, EmuLaunch};
    use std::ffi::c_void;
    include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));
}
pub use generated::EMU_KERNELS;

unsafe extern "C" {
    /// The message of the last failed launch on the calling thread (a NUL-terminated string owned
    /// by the emulator, valid until the next launch on this thread).
    fn r3emu_last_error() -> *const std::ffi::c_char;
}

/// Every kernel name the emulator provides (mutants included, named `mutant_<tag>_<kernel>`).
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    EMU_KERNELS.iter().map(|(n, _)| *n)
}

fn entry(name: &str) -> Option<EmuEntry> {
    EMU_KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, e)| *e)
}

/// The emulated device. `workers` OS threads share a launch's blocks (threads of a block are
/// fibers on one of them); `substitutes` reroute a kernel name to another (the mutation test).
#[derive(Clone, Debug)]
pub struct EmuDevice {
    workers: u32,
    schedule: Schedule,
    substitutes: Vec<(String, String)>,
    /// Bytes that may be live at once (`R3EMU_MEMORY_LIMIT`; None: no limit), and the live count
    /// shared by every buffer of this device: lets tests drive the out-of-memory paths.
    limit: Option<usize>,
    live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Most bytes live at once since the last `reset_memory_peak`.
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// An emulated allocation: its storage, and the live-byte count it gives back when dropped.
struct EmuAlloc {
    _store: Vec<u128>,
    bytes: usize,
    live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for EmuAlloc {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for EmuDevice {
    fn default() -> EmuDevice {
        EmuDevice::new()
    }
}

impl EmuDevice {
    /// Workers from `R3EMU_WORKERS`, else the machine's parallelism (at most 8); the schedule
    /// from `R3EMU_SCHEDULE` (lockstep when unset; a name it does not know is reported on stderr
    /// once and lockstep used: [`EmuDevice::try_new`] refuses it instead).
    pub fn new() -> EmuDevice {
        EmuDevice::try_new().unwrap_or_else(|e| {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("warning: {e}; using lockstep"));
            EmuDevice::with_env_schedule(Schedule::Lockstep)
        })
    }

    /// [`EmuDevice::new`], with an unknown `R3EMU_SCHEDULE` an error.
    pub fn try_new() -> Result<EmuDevice> {
        let schedule = match std::env::var("R3EMU_SCHEDULE") {
            Ok(v) if !v.is_empty() => Schedule::parse(&v)?,
            _ => Schedule::Lockstep,
        };
        Ok(EmuDevice::with_env_schedule(schedule))
    }

    fn with_env_schedule(schedule: Schedule) -> EmuDevice {
        let workers = std::env::var("R3EMU_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get().min(8) as u32)
            });
        EmuDevice {
            workers: workers.max(1),
            schedule,
            substitutes: Vec::new(),
            limit: std::env::var("R3EMU_MEMORY_LIMIT")
                .ok()
                .and_then(|v| v.parse().ok()),
            live: Default::default(),
            peak: Default::default(),
        }
    }

    /// Refuse allocations that would take the live bytes over `bytes`.
    pub fn with_memory_limit(mut self, bytes: usize) -> EmuDevice {
        self.limit = Some(bytes);
        self
    }

    /// A zero-filled allocation of `bytes`, counted against the limit.
    fn take(&self, bytes: usize) -> Result<(DevPtr, EmuAlloc)> {
        use std::sync::atomic::Ordering;
        let now = self.live.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if let Some(limit) = self.limit.filter(|&l| now > l) {
            self.live.fetch_sub(bytes, Ordering::SeqCst);
            return Err(Error::OutOfMemory {
                device: "emu".into(),
                requested: bytes,
                detail: format!("{} bytes live of a {limit}-byte limit", now - bytes),
            });
        }
        self.peak.fetch_max(now, Ordering::SeqCst);
        let mut store = vec![0u128; bytes.div_ceil(16).max(1)];
        let ptr = DevPtr(store.as_mut_ptr() as u64);
        Ok((
            ptr,
            EmuAlloc {
                _store: store,
                bytes,
                live: self.live.clone(),
            },
        ))
    }

    /// Take turns between a block's threads this way.
    pub fn with_schedule(mut self, schedule: Schedule) -> EmuDevice {
        self.schedule = schedule;
        self
    }

    /// The schedule launches use.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Run blocks on `n` OS threads (1: deterministic order of atomics).
    pub fn with_workers(mut self, n: u32) -> EmuDevice {
        self.workers = n.max(1);
        self
    }

    /// Launch kernel `to` whenever `from` is asked for (e.g. a mutant in place of the real one).
    pub fn substitute(mut self, from: &str, to: &str) -> EmuDevice {
        self.substitutes.push((from.to_string(), to.to_string()));
        self
    }
}

impl Launcher for EmuDevice {
    fn device(&self) -> Device {
        Device::Emu
    }

    /// One: grid-stride kernels then run the fewest blocks, so each warp walks several work
    /// items (the loop the GPU runs at scale is exercised at selftest sizes).
    fn multiprocessors(&self) -> usize {
        1
    }

    /// An H100's 228 KiB.
    fn shared_memory_per_multiprocessor(&self) -> usize {
        228 << 10
    }

    unsafe fn launch(&self, kernel: &str, cfg: &LaunchConfig, args: &mut KernelArgs) -> Result<()> {
        let kernel = self
            .substitutes
            .iter()
            .find(|(from, _)| from == kernel)
            .map_or(kernel, |(_, to)| to.as_str());
        let f = entry(kernel).ok_or_else(|| Error::Unsupported {
            op: format!("kernel {kernel} (not in kernels/*.cu)"),
            device: "emu".into(),
        })?;
        let launch = EmuLaunch {
            grid: cfg.grid,
            block: cfg.block,
            shared_bytes: cfg.shared_bytes,
            workers: self.workers,
            schedule: self.schedule as u32,
        };
        // SAFETY: `f` is an r3emu_ entry generated for this kernel; `args` holds one pointer per
        // kernel parameter (the wrappers in device::kernels push them in the .cu order), and the
        // caller guarantees the pointer arguments address live host memory of the stated sizes.
        let rc = unsafe { f(&launch, args.params()) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: r3emu_last_error returns a NUL-terminated string owned by the emulator.
        let msg = unsafe { CStr::from_ptr(r3emu_last_error()) }
            .to_string_lossy()
            .into_owned();
        Err(Error::invalid(format!(
            "emulated launch of {kernel} failed: {msg}"
        )))
    }
}

impl KernelDevice for EmuDevice {
    fn upload(&self, bytes: &[u8]) -> Result<DevBuf> {
        // u128 storage: 16-byte alignment, as cudaMalloc's 256 bytes is for the vector loads.
        let (ptr, alloc) = self.take(bytes.len())?;
        // SAFETY: the allocation owns at least bytes.len() bytes at ptr.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.0 as *mut u8, bytes.len());
        }
        Ok(DevBuf::new(ptr, bytes.len(), Box::new(alloc)))
    }

    fn download(&self, buf: &DevBuf, out: &mut [u8]) -> Result<()> {
        if out.len() > buf.bytes {
            return Err(Error::invalid(format!(
                "download of {} bytes from a {}-byte buffer",
                out.len(),
                buf.bytes
            )));
        }
        // SAFETY: `buf` was made by `upload`: ptr addresses `buf.bytes` live bytes kept alive by
        // the buffer's owner box; launches are synchronous, so no kernel writes it concurrently.
        let src = unsafe { std::slice::from_raw_parts(buf.ptr.0 as *const u8, out.len()) };
        out.copy_from_slice(src);
        Ok(())
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf> {
        let (ptr, alloc) = self.take(bytes)?;
        Ok(DevBuf::new(ptr, bytes, Box::new(alloc)))
    }

    /// Filled with 0xFF bytes (NaN in f32 and bf16): CUDA's pool hands back old memory unzeroed,
    /// so a kernel that reads (or accumulates into) a buffer nothing wrote would pass on zeroes
    /// here and fail on a GPU; NaN makes it fail here too.
    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let (ptr, alloc) = self.take(bytes)?;
        // SAFETY: the allocation owns at least `bytes` bytes at ptr.
        unsafe { std::ptr::write_bytes(ptr.0 as *mut u8, 0xFF, bytes) };
        Ok(DevBuf::new(ptr, bytes, Box::new(alloc)))
    }

    fn memory(&self) -> Option<DeviceMemory> {
        use std::sync::atomic::Ordering;
        Some(DeviceMemory {
            live: self.live.load(Ordering::SeqCst),
            peak_live: self.peak.load(Ordering::SeqCst),
            capacity: self.limit,
        })
    }

    fn reset_memory_peak(&self) {
        use std::sync::atomic::Ordering;
        self.peak
            .store(self.live.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    unsafe fn write(&self, dst: DevPtr, bytes: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees `dst` addresses bytes.len() live bytes (host memory here).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.0 as *mut u8, bytes.len()) };
        Ok(())
    }

    unsafe fn memset_zero(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees `ptr` addresses `bytes` live bytes (host memory here).
        unsafe { std::ptr::write_bytes(ptr.0 as *mut u8, 0, bytes) };
        Ok(())
    }

    unsafe fn copy_d2d(&self, src: DevPtr, dst: DevPtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees both ranges are live and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.0 as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn gemm(&self, g: &DeviceGemm, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        // SAFETY: the caller guarantees the operand sizes in their storage types.
        unsafe {
            let a = read_f32(a, g.ab, g.m * g.k);
            let b = read_f32(b, g.ab, g.k * g.n);
            let mut cv = if g.beta == 0.0 {
                vec![0.0; g.m * g.n]
            } else {
                read_f32(c, g.c, g.m * g.n)
            };
            sgemm(g.ta, g.tb, g.m, g.k, g.n, g.alpha, &a, &b, g.beta, &mut cv);
            write_f32(c, g.c, &cv);
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// n elements at `p` as f32.
///
/// # Safety
/// `p` must address n live elements of `dt`.
unsafe fn read_f32(p: DevPtr, dt: KDType, n: usize) -> Vec<f32> {
    // SAFETY: per the function contract.
    unsafe {
        match dt {
            KDType::F32 => std::slice::from_raw_parts(p.0 as *const f32, n).to_vec(),
            KDType::BF16 => std::slice::from_raw_parts(p.0 as *const half::bf16, n)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
        }
    }
}

/// Store `v` at `p` as `dt` (round to nearest for bf16).
///
/// # Safety
/// `p` must address v.len() live elements of `dt`.
unsafe fn write_f32(p: DevPtr, dt: KDType, v: &[f32]) {
    // SAFETY: per the function contract.
    unsafe {
        match dt {
            KDType::F32 => {
                std::slice::from_raw_parts_mut(p.0 as *mut f32, v.len()).copy_from_slice(v)
            }
            KDType::BF16 => std::slice::from_raw_parts_mut(p.0 as *mut half::bf16, v.len())
                .iter_mut()
                .zip(v)
                .for_each(|(o, &x)| *o = half::bf16::from_f32(x)),
        }
    }
}
