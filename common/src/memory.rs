//! Whether a job fits in memory, checked before anything large is allocated. A model too big
//! for the machine would otherwise end the process with the allocator's abort (`memory
//! allocation of N bytes failed`, a core dump) somewhere in the middle of starting; here it is
//! refused up front, with the parameter count, the bytes needed and the bytes available.
//!
//! The need is a lower bound: the buffers whose size follows from the configuration alone
//! (parameters, optimizer state, gradients in flight, serialised states, the dataset), not the
//! activations or the allocator's overhead. A job refused here cannot run; a job admitted may
//! still be tight. The memory available is the smaller of the kernel's estimate
//! (`MemAvailable` in `/proc/meminfo`) and the headroom under the process's cgroup limit (a
//! container's memory limit); where neither can be read, the check is skipped.

use std::fmt;

use anyhow::{bail, Result};

use crate::config::{Backend, JobConfig};
use crate::optim::Optimizer;

/// Bytes of one parameter (`f32`).
const F32: u64 = 4;
/// The coordinator's copy of MNIST: 70,000 images of 784 pixels and their labels.
const MNIST_BYTES: u64 = 70_000 * 785;

/// What a process of the job needs, part by part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// `coordinator` or `worker`.
    pub role: &'static str,
    /// The model, described.
    pub model: String,
    /// Parameters of the model.
    pub parameters: u64,
    /// The buffers counted, with their sizes in bytes.
    pub parts: Vec<(&'static str, u64)>,
}

impl Need {
    /// Bytes needed in all (saturating: a sum that overflows is more than any machine has).
    pub fn bytes(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |sum, (_, b)| sum.saturating_add(*b))
    }

    /// The coordinator: its replica, the average gradient and the shard gradients of the
    /// `steps_in_flight` steps whose work is out (grpc), the serialised states it keeps for
    /// joining workers and writes as checkpoints, the evaluation's copy, and MNIST.
    pub fn coordinator(config: &JobConfig, parameters: u64, steps_in_flight: u64) -> Self {
        let p = parameters.saturating_mul(F32);
        let state = p.saturating_mul(1 + optimizer_buffers(config));
        let mut parts = vec![("parameters and optimizer state", state)];
        if config.backend == Backend::Grpc {
            let shards = u64::from(config.shards());
            parts.push(("the average gradient", p));
            parts.push((
                "shard gradients of the steps in flight",
                p.saturating_mul(shards).saturating_mul(steps_in_flight),
            ));
        }
        parts.push((
            "serialised states (for joining workers, checkpoints)",
            state.saturating_mul(2),
        ));
        parts.push(("the evaluation's copy of the parameters", p));
        parts.push(("MNIST", MNIST_BYTES));
        Self {
            role: "coordinator",
            model: config.model.describe(),
            parameters,
            parts,
        }
    }

    /// A worker: its state, the model's parameters on the compute device, a shard gradient
    /// and its encoding, the average it applies, a state transfer, and with tcp the shard
    /// gradients that rank 0 sums (any worker may become rank 0).
    pub fn worker(config: &JobConfig, parameters: u64) -> Self {
        let p = parameters.saturating_mul(F32);
        let state = p.saturating_mul(1 + optimizer_buffers(config));
        let mut parts = vec![
            ("parameters and optimizer state", state),
            ("the model's parameters on the device", p),
            ("a shard gradient and its encoding", p.saturating_mul(2)),
            ("the average gradient", p),
            ("a state transfer", state),
        ];
        if config.backend == Backend::Tcp {
            parts.push((
                "the shard gradients rank 0 sums",
                p.saturating_mul(u64::from(config.shards())),
            ));
        }
        Self {
            role: "worker",
            model: config.model.describe(),
            parameters,
            parts,
        }
    }
}

/// Buffers as long as the parameters that the configured optimizer keeps (Adam 2, SGD with
/// momentum 1, plain SGD 0).
fn optimizer_buffers(config: &JobConfig) -> u64 {
    Optimizer::new(config.optimizer.clone(), 0)
        .state()
        .buffers
        .len() as u64
}

/// Memory this process can still use, and where that figure comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Available {
    /// Bytes.
    pub bytes: u64,
    /// Where the figure comes from, for the error message.
    pub source: String,
}

