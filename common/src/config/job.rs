//! The job configuration's shape: [`JobConfig`] and its sections, what a run saves in
//! `config.toml` and sends to every worker, and what a resumed run may change.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model_spec::ModelConfig;
use super::names::{Backend, OptimizerKind};

/// Optimizer settings; which fields apply depends on `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `sgd` or `adam`.
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// SGD momentum (0 disables).
    pub momentum: f64,
    /// Nesterov momentum for SGD.
    pub nesterov: bool,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`).
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// The learning rate is multiplied by this after every epoch (PyTorch's
    /// `StepLR(step_size=1, gamma=lr_decay)`); 1 keeps it constant.
    pub lr_decay: f64,
}

/// Membership and failure-detection settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How often a worker sends a heartbeat on its stream.
    pub heartbeat_interval_ms: u32,
    /// A worker silent for this long is declared dead.
    pub heartbeat_timeout_ms: u32,
    /// How long the coordinator waits for all workers to join.
    pub join_timeout_s: u32,
    /// Workers report a parameter digest every this many steps (and at every epoch end).
    pub digest_every: u32,
    /// A worker whose part of a step is not in after this long, although its heartbeats come,
    /// is dropped as stalled (and the job ends if that leaves fewer than `min_workers`).
    pub step_timeout_s: u32,
    /// Shards each step's global batch is cut into; each shard's gradient is computed on its
    /// own and the shard gradients are summed in shard order, so the model does not depend on
    /// how many workers computed them. 0: the starting worker count.
    pub shards: u32,
    /// The job carries on after losing workers as long as at least this many are left.
    pub min_workers: u32,
    /// Most workers at once; replacements may join a running job up to this count. 0: the
    /// starting worker count.
    pub max_workers: u32,
    /// `tcp` backend: ranks on one host exchange gradients through shared memory (`/dev/shm`)
    /// instead of their sockets, when every rank can map it; false keeps them on the sockets.
    #[serde(default = "shared_memory_default")]
    pub shared_memory: bool,
}

fn shared_memory_default() -> bool {
    true
}

/// TLS on the coordinator's port (see the README's Security section). Paths to PEM files; all
/// unset: plaintext. Each is also a flag (`--tls-cert` for `cert`, …), over every other layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS: the coordinator's certificate chain (PEM); with the key its port speaks only TLS
    /// (tls.cert).
    #[arg(long = "tls-cert", id = "tls_cert", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// TLS: the coordinator's private key, readable by its owner only (tls.key).
    #[arg(long = "tls-key", id = "tls_key", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Mutual TLS: workers must present a certificate signed by this CA (tls.client_ca).
    #[arg(long = "tls-client-ca", id = "tls_client_ca", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// TLS with local workers (and `lockstep health`): the CA that signed the certificate, which
    /// they trust (tls.ca).
    #[arg(long = "tls-ca", id = "tls_ca", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Mutual TLS with local workers: the certificate they present (tls.worker_cert).
    #[arg(long = "tls-worker-cert", id = "tls_worker_cert", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_cert: Option<PathBuf>,
    /// Its private key (tls.worker_key).
    #[arg(long = "tls-worker-key", id = "tls_worker_key", value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_key: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the coordinator serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }

    pub(super) fn is_unset(&self) -> bool {
        *self == TlsConfig::default()
    }
}

/// The metrics endpoint's default in a saved configuration without one: local workers'.
fn default_metrics_addr() -> String {
    super::Deployment::Local.default_metrics_addr().to_string()
}

/// TensorBoard's default step interval.
pub(super) fn default_tensorboard_every_steps() -> u32 {
    50
}

/// Everything that defines a training job. A key it does not have (a typo such as
/// `optimiser`) is refused, naming the key and the known ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// The preset the defaults came from.
    pub preset: String,
    /// Passes over the training set.
    pub epochs: u32,
    /// Global minibatch size, split across the workers.
    pub batch_size: u32,
    /// Seeds initialisation and the per-epoch shuffles; same seed, same model, bit for bit.
    pub seed: u64,
    /// Number of workers (local processes to spawn, or external ones to wait for).
    pub workers: u32,
    /// Gradient all-reduce: `grpc` (CPU, through the coordinator), `tcp` (CPU, among the
    /// workers) or `nccl` (GPUs). Unset: `tcp` for local workers, `grpc` for external ones
    /// ([`super::Deployment::default_backend`]).
    pub backend: Backend,
    /// Folder holding the MNIST IDX files; unset: download into the cache folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Run directory; unset: `runs/<preset>-<timestamp>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// Address the coordinator listens on.
    pub listen: String,
    /// Standardise inputs with MNIST's mean 0.1307 and std 0.3081 (after scaling to [0,1]).
    pub normalize: bool,
    /// Compute threads per worker; 0 picks cores / workers for local workers.
    pub threads: u32,
    /// Train on only the first N training images (0: all 60,000), for quick experiments.
    pub train_samples: u32,
    /// Besides every epoch end, checkpoint after every this many steps of an epoch (0: only at
    /// epoch ends).
    pub checkpoint_every_steps: u32,
    /// Local workers (`lockstep train` without `--external-workers`): how many times in all a
    /// worker that died is started again, as `torchrun --max-restarts` does.
    pub max_restarts: u32,
    /// Where the coordinator serves Prometheus `/metrics` and the live dashboard `/` over
    /// HTTP: `HOST:PORT` (port 0 picks a free one, printed at start), or `off`.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: String,
    /// TensorBoard: besides every epoch's scalars, log the training loss and throughput every
    /// this many steps (0: per epoch only).
    #[serde(default = "default_tensorboard_every_steps")]
    pub tensorboard_every_steps: u32,
    /// The network.
    pub model: ModelConfig,
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// Failure detection.
    pub cluster: ClusterConfig,
    /// TLS on the coordinator's port.
    #[serde(default, skip_serializing_if = "TlsConfig::is_unset")]
    pub tls: TlsConfig,
}

