//! The built-in presets: the defaults every other layer is put over (see DESIGN.md's table),
//! and the ones that depend on where the workers run.

use anyhow::{bail, Result};

use super::job::{
    default_tensorboard_every_steps, ClusterConfig, JobConfig, OptimizerConfig, TlsConfig,
};
use super::model_spec::ModelConfig;
use super::names::{Activation, Backend, ModelKind, OptimizerKind};

/// Names of the built-in presets, in the order the README lists them.
pub const PRESETS: [&str; 5] = ["softmax", "mlp-sigmoid", "mlp", "mlp-leaky", "cnn"];

/// Where the workers run: the defaults that depend on it are decided here, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deployment {
    /// Spawned by `lockstep train` on this machine.
    Local,
    /// Started elsewhere, joining over the network (`lockstep train --external-workers`).
    External,
}

impl Deployment {
    /// The backend when no layer names one. Local CPU workers all-reduce among themselves
    /// (`tcp`: 35% faster than `grpc` with 2 workers on 2 cores, issue 10); external ones go
    /// through the coordinator (`grpc`), which needs no direct connection between workers.
    pub fn default_backend(self) -> Backend {
        match self {
            Deployment::Local => Backend::Tcp,
            Deployment::External => Backend::Grpc,
        }
    }

    /// The coordinator's address when no layer names one: loopback on a free port for local
    /// workers; every interface on the well-known port for external ones (containers,
    /// clusters).
    pub fn default_listen(self) -> &'static str {
        match self {
            Deployment::Local => "127.0.0.1:0",
            Deployment::External => "0.0.0.0:50051",
        }
    }

    /// The metrics and dashboard address when no layer names one: loopback on a free port for
    /// local workers; with external workers, every interface on 9090 (a pod's network).
    pub fn default_metrics_addr(self) -> &'static str {
        match self {
            Deployment::Local => "127.0.0.1:0",
            Deployment::External => "0.0.0.0:9090",
        }
    }

    /// A run's configuration as the defaults of its resumption deployed as `self`: an
    /// address that was the other deployment's default becomes this one's (addresses belong to
    /// a launch, not to the run); one the run was given stays.
    pub fn defaults_from_run(self, run: &JobConfig) -> JobConfig {
        let mut defaults = run.clone();
        for other in [Deployment::Local, Deployment::External] {
            if other == self {
                continue;
            }
            if defaults.listen == other.default_listen() {
                defaults.listen = self.default_listen().to_string();
            }
            if defaults.metrics_addr == other.default_metrics_addr() {
                defaults.metrics_addr = self.default_metrics_addr().to_string();
            }
        }
        defaults
    }
}

impl JobConfig {
    /// The built-in defaults of a preset for local workers (see DESIGN.md's table).
    pub fn preset(name: &str) -> Result<Self> {
        Self::defaults(name, Deployment::Local)
    }

    /// The built-in defaults of a preset for workers deployed as `deployment` says.
    pub fn defaults(name: &str, deployment: Deployment) -> Result<Self> {
        let mlp = |hidden: Vec<usize>, activation| ModelConfig {
            kind: ModelKind::Mlp,
            hidden,
            activation,
            leaky_slope: 0.1,
        };
        let sgd = |lr| OptimizerConfig {
            kind: OptimizerKind::Sgd,
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            lr_decay: 1.0,
        };
        let adam = |lr| OptimizerConfig {
            kind: OptimizerKind::Adam,
            ..sgd(lr)
        };
        let (model, optimizer, batch_size, epochs) = match name {
            "softmax" => (mlp(vec![], Activation::Relu), sgd(0.1), 100, 15),
            "mlp-sigmoid" => (mlp(vec![20], Activation::Sigmoid), sgd(0.1), 100, 17),
            "mlp" => (mlp(vec![100, 100], Activation::Relu), adam(1e-3), 64, 3),
            "mlp-leaky" => (mlp(vec![256], Activation::LeakyRelu), adam(1e-4), 200, 10),
            // Halving the rate every epoch (StepLR, as PyTorch's MNIST example decays its own)
            // takes this dropout-free CNN past 99% test accuracy in 3 epochs; a constant rate
            // plateaus near 98.7-98.8% (measured on an H100, see the README).
            "cnn" => (
                ModelConfig {
                    kind: ModelKind::Cnn,
                    ..mlp(vec![], Activation::Relu)
                },
                OptimizerConfig {
                    lr_decay: 0.5,
                    ..adam(1e-3)
                },
                64,
                3,
            ),
            other => bail!(
                "unknown preset `{other}`: choose one of {}",
                PRESETS.join(", ")
            ),
        };
        Ok(JobConfig {
            preset: name.to_string(),
            epochs,
            batch_size,
            seed: 42,
            workers: 2,
            backend: deployment.default_backend(),
            data_dir: None,
            out: None,
            listen: deployment.default_listen().to_string(),
            normalize: true,
            threads: 0,
            train_samples: 0,
            checkpoint_every_steps: 500,
            max_restarts: 0,
            metrics_addr: deployment.default_metrics_addr().to_string(),
            tensorboard_every_steps: default_tensorboard_every_steps(),
            model,
            optimizer,
            cluster: ClusterConfig {
                heartbeat_interval_ms: 500,
                heartbeat_timeout_ms: 5000,
                join_timeout_s: 120,
                digest_every: 200,
                step_timeout_s: 300,
                shards: 0,
                min_workers: 1,
                max_workers: 0,
                shared_memory: true,
            },
            tls: TlsConfig::default(),
        })
    }
}
