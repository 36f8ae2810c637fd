//! Devices: where tensors live and kernels run. `Cpu` is the reference and the default.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
pub mod kernels;
pub mod kernels_m3;
pub mod launch;

use crate::error::{Error, Result};
use std::str::FromStr;

/// The CUDA kernel build, for `retrom3 --version`: modules, kernels, architectures (SASS and
/// PTX) and the nvcc that compiled them, or that this build has none.
pub fn kernel_build() -> String {
    #[cfg(feature = "cuda")]
    return cuda::kernel_build();
    #[cfg(not(feature = "cuda"))]
    return "kernels: none (built without the `cuda` feature)".to_string();
}

/// A compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The reference CPU engine (plain Rust, f32 with f64 accumulation where it matters).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature and an NVIDIA driver).
    Cuda(usize),
    /// The CUDA kernels compiled as host C++ and run on CPU threads (needs the `emu` feature):
    /// checks kernel logic without a GPU, not speed (docs/emulation.md).
    Emu,
}

impl Device {
    /// Check that this build can run on the device, with a clear error otherwise.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Emu => {
                if cfg!(feature = "emu") {
                    Ok(())
                } else {
                    Err(Error::FeatureMissing("emu"))
                }
            }
            Device::Cuda(_) => {
                if cfg!(feature = "cuda") {
                    Ok(())
                } else {
                    Err(Error::FeatureMissing("cuda"))
                }
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Emu => f.write_str("emu"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "emu" => Ok(Device::Emu),
            // Digits only: `parse` also takes a sign ("cuda:+0").
            _ => match s
                .strip_prefix("cuda:")
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .map(str::parse::<usize>)
            {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::invalid(format!(
                    "unknown device '{s}' (expected cpu, cuda, cuda:N or emu)"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn device_names() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("emu", Device::Emu),
            ("cuda", Device::Cuda(0)),
            ("cuda:0", Device::Cuda(0)),
            ("cuda:12", Device::Cuda(12)),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d, "{s}");
        }
        // A sign, a space, no digits, an overflowing index, another name: refused.
        for s in [
            "cuda:+0",
            "cuda:-1",
            "cuda: 1",
            "cuda:",
            "cuda:99999999999999999999999",
            "CPU",
            "gpu",
        ] {
            let e = s.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{s}: {e}");
        }
    }
}
