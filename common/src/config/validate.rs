//! Checks of a resolved configuration: settings that cannot train, and sizes a job cannot
//! carry, are refused with a message naming the setting.

use anyhow::{anyhow, bail, Result};

use super::job::{JobConfig, TlsConfig};
use super::names::Backend;

impl TlsConfig {
    fn validate(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("tls.cert and tls.key go together (the coordinator's certificate and its private key)");
        }
        if !self.enabled() && !self.is_unset() {
            bail!("tls.client_ca, tls.ca, tls.worker_cert and tls.worker_key need tls.cert and tls.key");
        }
        if self.worker_cert.is_some() != self.worker_key.is_some() {
            bail!("tls.worker_cert and tls.worker_key go together");
        }
        Ok(())
    }
}

impl JobConfig {
    /// Refuses settings that cannot train, with a message naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("epochs must be at least 1");
        }
        if self.workers == 0 {
            bail!("workers must be at least 1");
        }
        let c = &self.cluster;
        let shards = self.shards();
        if self.batch_size < shards {
            if c.shards == 0 {
                bail!(
                    "batch size {} is smaller than the worker count {}: every worker needs at least one \
                     sample per step; raise --batch-size or lower --workers",
                    self.batch_size,
                    self.workers
                );
            }
            bail!(
                "batch size {} is smaller than cluster.shards ({shards}): every shard needs at least one sample \
                 per step; raise --batch-size or lower cluster.shards",
                self.batch_size
            );
        }
        if self.batch_size > crate::protocol::MAX_GLOBAL_BATCH {
            bail!(
                "batch size {} is larger than the {} a step can carry",
                self.batch_size,
                crate::protocol::MAX_GLOBAL_BATCH
            );
        }
        if shards > crate::protocol::MAX_SHARDS {
            bail!(
                "cluster.shards is {shards}; at most {} are supported",
                crate::protocol::MAX_SHARDS
            );
        }
        if self.workers > shards {
            bail!(
                "{} workers but only {shards} shards per step (cluster.shards): {} workers would have nothing to \
                 compute; raise cluster.shards or lower --workers",
                self.workers,
                self.workers - shards
            );
        }
        if c.min_workers == 0 || c.min_workers > self.workers {
            bail!(
                "cluster.min_workers must be between 1 and the starting worker count {}, got {}",
                self.workers,
                c.min_workers
            );
        }
        if c.max_workers != 0 && c.max_workers < self.workers {
            bail!(
                "cluster.max_workers ({}) is below the starting worker count {}",
                c.max_workers,
                self.workers
            );
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", o.lr);
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            bail!(
                "Adam betas must be in [0, 1), got {} and {}",
                o.beta1,
                o.beta2
            );
        }
        if !(o.lr_decay.is_finite() && o.lr_decay > 0.0 && o.lr_decay <= 1.0) {
            bail!("optimizer.lr_decay must be in (0, 1], got {}", o.lr_decay);
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            bail!("Adam eps must be positive, got {}", o.eps);
        }
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(non_negative(o.momentum) && non_negative(o.weight_decay)) {
            bail!("momentum and weight_decay must be non-negative");
        }
        if self.model.hidden.contains(&0) {
            bail!(
                "hidden layer widths must be positive, got {:?}",
                self.model.hidden
            );
        }
        if c.heartbeat_interval_ms == 0 || c.heartbeat_timeout_ms <= c.heartbeat_interval_ms {
            bail!(
                "cluster.heartbeat_timeout_ms ({}) must exceed cluster.heartbeat_interval_ms ({}), which must be positive",
                c.heartbeat_timeout_ms,
                c.heartbeat_interval_ms
            );
        }
        if c.step_timeout_s == 0 {
            bail!("cluster.step_timeout_s must be at least 1");
        }
        if c.digest_every == 0 {
            bail!("cluster.digest_every must be at least 1");
        }
        self.tls.validate()?;
        // Upper bounds. A configuration comes from a user, and to a worker from the coordinator
        // at join time: neither may ask for more than a job can carry, nor for a model whose
        // allocation would abort the process. The model's training state travels in one state
        // transfer (at most MAX_STATE_BYTES); with grpc its gradient travels in one message.
        {
            const MAX_EPOCHS: u32 = 100_000;
            const MAX_HIDDEN_LAYERS: usize = 64;
            const MAX_THREADS: u32 = 1024;
            const MAX_RESTARTS: u32 = 10_000;
            const MAX_HEARTBEAT_TIMEOUT_MS: u32 = 3_600_000;
            const MAX_TIMEOUT_S: u32 = 86_400;
            let at_most = |key: &str, value: u64, limit: u64| -> Result<()> {
                if value > limit {
                    bail!("{key} is {value}; at most {limit} is supported");
                }
                Ok(())
            };
            at_most("epochs", self.epochs.into(), MAX_EPOCHS.into())?;
            at_most("threads", self.threads.into(), MAX_THREADS.into())?;
            at_most(
                "max_restarts",
                self.max_restarts.into(),
                MAX_RESTARTS.into(),
            )?;
            let max_workers = crate::protocol::MAX_SHARDS.into();
            at_most("workers", self.workers.into(), max_workers)?;
            at_most("cluster.max_workers", c.max_workers.into(), max_workers)?;
            let interval = crate::protocol::MAX_HEARTBEAT_INTERVAL_MS.into();
            at_most(
                "cluster.heartbeat_interval_ms",
                c.heartbeat_interval_ms.into(),
                interval,
            )?;
            let timeout = MAX_HEARTBEAT_TIMEOUT_MS.into();
            at_most(
                "cluster.heartbeat_timeout_ms",
                c.heartbeat_timeout_ms.into(),
                timeout,
            )?;
            at_most(
                "cluster.join_timeout_s",
                c.join_timeout_s.into(),
                MAX_TIMEOUT_S.into(),
            )?;
            at_most(
                "cluster.step_timeout_s",
                c.step_timeout_s.into(),
                MAX_TIMEOUT_S.into(),
            )?;
            let layers = self.model.hidden.len() as u64;
            at_most(
                "the number of hidden layers (model.hidden)",
                layers,
                MAX_HIDDEN_LAYERS as u64,
            )?;
            if !self.model.leaky_slope.is_finite() {
                bail!(
                    "model.leaky_slope must be a number, got {}",
                    self.model.leaky_slope
                );
            }
            let describe = self.model.describe();
            let parameters = crate::model::parameter_count(&self.model).ok_or_else(|| {
                anyhow!("`{describe}` has more parameters than a 64-bit count holds")
            })?;
            let buffers = crate::optim::Optimizer::new(self.optimizer.clone(), 0)
                .state()
                .buffers
                .len() as u64;
            let state = parameters.saturating_mul(4 * (1 + buffers));
            // The serialised state also holds its header and this configuration.
            let state_limit = crate::MAX_STATE_BYTES - 2 * crate::protocol::MAX_CONFIG_BYTES as u64;
            if state > state_limit {
                bail!(
                    "`{describe}` has {parameters} parameters: its training state (parameters and {buffers} optimizer \
                     buffer(s) of 4 bytes each) is {}, more than the {} that a state transfer carries; choose a \
                     smaller model",
                    crate::memory::Bytes(state),
                    crate::memory::Bytes(state_limit)
                );
            }
            // A gradient message is the flat buffer and a few small fields.
            let message_limit = crate::MAX_MESSAGE_BYTES as u64 - 4096;
            let gradient = parameters.saturating_mul(4);
            if self.backend == Backend::Grpc && gradient > message_limit {
                bail!(
                    "`{describe}` has {parameters} parameters: its gradient is {}, more than the {} that a gRPC \
                     message carries; use --backend tcp (the workers exchange gradients directly) or a smaller model",
                    crate::memory::Bytes(gradient),
                    crate::memory::Bytes(message_limit)
                );
            }
        }
        Ok(())
    }
}
