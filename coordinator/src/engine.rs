//! The training loop, top to bottom: wait for the workers; then for each epoch, for each step,
//! stream every rank its share of the global batch (pipelined ahead), gather the ranks'
//! gradients, sum them **in rank order** (so the result does not depend on arrival order),
//! average, send the average back, and apply the same optimizer step to the coordinator's own
//! replica; after each epoch, evaluate on the test set, checkpoint and log metrics.
//!
//! Failure handling: a closed stream, a silent worker (no message within the heartbeat
//! timeout), an exited worker process, a malformed gradient or a parameter digest that differs
//! from the coordinator's all stop the job at once with an error that names the worker and the
//! step; the last checkpoint stays intact.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::codec::{self, digest};
use lockstep_common::config::Backend;
use lockstep_common::mnist::{Mnist, IMAGE_PIXELS};
use lockstep_common::model::{evaluate, BatchStats, Network};
use lockstep_common::optim::Optimizer;
use lockstep_common::schedule;
use lockstep_common::wire::pb;
use tokio::sync::mpsc;

use crate::progress::EpochProgress;
use crate::run_dir::{EpochMetrics, RunDir, Summary};
use crate::service::{Event, Shared, WorkerTx};

/// How many steps ahead of the one being reduced the coordinator streams batches. (A deeper
/// queue for NCCL workers, which do not wait on the coordinator, measured no faster on an H100.)
const PIPELINE_DEPTH: u64 = 2;
/// How often the engine looks for silent workers while it waits.
const LIVENESS_CHECK: Duration = Duration::from_millis(200);
/// Test images per evaluation forward pass.
const EVAL_BATCH: usize = 2000;

/// One rank's report for a step: its gradient (gRPC mode) and its batch statistics.
struct StepReport {
    stats: BatchStats,
    gradient: Option<Bytes>,
}

impl StepReport {
    /// The step report in a worker message (`Gradient` in gRPC mode, `StepDone` in NCCL
    /// mode) with its step id; any other message is handed back.
    fn from_message(msg: pb::WorkerMessage) -> Result<(pb::StepId, Self), pb::WorkerMessage> {
        use pb::worker_message::Kind;
        let (id, loss_sum, correct, samples, gradient) = match msg.kind {
            Some(Kind::Gradient(g)) => (g.id, g.loss_sum, g.correct, g.samples, Some(g.data)),
            Some(Kind::StepDone(d)) => (d.id, d.loss_sum, d.correct, d.samples, None),
            kind => return Err(pb::WorkerMessage { kind }),
        };
        let stats = BatchStats {
            loss_sum,
            correct,
            samples,
        };
        Ok((id.unwrap_or_default(), Self { stats, gradient }))
    }
}

/// The coordinator's training loop and the replica it keeps.
pub struct Engine {
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    data: Arc<Mnist>,
    network: Network,
    params: Vec<f32>,
    optimizer: Optimizer,
    run: RunDir,
    txs: Vec<WorkerTx>,
    own_digests: HashMap<(u64, u64), String>,
    pending_digests: Vec<(u32, pb::Digest)>,
    /// Latest (epoch, step) at which each rank's digest matched.
    verified: Vec<Option<(u64, u64)>>,
    last_checkpoint: Option<std::path::PathBuf>,
    bytes_moved: u64,
    /// The reducer's output buffer, reused every step.
    average: Vec<f32>,
    /// Reports for steps after the one being collected: in collective modes a fast rank runs
    /// ahead of a slow one (by up to the pipeline depth), so its next reports can arrive
    /// before the slow rank's current one.
    early: Vec<(u32, pb::StepId, StepReport)>,
    started: Instant,
}

/// Where the loop currently is, for error messages.
#[derive(Clone, Copy)]
struct Here {
    epoch: u64,
    step: u64,
    steps: u64,
}