/// The memory available to this process: the smaller of `MemAvailable` and the headroom under
/// its cgroup's limit; `None` where neither is known (not Linux, or no `/proc`).
pub fn available() -> Option<Available> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available(&text))
        .map(|bytes| Available {
            bytes,
            source: "MemAvailable in /proc/meminfo".into(),
        });
    let cgroup = cgroup_headroom();
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.bytes < m.bytes { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// The limit of this process's cgroup (v2, else v1's memory controller) minus its current
/// usage; `None` where there is no limit.
fn cgroup_headroom() -> Option<Available> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let number = |path: &str| read(path).and_then(|t| t.trim().parse::<u64>().ok());
    let cgroups = read("/proc/self/cgroup").unwrap_or_default();
    // Lines are `ID:CONTROLLERS:PATH`; v2's is `0::PATH` (`/` inside a container's namespace).
    let path_of = |wanted: Option<&str>| {
        cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = match wanted {
                None => controllers.is_empty(),
                Some(c) => controllers.split(',').any(|x| x == c),
            };
            matches.then(|| path.trim().trim_end_matches('/').to_string())
        })
    };
    let limits = [
        path_of(None).map(|p| (format!("/sys/fs/cgroup{p}"), "memory.max", "memory.current")),
        path_of(Some("memory")).map(|p| {
            let dir = format!("/sys/fs/cgroup/memory{p}");
            (dir, "memory.limit_in_bytes", "memory.usage_in_bytes")
        }),
        Some((
            "/sys/fs/cgroup/memory".to_string(),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        )),
    ];
    limits
        .into_iter()
        .flatten()
        .find_map(|(dir, limit, usage)| {
            let file = format!("{dir}/{limit}");
            // No limit reads `max` (v2) or a number near i64::MAX (v1).
            let limit = number(&file).filter(|&l| l < 1 << 60)?;
            let used = number(&format!("{dir}/{usage}")).unwrap_or(0);
            Some(Available {
                bytes: limit.saturating_sub(used),
                source: format!("the cgroup limit in {file}, less what the cgroup uses"),
            })
        })
}

/// Refuses a job that needs more memory than is available, naming the parameters, the bytes
/// needed (part by part) and the bytes available. Passes when the available memory is unknown.
pub fn check(need: &Need, available: Option<&Available>) -> Result<()> {
    let Some(available) = available else {
        tracing::info!(
            "the memory available is unknown on this system; not checking that the {} fits",
            need.role
        );
        return Ok(());
    };
    if need.bytes() <= available.bytes {
        return Ok(());
    }
    let parts: Vec<String> = need
        .parts
        .iter()
        .map(|(what, bytes)| format!("{what} {}", Bytes(*bytes)))
        .collect();
    bail!(
        "the {role} does not fit in memory: `{model}` has {parameters} parameters, and the {role} needs at least \
         {need} ({parts}), but {available} are available ({source}); choose a smaller model{hint}, or a machine \
         with more memory",
        role = need.role,
        model = need.model,
        parameters = need.parameters,
        need = Bytes(need.bytes()),
        parts = parts.join(", "),
        available = Bytes(available.bytes),
        source = available.source,
        hint = if need.role == "coordinator" {
            ", fewer cluster.shards"
        } else {
            ""
        },
    )
}

/// A byte count for people: `318000000040 bytes (296.2 GiB)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let (unit, size) = match b {
            _ if b >= 1 << 30 => ("GiB", (1u64 << 30) as f64),
            _ if b >= 1 << 20 => ("MiB", (1u64 << 20) as f64),
            _ if b >= 1 << 10 => ("KiB", 1024.0),
            _ => return write!(f, "{b} bytes"),
        };
        write!(f, "{b} bytes ({:.1} {unit})", b as f64 / size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(preset: &str) -> JobConfig {
        let mut c = JobConfig::preset(preset).unwrap();
        c.resolve();
        c
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16314268 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(mem_available(text), Some(12_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots\n"), None);
    }

    #[test]
    fn a_job_that_does_not_fit_is_refused_naming_parameters_and_both_sizes() {
        let mut c = config("mlp");
        // With grpc the coordinator holds every shard's gradient.
        c.backend = Backend::Grpc;
        c.cluster.shards = 1024;
        let need = Need::coordinator(&c, 12_000_000, 3);
        // 1024 shards of a 48 MB gradient, three steps deep: about 147 GB.
        assert!(need.bytes() > 140_000_000_000, "{need:?}");
        let available = Available {
            bytes: 8 << 30,
            source: "a test".into(),
        };
        let err = check(&need, Some(&available)).unwrap_err().to_string();
        for part in [
            "coordinator does not fit in memory",
            "12000000 parameters",
            "shard gradients of the steps in flight 147456000000 bytes",
            "8589934592 bytes (8.0 GiB) are available (a test)",
            "fewer cluster.shards",
        ] {
            assert!(err.contains(part), "`{part}` missing: {err}");
        }
        assert!(check(&need, None).is_ok(), "unknown memory is not checked");
    }

    #[test]
    fn the_presets_fit_in_a_small_container() {
        let small = Available {
            bytes: 512 << 20,
            source: "a test".into(),
        };
        for preset in crate::config::PRESETS {
            let c = config(preset);
            let parameters = crate::model::parameter_count(&c.model).unwrap();
            check(&Need::coordinator(&c, parameters, 3), Some(&small)).unwrap();
            check(&Need::worker(&c, parameters), Some(&small)).unwrap();
        }
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let c = config("mlp");
        assert_eq!(Need::coordinator(&c, u64::MAX, 3).bytes(), u64::MAX);
        assert_eq!(Bytes(1536).to_string(), "1536 bytes (1.5 KiB)");
        assert_eq!(Bytes(12).to_string(), "12 bytes");
    }
}
