//! The module registry: every embedded fatbin (one per kernels/*.cu, built by build.rs) is loaded
//! once per device, and every kernel each file exports (its `R3_EMU_EXPORT` lines, the same names
//! the launch wrappers in `device::kernels` and the emulator use) is resolved at start-up, so a
//! kernel missing from the build fails when the device opens, naming it, not mid-training.

use super::{driver_error, KERNEL_ARCHS, KERNEL_FUNCTIONS, KERNEL_MODULES, KERNEL_PTX_ARCH};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute_enum as FnAttr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// One resolved kernel.
pub struct KernelFn {
    pub func: CudaFunction,
    /// The kernels/*.cu file stem it comes from.
    pub module: &'static str,
    /// Dynamic shared memory known to be allowed (0 until a launch asks for some).
    smem_opt_in: AtomicU32,
}

impl KernelFn {
    /// Make sure a launch may use `bytes` of dynamic shared memory: the driver's default limit is
    /// 48 KiB less the kernel's static shared memory (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    /// read once), and more needs the attribute raised (up to the device's opt-in maximum less
    /// the static part; the driver refuses beyond, and the error names the kernel and the size).
    pub fn ensure_shared(&self, name: &str, bytes: u32) -> Result<()> {
        if bytes == 0 || bytes <= self.smem_opt_in.load(Ordering::Relaxed) {
            return Ok(());
        }
        let allowed = self
            .func
            .get_attribute(FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
            .map_err(|e| driver_error(&format!("dynamic shared memory limit of {name}"), e))?
            .max(0) as u32;
        if bytes > allowed {
            self.func
                .set_attribute(
                    FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| {
                    driver_error(&format!("opt-in to {bytes} B shared memory for {name}"), e)
                })?;
        }
        self.smem_opt_in
            .fetch_max(bytes.max(allowed), Ordering::Relaxed);
        Ok(())
    }
}

/// Every kernel of the build, by name, loaded on one context.
pub struct KernelRegistry {
    _modules: Vec<Arc<CudaModule>>,
    functions: HashMap<&'static str, KernelFn>,
}

impl KernelRegistry {
    /// Load every embedded fatbin and resolve every exported kernel.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<KernelRegistry> {
        let mut modules = Vec::with_capacity(KERNEL_MODULES.len());
        let mut functions = HashMap::new();
        for &(stem, image) in KERNEL_MODULES {
            let module = ctx
                .load_module(Ptx::from_binary(image.to_vec()))
                .map_err(|e| {
                    Error::CudaUnavailable(format!(
                        "loading the fatbin of kernels/{stem}.cu: {}",
                        super::describe_driver_error(e)
                    ))
                })?;
            let names = KERNEL_FUNCTIONS
                .iter()
                .find(|(s, _)| *s == stem)
                .map_or(&[][..], |(_, n)| *n);
            for &name in names {
                let func = module.load_function(name).map_err(|e| {
                    Error::CudaUnavailable(format!(
                        "kernel {name} (exported by kernels/{stem}.cu) is not in its fatbin: {}",
                        super::describe_driver_error(e)
                    ))
                })?;
                let entry = KernelFn {
                    func,
                    module: stem,
                    smem_opt_in: AtomicU32::new(0),
                };
                if let Some(prev) = functions.insert(name, entry) {
                    return Err(Error::CudaUnavailable(format!(
                        "kernel {name} is exported by both kernels/{}.cu and kernels/{stem}.cu",
                        prev.module
                    )));
                }
            }
            modules.push(module);
        }
        Ok(KernelRegistry {
            _modules: modules,
            functions,
        })
    }

    /// The kernel called `name`, if the build has it.
    pub fn get(&self, name: &str) -> Option<&KernelFn> {
        self.functions.get(name)
    }

    /// Number of modules and kernels loaded.
    pub fn counts(&self) -> (usize, usize) {
        (self._modules.len(), self.functions.len())
    }
}

/// How a GPU runs this build's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchUse {
    /// Native code for `sm_<n>` (same major, minor at most the GPU's).
    Sass(u32),
    /// The `compute_<n>` PTX, JIT-compiled by the driver at module load.
    PtxJit(u32),
}

impl std::fmt::Display for ArchUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchUse::Sass(a) => write!(f, "SASS sm_{a}"),
            ArchUse::PtxJit(a) => write!(f, "PTX compute_{a}, JIT-compiled at load"),
        }
    }
}

/// The architectures of this build, as `SASS sm_80 sm_90 + PTX compute_90`.
pub fn build_archs() -> String {
    let sass: Vec<String> = KERNEL_ARCHS.iter().map(|a| format!("sm_{a}")).collect();
    format!("SASS {} + PTX compute_{KERNEL_PTX_ARCH}", sass.join(" "))
}

/// Whether a GPU of compute capability `cc` can run kernels built with SASS for `sass` and PTX
/// for `ptx`: SASS runs on the same major with an equal or higher minor (sm_80 on an sm_86);
/// PTX is JIT-compiled on any GPU of that architecture or newer. Otherwise a refusal naming both.
pub fn arch_coverage(
    cc: (i32, i32),
    sass: &[u32],
    ptx: u32,
) -> std::result::Result<ArchUse, String> {
    let gpu = (cc.0.max(0) * 10 + cc.1.max(0)) as u32;
    if let Some(&a) = sass
        .iter()
        .filter(|&&a| a / 10 == gpu / 10 && a % 10 <= gpu % 10)
        .max()
    {
        return Ok(ArchUse::Sass(a));
    }
    if gpu >= ptx {
        return Ok(ArchUse::PtxJit(ptx));
    }
    let sass: Vec<String> = sass.iter().map(|a| format!("sm_{a}")).collect();
    Err(format!(
        "the GPU's compute capability {}.{} (sm_{gpu}) is not covered by this build's kernels \
         (SASS {}, PTX compute_{ptx}); rebuild with CUDA_COMPUTE_CAP={gpu} (if the kernels support \
         that architecture)",
        cc.0,
        cc.1,
        sass.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_follows_the_binary_compatibility_rules() {
        let sass = [80, 90];
        assert_eq!(arch_coverage((8, 0), &sass, 90), Ok(ArchUse::Sass(80)));
        assert_eq!(arch_coverage((8, 6), &sass, 90), Ok(ArchUse::Sass(80)));
        assert_eq!(arch_coverage((8, 9), &sass, 90), Ok(ArchUse::Sass(80)));
        assert_eq!(arch_coverage((9, 0), &sass, 90), Ok(ArchUse::Sass(90)));
        assert_eq!(arch_coverage((10, 0), &sass, 90), Ok(ArchUse::PtxJit(90)));
        assert_eq!(arch_coverage((12, 0), &sass, 90), Ok(ArchUse::PtxJit(90)));
        let e = arch_coverage((7, 5), &sass, 90).unwrap_err();
        assert!(
            e.contains("7.5") && e.contains("sm_80 sm_90") && e.contains("compute_90"),
            "{e}"
        );
        // sm_86 SASS does not run on an sm_80.
        assert!(arch_coverage((8, 0), &[86], 86).is_err());
    }

    #[test]
    fn every_module_has_its_kernel_list() {
        for (stem, _) in KERNEL_MODULES {
            let names = KERNEL_FUNCTIONS.iter().find(|(s, _)| s == stem);
            assert!(
                names.is_some_and(|(_, n)| !n.is_empty()),
                "kernels/{stem}.cu exports nothing"
            );
        }
    }
}