impl Engine {
    /// An engine that will train `network` from `initial`.
    pub fn new(
        shared: Arc<Shared>,
        events: mpsc::UnboundedReceiver<Event>,
        data: Arc<Mnist>,
        network: Network,
        initial: TrainingState,
        run: RunDir,
    ) -> Result<Self> {
        let optimizer = Optimizer::with_state(
            shared.config.optimizer.clone(),
            network.num_params(),
            initial.optimizer.clone(),
        )?;
        Ok(Self {
            shared,
            events,
            data,
            network,
            params: initial.params,
            optimizer,
            run,
            txs: Vec::new(),
            own_digests: HashMap::new(),
            pending_digests: Vec::new(),
            verified: Vec::new(),
            last_checkpoint: None,
            bytes_moved: 0,
            average: Vec::new(),
            early: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Runs the whole job. On error, every connected worker is told to abort.
    pub async fn run(mut self) -> Result<Summary> {
        let mut result = self.train().await;
        if let Err(e) = &result {
            let also = self.concurrent_failures(&format!("{e:#}")).await;
            if !also.is_empty() {
                result = Err(anyhow!("{e:#}; at the same time: {}", also.join("; ")));
            }
        }
        match &result {
            Ok(_) => {
                self.broadcast(pb::coordinator_message::Kind::Finish(pb::Finish {
                    message: "training finished".into(),
                }))
                .await
            }
            Err(e) => {
                self.broadcast(pb::coordinator_message::Kind::Abort(pb::Abort {
                    reason: format!("{e:#}"),
                }))
                .await
            }
        }
        result
    }

    /// Other workers that failed within a moment of the failure that ended the job, with their
    /// reasons: when one rank fails, its peers in an all-reduce fail with it, and which report
    /// comes first is a race; the root cause may be in any of them.
    async fn concurrent_failures(&mut self, first: &str) -> Vec<String> {
        const GRACE: Duration = Duration::from_millis(300);
        let deadline = tokio::time::Instant::now() + GRACE;
        let mut seen: Vec<u32> = Vec::new();
        let mut also = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Event::StreamClosed { rank, reason } = event {
                let who = self.shared.describe(rank);
                if !seen.contains(&rank) && !first.contains(&who) {
                    seen.push(rank);
                    also.push(format!("{who} failed ({reason})"));
                }
            }
        }
        also
    }

    async fn broadcast(&self, kind: pb::coordinator_message::Kind) {
        for tx in &self.txs {
            let _ = tx
                .send(Ok(pb::CoordinatorMessage {
                    kind: Some(kind.clone()),
                }))
                .await;
        }
    }

    async fn train(&mut self) -> Result<Summary> {
        self.wait_for_workers().await?;
        let cfg = self.shared.config.clone();
        let n_train = match cfg.train_samples as usize {
            0 => self.data.train_len(),
            n => n.min(self.data.train_len()),
        };
        let batch = cfg.batch_size as usize;
        let steps = schedule::steps_per_epoch(n_train, batch) as u64;
        let mut last: Option<EpochMetrics> = None;
        let mut train_seconds = 0.0;
        for epoch in 0..cfg.epochs as u64 {
            let perm = schedule::epoch_permutation(cfg.seed, epoch, n_train);
            self.optimizer.set_epoch(epoch);
            let mut progress = EpochProgress::start(epoch + 1, cfg.epochs as u64, steps);
            let epoch_started = Instant::now();
            let bytes_before = self.bytes_moved;
            let mut totals = BatchStats::default();
            let mut sent = 0;
            for step in 0..steps {
                let here = Here { epoch, step, steps };
                while sent < steps && sent <= step + PIPELINE_DEPTH {
                    self.send_batches(&perm, epoch, sent, steps, here).await?;
                    sent += 1;
                }
                let reports = self.collect(here).await?;
                for r in &reports {
                    totals.loss_sum += r.stats.loss_sum;
                    totals.correct += r.stats.correct;
                    totals.samples += r.stats.samples;
                }
                if cfg.backend == Backend::Grpc {
                    self.reduce_and_apply(reports, here).await?;
                    if schedule::digest_due(step, cfg.cluster.digest_every, step + 1 == steps) {
                        let d = codec::state_digest(&self.params, self.optimizer.state());
                        self.own_digests.insert((epoch, step), d);
                    }
                    self.check_digests()?;
                }
                progress.update(
                    step + 1,
                    totals.samples as u64,
                    totals.loss_sum / totals.samples.max(1) as f64,
                );
            }
            progress.finish();
            let epoch_seconds = epoch_started.elapsed().as_secs_f64();
            train_seconds += epoch_seconds;
            if cfg.backend.is_collective() {
                self.receive_pushed_state(Here {
                    epoch,
                    step: steps,
                    steps,
                })
                .await?;
            }
            let eval_started = Instant::now();
            let test = self.evaluate().await?;
            let eval_seconds = eval_started.elapsed().as_secs_f64();
            let state = TrainingState {
                params: self.params.clone(),
                optimizer: self.optimizer.state().clone(),
                position: Position {
                    epoch: epoch + 1,
                    step: 0,
                },
            };
            let path = self.run.save_checkpoint(
                epoch + 1,
                &state,
                &self.shared.layout,
                &self.shared.config_toml,
            )?;
            self.last_checkpoint = Some(path);
            let m = EpochMetrics {
                epoch: epoch + 1,
                train_loss: totals.loss_sum / totals.samples.max(1) as f64,
                train_accuracy: totals.correct as f64 / totals.samples.max(1) as f64,
                test_loss: test.loss_sum / test.samples.max(1) as f64,
                test_accuracy: test.correct as f64 / test.samples.max(1) as f64,
                epoch_seconds,
                samples_per_second: totals.samples as f64 / epoch_seconds,
                eval_seconds,
                workers: cfg.workers,
                bytes_per_step: (self.bytes_moved - bytes_before) as f64 / steps as f64,
            };
            self.run.append_metrics(&m)?;
            tracing::info!(
                "epoch {}/{}: train loss {:.4}, test loss {:.4}, test accuracy {:.2}%, {:.2}s, {:.0} samples/s",
                m.epoch,
                cfg.epochs,
                m.train_loss,
                m.test_loss,
                m.test_accuracy * 100.0,
                m.epoch_seconds,
                m.samples_per_second
            );
            last = Some(m);
        }
        self.await_final_digests(steps).await?;
        let last = last.ok_or_else(|| anyhow!("no epoch ran"))?;
        let summary = Summary {
            preset: cfg.preset.clone(),
            model: cfg.model.describe(),
            parameters: self.network.num_params(),
            epochs: cfg.epochs as u64,
            test_accuracy: last.test_accuracy,
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            samples_per_second: (n_train as f64 * cfg.epochs as f64) / train_seconds,
            train_seconds,
            total_seconds: self.started.elapsed().as_secs_f64(),
            workers: cfg.workers,
            backend: cfg.backend.to_string(),
            seed: cfg.seed,
            params_sha256: digest(&[&self.params]),
        };
        self.run
            .finish(&self.shared.layout, &self.params, &summary)?;
        Ok(summary)
    }

    fn describe_process(&self, index: usize, pid: u32) -> String {
        match self.shared.rank_of_pid(pid) {
            Some(rank) => format!(
                "{} (local worker process {index})",
                self.shared.describe(rank)
            ),
            None => format!("local worker process {index} (pid {pid})"),
        }
    }

    fn where_text(&self, here: Here) -> String {
        let ckpt = match &self.last_checkpoint {
            Some(p) => format!("the last checkpoint, {}, is intact", p.display()),
            None => "no checkpoint was written yet (the first epoch had not finished)".into(),
        };
        format!(
            "during epoch {} step {}/{}; training stopped, {ckpt}",
            here.epoch + 1,
            here.step + 1,
            here.steps
        )
    }

    async fn wait_for_workers(&mut self) -> Result<()> {
        let world = self.shared.config.workers as usize;
        let mut txs: Vec<Option<WorkerTx>> = vec![None; world];
        let timeout = Duration::from_secs(self.shared.config.cluster.join_timeout_s as u64);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut early_rendezvous = None;
        while txs.iter().any(Option::is_none) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::StreamOpened { rank, tx })) => {
                    if let Some(slot) = txs.get_mut(rank as usize) {
                        *slot = Some(tx);
                    }
                }
                Ok(Some(Event::ProcessExited { index, pid, detail })) => {
                    bail!(
                        "{} exited before training started: {detail}",
                        self.describe_process(index, pid)
                    )
                }
                Ok(Some(Event::StreamClosed { rank, reason })) => {
                    bail!(
                        "{} disconnected before training started: {reason}",
                        self.shared.describe(rank)
                    )
                }
                Ok(Some(Event::Interrupted(sig))) => {
                    bail!("interrupted by {sig} while waiting for workers")
                }
                Ok(Some(Event::Message { rank: 0, msg })) => {
                    // Rank 0 sends its rendezvous as soon as its stream is open, which may be
                    // before the other ranks have joined: keep it for the relay.
                    if let Some(pb::worker_message::Kind::Rendezvous(r)) = msg.kind {
                        early_rendezvous = Some(r);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the coordinator's event queue closed"),
                Err(_) => {
                    let ready = txs.iter().filter(|t| t.is_some()).count();
                    bail!(
                        "only {ready} of {world} workers connected within {}s; start the missing workers \
                         (lockstep-worker --coordinator http://THIS_HOST:PORT with the job's LOCKSTEP_TOKEN), \
                         or lower --workers",
                        timeout.as_secs()
                    )
                }
            }
        }
        self.txs = txs.into_iter().flatten().collect();
        self.verified = vec![None; world];
        if self.shared.config.backend.is_collective() {
            self.relay_rendezvous(early_rendezvous, deadline).await?;
        }
        tracing::info!("all {world} workers connected; training starts");
        Ok(())
    }

