//! How a worker's shard gradients become the step's average: one trait, [`AllReduce`], with
//! one implementation per backend, chosen once when the worker is configured (the step loop in
//! [`crate::step_loop`] never asks which backend it runs):
//!
//! - [`CoordinatorReduce`] (`grpc`): every shard gradient goes to the coordinator, which sums
//!   the step's shards in shard order and sends the average back as a message.
//! - [`tcp::TcpCollective`] (`tcp`): CPU workers send their shards to the membership's rank 0,
//!   which runs the coordinator's very summation and sends the average back; ranks on one host
//!   share memory instead ([`shm`]), and each runs that summation itself.
//! - `nccl::Nccl` (`nccl`, feature `cuda`): an NCCL all-reduce between GPUs.
//!
//! The collective backends are formed anew for every membership ([`Former`]): rank 0 creates
//! a rendezvous (tcp: an address and a secret; nccl: a unique id), the coordinator relays it to
//! the other ranks ([`Bootstrap`]), and every rank connects.

pub mod link;
pub mod shm;
pub mod tcp;

#[cfg(feature = "cuda")]
pub mod nccl;

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use lockstep_common::model::{BatchStats, Gradients};
use lockstep_common::protocol::{FromWorker, ShardGradient, Stamp};

use crate::abort::{AbortSignal, Interrupted};
use crate::state::Averaged;
use crate::stream::Outbox;

/// The step a worker's shard gradients belong to.
#[derive(Clone, Copy, Debug)]
pub struct StepWork {
    /// The step and the membership it was given under.
    pub id: Stamp,
    /// Samples in the whole global batch.
    pub global_count: u32,
    /// Shards the global batch is cut into.
    pub shard_count: u32,
}

/// One shard's gradient, computed by this worker.
pub struct ShardResult {
    /// Which shard.
    pub index: u32,
    /// The gradient of the shard's summed loss.
    pub gradient: Gradients,
    /// Its statistics, when read from the device already (always on CPUs).
    pub stats: Option<BatchStats>,
    /// Samples in the shard.
    pub samples: u32,
    /// Echo of the shard's indices.
    pub indices_digest: u64,
    /// Time spent computing it.
    pub compute_ms: f32,
    /// This worker's previous step: waiting for its average, and applying it (grpc reports
    /// them with the next step's gradients).
    pub previous: (f32, f32),
}

/// The model diverged: a gradient or the parameters hold NaN or infinity. No change of
/// membership helps; the coordinator ends the job.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// Whether `e` is (or wraps) a divergence.
pub fn is_diverged(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Diverged>())
}

/// A backend's all-reduce.
pub trait AllReduce: Send {
    /// Contributes this worker's shard gradients of `step` (in shard order). Returns the step's
    /// average once it is known here: at once for a collective, which exchanges with its peers
    /// before returning; `None` when it arrives later as a message (grpc).
    fn submit(&mut self, step: &StepWork, shards: Vec<ShardResult>) -> Result<Option<Averaged>>;
}

/// The grpc backend: the coordinator is the reducer.
pub struct CoordinatorReduce {
    out: Outbox,
}

impl CoordinatorReduce {
    /// Sends shard gradients on `out`.
    pub fn new(out: Outbox) -> Self {
        Self { out }
    }
}

impl AllReduce for CoordinatorReduce {
    fn submit(&mut self, step: &StepWork, shards: Vec<ShardResult>) -> Result<Option<Averaged>> {
        for s in shards {
            let stats = s.stats.unwrap_or(BatchStats {
                samples: s.samples,
                ..Default::default()
            });
            let msg = FromWorker::Gradient(ShardGradient {
                id: step.id,
                shard: s.index,
                stats,
                data: Bytes::from(s.gradient.to_bytes()?),
                compute_ms: s.compute_ms,
                indices_digest: s.indices_digest,
                wait_ms: s.previous.0,
                apply_ms: s.previous.1,
            });
            if !self.out.send(msg) {
                bail!(
                    "the step stream closed while sending the gradient of {}",
                    step.id.id
                );
            }
        }
        Ok(None)
    }
}

/// What a collective is formed through: the coordinator's relay of rank 0's rendezvous.
pub struct Bootstrap<'a> {
    /// Where rank 0 publishes.
    pub out: &'a Outbox,
    /// Rendezvous relayed by the coordinator, with their memberships.
    pub relayed: &'a std_mpsc::Receiver<(Bytes, u64)>,
    /// Tripped when the coordinator pauses this membership before it is formed.
    pub abort: &'a AbortSignal,
    /// How long the ranks wait for each other.
    pub timeout: Duration,
}

impl Bootstrap<'_> {
    /// Rank 0: sends its rendezvous for `membership` to the coordinator.
    pub fn publish(&self, membership: u64, blob: Vec<u8>) -> Result<()> {
        let msg = FromWorker::Rendezvous {
            blob: Bytes::from(blob),
            membership,
        };
        anyhow::ensure!(
            self.out.send(msg),
            "the step stream closed before the collective was formed"
        );
        Ok(())
    }

    /// Other ranks: waits for rank 0's rendezvous of `membership` (earlier ones are stale).
    pub fn await_relay(&self, membership: u64) -> Result<Bytes> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.abort.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "rank 0's rendezvous for membership {membership} did not arrive within {}s",
                    self.timeout.as_secs()
                );
            }
            match self
                .relayed
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok((blob, m)) if m == membership => return Ok(blob),
                Ok((_, m)) => tracing::debug!("dropping the rendezvous of membership {m}"),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Interrupted).context("the step stream closed")
                }
            }
        }
    }
}

/// Forms a backend's collective for one membership.
pub trait Former: Send {
    /// This worker's end of membership `membership`'s collective, as rank `rank` of `world`.
    fn form(
        &mut self,
        membership: u64,
        rank: u32,
        world: u32,
        boot: &Bootstrap<'_>,
    ) -> Result<Box<dyn AllReduce>>;
}