impl JobConfig {
    /// Parses a configuration that was already resolved (the one a worker receives).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: JobConfig = toml::from_str(text).context("parsing the job configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML, as saved in `config.toml` and sent to workers.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("a JobConfig always serialises to TOML")
    }

    /// Shards per step: `cluster.shards`, or the starting worker count when that is 0.
    pub fn shards(&self) -> u32 {
        match self.cluster.shards {
            0 => self.workers,
            n => n,
        }
    }

    /// Most workers at once: `cluster.max_workers`, or the starting worker count when 0.
    pub fn max_workers(&self) -> u32 {
        match self.cluster.max_workers {
            0 => self.workers,
            n => n,
        }
    }

    /// Writes the shard count (by default the starting worker count) into the configuration,
    /// so that the saved `config.toml` says what the job computed with, and a resumed job keeps
    /// it whatever its worker count.
    pub fn resolve(&mut self) {
        self.cluster.shards = self.shards();
    }

    /// The settings of `resumed` that would make a resumed run compute something else than this
    /// one (model, optimizer, data, schedule, shards, seed), each as `key: run has A, now B`.
    /// Worker counts, timeouts, addresses, the number of epochs and the CPU backend may change.
    pub fn resume_conflicts(&self, resumed: &JobConfig) -> Vec<String> {
        const FREE: [&str; 14] = [
            "tls",
            "preset",
            "epochs",
            "workers",
            "data_dir",
            "out",
            "listen",
            "threads",
            "checkpoint_every_steps",
            "max_restarts",
            "metrics_addr",
            "tensorboard_every_steps",
            "backend",
            "cluster",
        ];
        const ARITHMETIC_CLUSTER: [&str; 1] = ["shards"];
        let table = |c: &JobConfig| toml::Table::try_from(c).unwrap_or_default();
        let (ours, theirs) = (table(self), table(resumed));
        let mut conflicts = Vec::new();
        let mut compare = |key: String, a: Option<&toml::Value>, b: Option<&toml::Value>| {
            if a != b {
                let show =
                    |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
                conflicts.push(format!("{key}: the run has {}, now {}", show(a), show(b)));
            }
        };
        let keys: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
        for key in keys {
            if FREE.contains(&key.as_str()) {
                continue;
            }
            match (ours.get(key), theirs.get(key)) {
                (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                    let inner: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                    for k in inner {
                        compare(format!("{key}.{k}"), a.get(k), b.get(k));
                    }
                }
                (a, b) => compare(key.clone(), a, b),
            }
        }
        for key in ARITHMETIC_CLUSTER {
            compare(
                format!("cluster.{key}"),
                ours.get("cluster").and_then(|c| c.get(key)),
                theirs.get("cluster").and_then(|c| c.get(key)),
            );
        }
        let gpu = |b: Backend| b == Backend::Nccl;
        if gpu(self.backend) != gpu(resumed.backend) {
            conflicts.push(format!(
                "backend: the run has {}, now {} (grpc and tcp give the same bits; nccl does not)",
                self.backend, resumed.backend
            ));
        }
        conflicts
    }

    /// Fingerprint of what a worker must agree with: the network and its input transform.
    pub fn model_fingerprint(&self) -> String {
        let canonical = format!("{}|normalize={}", self.model.describe(), self.normalize);
        hex::encode(&Sha256::digest(canonical.as_bytes())[..8])
    }
}