    /// Collective bootstrap: waits for rank 0's rendezvous (the NCCL unique id, or its TCP
    /// address) and relays it to every other rank.
    async fn relay_rendezvous(
        &mut self,
        early: Option<pb::Rendezvous>,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let here = Here {
            epoch: 0,
            step: 0,
            steps: 0,
        };
        let mut found = early;
        loop {
            if let Some(id) = found.take() {
                for rank in 1..self.txs.len() {
                    self.send(
                        rank,
                        pb::coordinator_message::Kind::Rendezvous(id.clone()),
                        here,
                    )
                    .await?;
                }
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Message { rank: 0, msg })) => {
                    if let Some(pb::worker_message::Kind::Rendezvous(id)) = msg.kind {
                        found = Some(id);
                    }
                }
                Ok(Some(other)) => self.handle_other(other, here)?,
                Ok(None) => bail!("the coordinator's event queue closed"),
                Err(_) => bail!("rank 0 did not send its rendezvous before the join timeout"),
            }
        }
    }

    async fn send(
        &mut self,
        rank: usize,
        kind: pb::coordinator_message::Kind,
        here: Here,
    ) -> Result<()> {
        let tx = &self.txs[rank];
        if tx
            .send(Ok(pb::CoordinatorMessage { kind: Some(kind) }))
            .await
            .is_err()
        {
            bail!(
                "{} disconnected {}",
                self.shared.describe(rank as u32),
                self.where_text(here)
            );
        }
        Ok(())
    }

    async fn send_batches(
        &mut self,
        perm: &[u32],
        epoch: u64,
        step: u64,
        steps: u64,
        here: Here,
    ) -> Result<()> {
        let batch = self.shared.config.batch_size as usize;
        let range = schedule::step_range(perm.len(), batch, step as usize);
        let global = range.len() as u32;
        let world = self.txs.len();
        for (rank, part) in schedule::split(range.len(), world).into_iter().enumerate() {
            let indices = &perm[range.start + part.start..range.start + part.end];
            let mut pixels = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
            let mut labels = Vec::with_capacity(indices.len());
            for &i in indices {
                let i = i as usize;
                pixels.extend_from_slice(
                    &self.data.train_images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS],
                );
                labels.push(self.data.train_labels[i]);
            }
            self.bytes_moved += (pixels.len() + labels.len()) as u64;
            let msg = pb::Batch {
                id: Some(pb::StepId::new(epoch, step, self.shared.membership_epoch)),
                count: indices.len() as u32,
                global_count: global,
                pixels: Bytes::from(pixels),
                labels: Bytes::from(labels),
                last_of_epoch: step + 1 == steps,
            };
            self.send(rank, pb::coordinator_message::Kind::Batch(msg), here)
                .await?;
        }
        Ok(())
    }

    /// Fails if any worker has been silent for longer than the heartbeat timeout.
    fn check_liveness(&self, here: Here) -> Result<()> {
        let limit = self.shared.config.cluster.heartbeat_timeout_ms as u64;
        let now = self.shared.now_ms();
        let members = self.shared.members.lock().expect("members lock");
        for (rank, m) in members.iter().enumerate() {
            let silent = now.saturating_sub(m.last_seen_ms.load(Ordering::Relaxed));
            if silent > limit {
                drop(members);
                bail!(
                    "{} sent nothing for {:.1}s (heartbeat timeout {:.1}s) {}",
                    self.shared.describe(rank as u32),
                    silent as f64 / 1000.0,
                    limit as f64 / 1000.0,
                    self.where_text(here)
                );
            }
        }
        Ok(())
    }

    /// Handles one event that is not the awaited step report; errors end the job.
    fn handle_other(&mut self, event: Event, here: Here) -> Result<()> {
        match event {
            Event::StreamClosed { rank, reason } => bail!(
                "{} failed ({reason}) {}",
                self.shared.describe(rank),
                self.where_text(here)
            ),
            Event::ProcessExited { index, pid, detail } => bail!(
                "{} exited ({detail}) {}",
                self.describe_process(index, pid),
                self.where_text(here)
            ),
            Event::Interrupted(sig) => bail!("interrupted by {sig} {}", self.where_text(here)),
            Event::Message { rank, msg } => {
                if let Some(pb::worker_message::Kind::Digest(d)) = msg.kind {
                    self.pending_digests.push((rank, d));
                    self.check_digests()?;
                }
                Ok(())
            }
            Event::StreamOpened { rank, .. } => {
                tracing::warn!("ignoring a second step stream from rank {rank}");
                Ok(())
            }
            Event::StatePushed { .. } => Ok(()),
        }
    }

    /// Compares the digests workers reported with the coordinator's own at the same step.
    fn check_digests(&mut self) -> Result<()> {
        if self.shared.config.backend.is_collective() {
            // No replica here between epochs: rank 0's digest is the reference for the others
            // (at epoch ends, the digest of the state rank 0 uploaded is, and rank 0 is checked
            // against it too).
            for (rank, d) in &self.pending_digests {
                let id = d.id.unwrap_or_default();
                if *rank == 0 {
                    self.own_digests
                        .entry((id.epoch, id.step))
                        .or_insert_with(|| d.sha256.clone());
                }
            }
        }
        let mut keep = Vec::new();
        for (rank, d) in std::mem::take(&mut self.pending_digests) {
            let id = d.id.unwrap_or_default();
            match self.own_digests.get(&(id.epoch, id.step)) {
                Some(ours) if *ours == d.sha256 => {
                    if let Some(v) = self.verified.get_mut(rank as usize) {
                        *v = Some((id.epoch, id.step));
                    }
                }
                Some(ours) => bail!(
                    "{} diverged: after epoch {} step {} its parameters/optimizer state digest is {}, the \
                     coordinator's is {ours}; replicas must be bit-identical, so training stopped",
                    self.shared.describe(rank),
                    id.epoch + 1,
                    id.step + 1,
                    d.sha256
                ),
                None => keep.push((rank, d)),
            }
        }
        self.pending_digests = keep;
        Ok(())
    }

    /// Waits for every rank's report for step `here`.
    async fn collect(&mut self, here: Here) -> Result<Vec<StepReport>> {
        let world = self.txs.len();
        let mut reports: Vec<Option<StepReport>> = (0..world).map(|_| None).collect();
        let mut missing = world;
        let membership = self.shared.membership_epoch;
        let limit = Duration::from_secs(self.shared.config.cluster.step_timeout_s as u64);
        let deadline = Instant::now() + limit;
        let mut later = Vec::new();
        for (rank, id, report) in std::mem::take(&mut self.early) {
            if (id.epoch, id.step) == (here.epoch, here.step) {
                if let Some(slot @ None) = reports.get_mut(rank as usize) {
                    *slot = Some(report);
                    missing -= 1;
                }
            } else {
                later.push((rank, id, report));
            }
        }
        self.early = later;
        while missing > 0 {
            // Checked on every event, not only when none comes: other messages must not keep
            // a stalled step alive.
            if Instant::now() > deadline {
                let waiting: Vec<String> = reports
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_none())
                    .map(|(rank, _)| self.shared.describe(rank as u32))
                    .collect();
                bail!(
                    "no report from {} for {}s (cluster.step_timeout_s), although its heartbeats still \
                     come: it stopped making progress {}",
                    waiting.join(", "),
                    limit.as_secs(),
                    self.where_text(here)
                );
            }
            let event = match tokio::time::timeout(LIVENESS_CHECK, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("the coordinator's event queue closed"),
                Err(_) => {
                    self.check_liveness(here)?;
                    continue;
                }
            };
            let (rank, msg) = match event {
                Event::Message { rank, msg } => (rank, msg),
                other => {
                    self.handle_other(other, here)?;
                    continue;
                }
            };
            let (id, report) = match StepReport::from_message(msg) {
                Ok(found) => found,
                Err(msg) => {
                    self.handle_other(Event::Message { rank, msg }, here)?;
                    continue;
                }
            };
            let ahead = (id.epoch, id.step) > (here.epoch, here.step);
            if id.membership_epoch == membership && ahead {
                // Only steps whose batches are already out can be reported.
                if id.epoch != here.epoch || id.step > here.step + PIPELINE_DEPTH {
                    bail!(
                        "{} reported epoch {} step {}, whose batch was never sent {}",
                        self.shared.describe(rank),
                        id.epoch + 1,
                        id.step + 1,
                        self.where_text(here)
                    );
                }
                self.early.push((rank, id, report));
                continue;
            }
            if id.epoch != here.epoch || id.step != here.step || id.membership_epoch != membership {
                tracing::debug!(
                    "dropping a stale report from rank {rank} for epoch {} step {}",
                    id.epoch,
                    id.step
                );
                continue;
            }
            match reports.get_mut(rank as usize) {
                Some(slot @ None) => {
                    *slot = Some(report);
                    missing -= 1;
                }
                Some(Some(_)) => tracing::debug!("dropping a duplicate report from rank {rank}"),
                None => bail!("a report arrived from unknown rank {rank}"),
            }
        }
        self.check_liveness(here)?;
        Ok(reports.into_iter().flatten().collect())
    }

    /// Sums the ranks' gradients in rank order, averages over the global batch, sends the
    /// average to every rank and applies it to the coordinator's replica.
    async fn reduce_and_apply(&mut self, reports: Vec<StepReport>, here: Here) -> Result<()> {
        let mut sum = std::mem::take(&mut self.average);
        sum.resize(self.params.len(), 0.0);
        let parts: Vec<&[u8]> = reports
            .iter()
            .map(|r| {
                r.gradient
                    .as_deref()
                    .expect("gRPC mode reports carry gradients")
            })
            .collect();
        let samples: u32 = reports.iter().map(|r| r.stats.samples).sum();
        self.bytes_moved += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        if let Err(bad) = crate::reducer::average_in_rank_order(&parts, samples, &mut sum) {
            bail!(
                "{} sent a malformed gradient ({}) {}",
                self.shared.describe(bad.rank as u32),
                bad.error,
                self.where_text(here)
            );
        }
        let encoded = Bytes::from(codec::encode_f32(&sum));
        let membership = self.shared.membership_epoch;
        for rank in 0..self.txs.len() {
            self.bytes_moved += encoded.len() as u64;
            let msg = pb::Reduced {
                id: Some(pb::StepId::new(here.epoch, here.step, membership)),
                data: encoded.clone(),
            };
            self.send(rank, pb::coordinator_message::Kind::Reduced(msg), here)
                .await?;
        }
        self.optimizer.step(&mut self.params, &sum);
        self.average = sum;
        Ok(())
    }

    /// NCCL mode: waits for rank 0's state after the epoch and adopts it.
    async fn receive_pushed_state(&mut self, here: Here) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let event = match tokio::time::timeout(LIVENESS_CHECK, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("the coordinator's event queue closed"),
                Err(_) => {
                    self.check_liveness(here)?;
                    if tokio::time::Instant::now() > deadline {
                        bail!(
                            "rank 0 did not upload its state within 120s after epoch {}",
                            here.epoch + 1
                        );
                    }
                    continue;
                }
            };
            match event {
                Event::StatePushed { bytes } => {
                    let (state, _) = TrainingState::from_bytes(&self.shared.layout, &bytes)
                        .context("parsing the state rank 0 uploaded")?;
                    // The upload must be the state whose digest the ranks agreed on at the
                    // epoch's last step.
                    let uploaded = codec::state_digest(&state.params, &state.optimizer);
                    let key = (here.epoch, here.steps - 1);
                    match self.own_digests.get(&key) {
                        Some(reported) if *reported != uploaded => bail!(
                            "the state rank 0 uploaded after epoch {} has digest {uploaded}, but rank 0 reported {reported} \
                             for that step; training stopped",
                            here.epoch + 1
                        ),
                        Some(_) => {}
                        None => {
                            self.own_digests.insert(key, uploaded);
                        }
                    }
                    self.optimizer = Optimizer::with_state(
                        self.shared.config.optimizer.clone(),
                        self.network.num_params(),
                        state.optimizer,
                    )?;
                    self.params = state.params;
                    return Ok(());
                }
                other => self.handle_other(other, here)?,
            }
        }
    }

    async fn evaluate(&self) -> Result<BatchStats> {
        let network = self.network.clone();
        let params = self.params.clone();
        let data = self.data.clone();
        let normalize = self.shared.config.normalize;
        // With GPU workers the coordinator's host may have a GPU too: evaluate there (the CNN's
        // 10,000 test images take seconds on a CPU); otherwise, and if that fails, on the CPU.
        let device = if self.shared.config.backend == Backend::Nccl {
            candle_core::Device::new_cuda(0).unwrap_or(candle_core::Device::Cpu)
        } else {
            candle_core::Device::Cpu
        };
        tokio::task::spawn_blocking(move || {
            evaluate(
                &network,
                &params,
                &data.test_images,
                &data.test_labels,
                normalize,
                EVAL_BATCH,
                &device,
            )
        })
        .await
        .context("evaluation task")?
        .context("evaluating on the test set")
    }

    /// Waits until every rank's digest of the final step has matched the coordinator's.
    async fn await_final_digests(&mut self, steps: u64) -> Result<()> {
        let last_epoch = self.shared.config.epochs as u64 - 1;
        let here = Here {
            epoch: last_epoch,
            step: steps - 1,
            steps,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let last = Some((last_epoch, steps - 1));
        loop {
            self.check_digests()?;
            if self.verified.iter().all(|v| *v == last) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(other)) => self.handle_other(other, here)?,
                Ok(None) => bail!("the coordinator's event queue closed"),
                Err(_) => bail!("workers did not confirm their final parameter digests within 30s"),
            }
        }
    }
}
