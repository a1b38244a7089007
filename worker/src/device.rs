//! `--device cpu|cuda:N` to a candle device, with a clear refusal when CUDA is unavailable.

use anyhow::{bail, Result};
use candle_core::Device;

/// A parsed `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!("unknown device `{s}`: use `cpu` or `cuda:N` (N = GPU index, from 0)"),
            },
        }
    }

    /// True when this build can use this device at all.
    pub fn supported(&self) -> bool {
        match self {
            DeviceSpec::Cpu => true,
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// Opens the device.
    pub fn open(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device cuda:{n}: this lockstep-worker was built without the `cuda` feature; rebuild with \
                         `cargo build --release --features cuda` on a machine with the CUDA toolkit"
                    );
                }
                // An explicit stream (not the per-thread default one), so every kernel and the
                // NCCL all-reduce of this worker are ordered on one stream whatever the thread.
                Device::new_cuda_with_stream(n).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open CUDA device {n}: {e}; check that the NVIDIA driver is loaded, that \
                         CUDA_VISIBLE_DEVICES exposes at least {} GPU(s), and that libcuda is on the library path",
                        n + 1
                    )
                })
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_cuda_is_refused_without_the_feature() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("without the `cuda` feature"), "{err}");
        }
    }
}
