//! The training loop, top to bottom: wait for the workers and give them the job's state; then
//! keep the next steps' work out (every member its shards of each global batch, pipelined a few
//! steps ahead), wait for one event at a time, and finish the steps that are complete, in order:
//! in grpc mode, sum their shard gradients in shard order, send the average back and apply it
//! to the coordinator's own replica; count their samples and statistics; compare digests;
//! checkpoint when due. After each epoch: evaluate on the test set, checkpoint, log metrics.
//!
//! Faults do not end the job ([`events`]): a lost worker's unfinished shards go to the others
//! (grpc), or the membership regroups around the newest state ([`regroup`], tcp and nccl), as
//! long as `cluster.min_workers` are left; replacements join at a step boundary. Because every
//! step is cut into the same shards and their gradients are summed in shard order, none of this
//! changes the arithmetic: the model is the one a run without faults computes.

mod account;
mod digests;
mod events;
mod inbox;
mod inflight;
mod regroup;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use lockstep_common::checkpoint::{ModelInfo, Position, TrainingState};
use lockstep_common::codec::{self, digest};
use lockstep_common::config::Backend;
use lockstep_common::mnist::{Mnist, IMAGE_PIXELS};
use lockstep_common::model::{evaluate, BatchStats, Network, EVAL_BATCH};
use lockstep_common::optim::Optimizer;
use lockstep_common::protocol::{self, FromCoordinator, Stamp, StepId, Work};
use lockstep_common::reduce::average_in_shard_order;
use lockstep_common::schedule;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use account::EpochAccount;

use crate::error::{Cause, Here, JobError, Lost, Stopped};
use crate::launcher::LauncherHandle;
use crate::membership::MemberId;
use crate::observe::{MemberEvent, MemberEventKind, Observer, Observers, StepRecord};
use crate::progress::EpochProgress;
use crate::run_dir::{EpochMetrics, RunDir, Summary};
use crate::service::{Event, Shared, WorkerTx};
use inbox::{Inbox, Next};
use inflight::{InFlight, Slot, Step};

/// How many steps ahead of the oldest unfinished one the coordinator sends work. (A deeper
/// queue for NCCL workers, which do not wait on the coordinator, measured no faster on an H100.)
const PIPELINE_DEPTH: u64 = 2;
/// Collective modes: how many steps ahead of the oldest unfinished one the work goes, and in
/// bursts of how many steps. A message per step and member, each waking the step stream's task
/// here and the worker's there, cost two cores more than the bookkeeping did (the coordinator
/// took a third of a core on `mlp`, a fifth after); the workers send their reports in bursts
/// too. grpc keeps [`PIPELINE_DEPTH`]: its coordinator holds every step's gradients.
const COLLECTIVE_DEPTH: u64 = 16;
const BURST: u64 = 8;

/// How far work goes out ahead, and in bursts of how many steps.
#[derive(Clone, Copy, Debug)]
struct Window {
    depth: u64,
    burst: u64,
}

impl Window {
    /// How many steps to send now, from `sent_until` on: those with at most `depth` steps
    /// between them and `next` (the oldest unfinished), within `next`'s epoch and before
    /// `end`; but none until a whole burst fits, unless nothing is out (`idle`) or what fits
    /// reaches the end of the epoch or of the job.
    fn steps_to_send(
        self,
        sent_until: StepId,
        next: StepId,
        end: StepId,
        steps_per_epoch: u64,
        idle: bool,
    ) -> u64 {
        let sendable =
            |at: StepId| at < end && at.epoch == next.epoch && at.step <= next.step + self.depth;
        let (mut at, mut n) = (sent_until, 0);
        while sendable(at) {
            at = at.next(steps_per_epoch);
            n += 1;
        }
        let reaches_a_boundary = at.epoch != next.epoch || at >= end;
        if n < self.burst && !idle && !reaches_a_boundary {
            return 0;
        }
        n
    }
}
/// Most steps whose work is out at once (what the memory check counts gradients for).
pub const STEPS_IN_FLIGHT: u64 = PIPELINE_DEPTH + 1;
/// How long the state after an epoch may take to arrive from the workers (collective modes).
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a job starts.
pub struct Start {
    /// The state to train from (initial, or a checkpoint's).
    pub state: TrainingState,
    /// The account of the epoch in progress, when resuming mid-epoch.
    pub account: Option<EpochAccount>,
    /// The checkpoint it came from.
    pub checkpoint: Option<PathBuf>,
    /// The metrics of the last finished epoch, when resuming.
    pub last_metrics: Option<EpochMetrics>,
}

/// The schedule's constants.
#[derive(Clone, Copy, Debug)]
struct Plan {
    n_train: usize,
    batch: usize,
    steps: u64,
    shards: u32,
    epochs: u64,
    checkpoint_every: u64,
}

impl Plan {
    /// The position after the last step.
    fn end(&self) -> StepId {
        StepId::new(self.epochs, 0)
    }

    fn here(&self, id: StepId) -> Here {
        Here {
            id,
            steps: self.steps,
        }
    }

    /// Whether a mid-epoch checkpoint is written after step `id`.
    fn checkpoint_due(&self, id: StepId) -> bool {
        self.checkpoint_every > 0
            && (id.step + 1).is_multiple_of(self.checkpoint_every)
            && id.step + 1 < self.steps
    }
}

/// A member's step stream, and its rank.
struct Link {
    tx: WorkerTx,
    rank: u32,
}

/// The coordinator's training loop and the replica it keeps.
pub struct Engine {
    shared: Arc<Shared>,
    inbox: Inbox,
    data: Arc<Mnist>,
    network: Network,
    plan: Plan,
    collective: bool,
    /// The coordinator's replica: current at every step in grpc mode; in collective modes,
    /// the newest state a worker uploaded.
    params: Vec<f32>,
    optimizer: Optimizer,
    /// The step the replica's state continues from.
    replica_at: StepId,
    run: RunDir,
    launcher: Option<LauncherHandle>,
    /// Members taking part, by member id.
    links: BTreeMap<MemberId, Link>,
    /// Collective modes: members that joined and wait for the next regroup.
    waiting: BTreeMap<MemberId, Link>,
    /// Collective modes: members configured in the current collective.
    configured: BTreeSet<MemberId>,
    /// The membership generation work is sent under.
    current: u64,
    inflight: InFlight,
    /// The oldest step not finished.
    next: StepId,
    /// The next step whose work is not out.
    sent_until: StepId,
    account: EpochAccount,
    perm: (u64, Arc<Vec<u32>>),
    digests: digests::Digests,
    /// Collective modes: the reference worker of recent digest-due steps.
    sources: BTreeMap<StepId, MemberId>,
    /// Collective modes: states uploaded after marked steps, not yet used, by position.
    pushed: BTreeMap<StepId, TrainingState>,
    /// Collective modes: accounts of finished checkpoint steps waiting for their state.
    pending_checkpoints: BTreeMap<StepId, EpochAccount>,
    /// Collective modes: the member asked to upload the state after each marked step, by the
    /// position after it; an upload from anyone else is ignored.
    uploaders: BTreeMap<StepId, MemberId>,
    regroup: regroup::Regroup,
    /// Losses found while sending or handling, processed by [`Engine::settle_losses`].
    casualties: Vec<(MemberId, Cause)>,
    lost: Vec<Lost>,
    last_checkpoint: Option<PathBuf>,
    /// The first loss since the last finished step, timed until the job carries on.
    recovering: Option<(Instant, StepId)>,
    average: Vec<f32>,
    progress: Option<EpochProgress>,
    last_metrics: Option<EpochMetrics>,
    train_seconds: f64,
    samples_trained: u64,
    membership_changes: u64,
    started: std::time::Instant,
    /// Who watches the run (metrics endpoint, dashboard, TensorBoard).
    observers: Observers,
    /// When the previous step finished, for the step time observers see.
    last_step_at: Option<std::time::Instant>,
}

impl Engine {
    /// An engine that will train `network` from `start`.
    pub fn new(
        shared: Arc<Shared>,
        events: mpsc::UnboundedReceiver<Event>,
        data: Arc<Mnist>,
        network: Network,
        start: Start,
        run: RunDir,
        launcher: Option<LauncherHandle>,
    ) -> anyhow::Result<Self> {
        let cfg = &shared.config;
        let n_train = match cfg.train_samples as usize {
            0 => data.train_len(),
            n => n.min(data.train_len()),
        };
        let plan = Plan {
            n_train,
            batch: cfg.batch_size as usize,
            steps: shared.steps_per_epoch,
            shards: cfg.shards(),
            epochs: cfg.epochs as u64,
            checkpoint_every: cfg.checkpoint_every_steps as u64,
        };
        let optimizer = Optimizer::with_state(
            cfg.optimizer.clone(),
            network.num_params(),
            start.state.optimizer.clone(),
        )?;
        let at = StepId::new(start.state.position.epoch, start.state.position.step);
        let account = match start.account {
            Some(a) if at.step > 0 => a,
            _ => EpochAccount::new(n_train),
        };
        Ok(Self {
            collective: cfg.backend.is_collective(),
            inbox: Inbox::new(events),
            data,
            network,
            plan,
            params: start.state.params,
            optimizer,
            replica_at: at,
            run,
            launcher,
            links: BTreeMap::new(),
            waiting: BTreeMap::new(),
            configured: BTreeSet::new(),
            current: 0,
            inflight: InFlight::default(),
            next: at,
            sent_until: at,
            account,
            perm: (u64::MAX, Arc::new(Vec::new())),
            digests: digests::Digests::default(),
            sources: BTreeMap::new(),
            pushed: BTreeMap::new(),
            pending_checkpoints: BTreeMap::new(),
            uploaders: BTreeMap::new(),
            regroup: regroup::Regroup::default(),
            casualties: Vec::new(),
            lost: Vec::new(),
            last_checkpoint: start.checkpoint,
            recovering: None,
            average: Vec::new(),
            progress: None,
            last_metrics: start.last_metrics,
            train_seconds: 0.0,
            samples_trained: 0,
            membership_changes: 0,
            started: std::time::Instant::now(),
            observers: Observers::default(),
            last_step_at: None,
            shared,
        })
    }

    /// Adds the run's observers ([`crate::observe`]).
    pub fn observe(&mut self, observers: Observers) {
        self.observers = observers;
    }

    /// Tells the observers that `member` joined or was lost.
    fn observe_member(
        &mut self,
        member: &crate::membership::Member,
        kind: MemberEventKind,
        reason: String,
    ) {
        if self.observers.is_empty() {
            return;
        }
        let event = MemberEvent {
            kind,
            who: crate::membership::describe(member),
            rank: member.rank,
            worker_id: member.worker_id.clone(),
            device: member.device.clone(),
            workers: self.links.len() + self.waiting.len(),
            at: self.plan.here(self.next).to_string(),
            reason,
        };
        self.observers.member(&event);
    }

    /// Runs the whole job. On error, every connected worker is told to abort.
    pub async fn run(mut self) -> Result<Summary, Stopped> {
        let result = self.train().await;
        if let Some(p) = self.progress.take() {
            p.finish();
        }
        match result {
            Ok(summary) => {
                self.broadcast(FromCoordinator::Finish("training finished".into()));
                Ok(summary)
            }
            Err(error) => {
                let stopped = Stopped {
                    error,
                    checkpoint: self.last_checkpoint.clone(),
                    run: self.run.path().to_path_buf(),
                };
                self.broadcast(FromCoordinator::Abort(stopped.to_string()));
                Err(stopped)
            }
        }
    }

    async fn train(&mut self) -> Result<Summary, JobError> {
        if self.next >= self.plan.end() {
            // A resumed run whose last epoch was done: only its summary was missing.
            return self.summary();
        }
        self.wait_for_initial_workers().await?;
        self.start()?;
        while self.next < self.plan.end() {
            if let Some(reason) = self.regroup.needed.take() {
                self.regroup(reason).await?;
            } else {
                self.fill()?;
                self.settle_losses()?;
                if self.regroup.needed.is_none() && !self.pump(self.step_deadline()).await? {
                    self.step_timed_out();
                    self.settle_losses()?;
                }
            }
            self.complete_ready().await?;
        }
        self.await_final_digests().await?;
        self.summary()
    }

    /// Waits for one event (or a liveness tick) until `deadline` and handles it, with any
    /// losses it brings. False when the deadline passed.
    async fn pump(&mut self, deadline: Option<Instant>) -> Result<bool, JobError> {
        let in_time = match self.inbox.next(deadline).await? {
            Next::Event(e) => {
                self.handle(e)?;
                true
            }
            Next::Tick => {
                self.check_liveness();
                true
            }
            Next::Deadline => false,
        };
        self.settle_losses()?;
        Ok(in_time)
    }

    /// When the oldest step out has waited `cluster.step_timeout_s`.
    fn step_deadline(&self) -> Option<Instant> {
        let limit = Duration::from_secs(self.shared.config.cluster.step_timeout_s as u64);
        self.inflight
            .oldest()
            .map(|s| Instant::from_std(s.sent_at) + limit)
    }

    async fn wait_for_initial_workers(&mut self) -> Result<(), JobError> {
        let world = self.shared.config.workers as usize;
        let timeout = Duration::from_secs(self.shared.config.cluster.join_timeout_s as u64);
        let deadline = Instant::now() + timeout;
        while self.links.len() < world {
            match self.inbox.next(Some(deadline)).await? {
                Next::Event(Event::StreamOpened { member, tx }) => {
                    let rank = self.shared.members().get(member).map_or(0, |m| m.rank);
                    self.links.insert(member, Link { tx, rank });
                }
                Next::Event(Event::ProcessExited { index, pid, detail }) => {
                    if let Some(member) = self.shared.members().by_pid(pid) {
                        self.links.remove(&member);
                        self.shared.members().remove(member);
                    }
                    if self.launcher.as_ref().is_none_or(|l| l.restarts_left() == 0) {
                        return Err(JobError::Startup(format!(
                            "local worker process {index} (pid {pid}) exited before training started: {detail}"
                        )));
                    }
                }
                Next::Event(Event::StreamClosed { member, reason })
                | Next::Event(Event::Left { member, reason }) => {
                    let who = self.shared.describe(member);
                    self.links.remove(&member);
                    self.shared.members().remove(member);
                    if self.launcher.is_some() {
                        return Err(JobError::Startup(format!(
                            "{who} disconnected before training started: {reason}"
                        )));
                    }
                    tracing::warn!("{who} disconnected before training started: {reason}");
                }
                Next::Event(Event::Malformed { member, error }) => {
                    tracing::warn!("{} broke the protocol: {error}", self.shared.describe(member));
                    self.links.remove(&member);
                    self.shared.members().remove(member);
                }
                Next::Event(Event::Interrupted(sig)) => return Err(JobError::Interrupted(sig)),
                Next::Event(other) => tracing::debug!("before training: ignoring {other:?}"),
                Next::Tick => {
                    let limit = self.shared.config.cluster.heartbeat_timeout_ms as u64;
                    let now = self.shared.now_ms();
                    let silent = self.shared.members().silent(now, limit);
                    for (member, _) in silent {
                        tracing::warn!(
                            "{} joined but went silent; dropping it",
                            self.shared.describe(member)
                        );
                        self.links.remove(&member);
                        self.shared.members().remove(member);
                    }
                }
                Next::Deadline => {
                    return Err(JobError::Startup(format!(
                        "only {} of {world} workers connected within {}s; start the missing workers \
                         (lockstep-worker --coordinator http://THIS_HOST:PORT with the job's LOCKSTEP_TOKEN), \
                         or lower --workers",
                        self.links.len(),
                        timeout.as_secs()
                    )))
                }
            }
        }
        tracing::info!(
            "all {world} workers connected; training {} from {}",
            self.shared.config.model.describe(),
            self.plan.here(self.next)
        );
        Ok(())
    }

    /// Gives every member the job's state: at once (grpc), or through the first regroup, which
    /// also forms the collective (tcp, nccl).
    fn start(&mut self) -> Result<(), JobError> {
        self.current = self.shared.members().generation();
        let initial: Vec<crate::membership::Member> = {
            let members = self.shared.members();
            self.ranked()
                .into_iter()
                .filter_map(|m| members.get(m).cloned())
                .collect()
        };
        for member in &initial {
            self.observe_member(member, MemberEventKind::Joined, String::new());
        }
        if self.collective {
            self.regroup.needed = Some("the job starts".into());
            return Ok(());
        }
        let version = self.store_state()?;
        let members: Vec<MemberId> = self.ranked();
        let world = members.len() as u32;
        for (rank, member) in members.into_iter().enumerate() {
            self.configure(member, rank as u32, world, Some(version));
        }
        self.settle_losses()
    }

    /// Members taking part, in rank order.
    fn ranked(&self) -> Vec<MemberId> {
        let mut v: Vec<(u32, MemberId)> = self.links.iter().map(|(m, l)| (l.rank, *m)).collect();
        v.sort();
        v.into_iter().map(|(_, m)| m).collect()
    }

    /// Serialises the replica's state for workers to fetch; returns its version.
    fn store_state(&mut self) -> Result<u64, JobError> {
        let state = self.replica_state();
        let bytes = state
            .to_bytes(&self.shared.layout, &self.shared.config_toml)
            .context("serialising the training state")?;
        Ok(self.shared.states.lock().expect("state lock").put(bytes))
    }

    fn replica_state(&self) -> TrainingState {
        TrainingState {
            params: self.params.clone(),
            optimizer: self.optimizer.state().clone(),
            position: Position {
                epoch: self.replica_at.epoch,
                step: self.replica_at.step,
            },
        }
    }

    fn adopt(&mut self, state: TrainingState) -> Result<(), JobError> {
        self.optimizer = Optimizer::with_state(
            self.shared.config.optimizer.clone(),
            self.network.num_params(),
            state.optimizer,
        )?;
        self.params = state.params;
        self.replica_at = StepId::new(state.position.epoch, state.position.step);
        Ok(())
    }

    fn configure(&mut self, member: MemberId, rank: u32, world: u32, version: Option<u64>) {
        let msg = FromCoordinator::Configure(protocol::Configure {
            membership: self.current,
            rank,
            world,
            state_version: version,
        });
        self.send(member, msg);
    }

    /// Queues `msg` for `member`; a stream that is closed or not draining is a loss, handled
    /// by the next [`Engine::settle_losses`].
    fn send(&mut self, member: MemberId, msg: FromCoordinator) {
        use tokio::sync::mpsc::error::TrySendError;
        let Some(link) = self
            .links
            .get(&member)
            .or_else(|| self.waiting.get(&member))
        else {
            return;
        };
        match link.tx.try_send(Ok(msg.into())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.casualties.push((
                member,
                Cause::Unresponsive("its step stream: messages pile up unread".into()),
            )),
            Err(TrySendError::Closed(_)) => self
                .casualties
                .push((member, Cause::StreamClosed("its step stream closed".into()))),
        }
    }

    fn broadcast(&mut self, msg: FromCoordinator) {
        let members: Vec<MemberId> = self
            .links
            .keys()
            .chain(self.waiting.keys())
            .copied()
            .collect();
        for member in members {
            self.send(member, msg.clone());
        }
        self.casualties.clear();
    }

    fn permutation(&mut self, epoch: u64) -> Arc<Vec<u32>> {
        if self.perm.0 != epoch {
            let cfg = &self.shared.config;
            self.perm = (
                epoch,
                Arc::new(schedule::epoch_permutation(
                    cfg.seed,
                    epoch,
                    self.plan.n_train,
                )),
            );
        }
        self.perm.1.clone()
    }

    /// Keeps up to [`PIPELINE_DEPTH`] steps' work out ahead of the oldest unfinished step
    /// ([`COLLECTIVE_DEPTH`] in collective modes, sent in bursts: see
    /// [`Window::steps_to_send`]), within its epoch. Collective modes hold back while members
    /// wait to join (they enter at a step boundary, by a regroup, once the work out is
    /// finished).
    fn fill(&mut self) -> Result<(), JobError> {
        if self.collective && !self.waiting.is_empty() {
            if self.inflight.is_empty() && self.regroup.needed.is_none() {
                self.regroup.needed = Some("workers joined".into());
            }
            return Ok(());
        }
        if self.links.is_empty() {
            return Ok(());
        }
        let window = if self.collective {
            Window {
                depth: COLLECTIVE_DEPTH,
                burst: BURST,
            }
        } else {
            Window {
                depth: PIPELINE_DEPTH,
                burst: 1,
            }
        };
        let n = window.steps_to_send(
            self.sent_until,
            self.next,
            self.plan.end(),
            self.plan.steps,
            self.inflight.is_empty(),
        );
        for _ in 0..n {
            self.send_step(self.sent_until);
            self.sent_until = self.sent_until.next(self.plan.steps);
        }
        Ok(())
    }

    /// Sends every member its shards of step `id`.
    fn send_step(&mut self, id: StepId) {
        let perm = self.permutation(id.epoch);
        let range = schedule::step_range(self.plan.n_train, self.plan.batch, id.step as usize);
        let global = range.len() as u32;
        let pieces = schedule::shard_ranges(range.len(), self.plan.shards);
        let members = self.ranked();
        let all: Vec<u32> = (0..self.plan.shards).collect();
        let assignment = schedule::assign_shards(&all, members.len());
        let last_of_epoch = id.step + 1 == self.plan.steps;
        let mark = self.collective && (last_of_epoch || self.plan.checkpoint_due(id));
        let digest_due = schedule::digest_due(
            id.step,
            self.shared.config.cluster.digest_every,
            last_of_epoch,
        );
        let mut slots = Vec::with_capacity(pieces.len());
        for (i, (&member, shards)) in members.iter().zip(&assignment).enumerate() {
            let mut built = Vec::with_capacity(shards.len());
            for &k in shards {
                let positions =
                    range.start + pieces[k as usize].start..range.start + pieces[k as usize].end;
                let shard = self.build_shard(&perm, positions.clone(), k);
                slots.push((
                    k,
                    Slot {
                        range: positions,
                        indices_digest: protocol::indices_digest(&shard.indices),
                        owner: member,
                        filled: None,
                    },
                ));
                built.push(shard);
            }
            if built.is_empty() && !self.collective {
                continue;
            }
            let work = Work {
                id: Stamp::new(id, self.current),
                global_count: global,
                shard_count: self.plan.shards,
                shards: built,
                last_of_epoch,
                push_state: mark && i == 0,
            };
            self.send(member, FromCoordinator::Work(work));
        }
        slots.sort_by_key(|(k, _)| *k);
        if let (true, Some(&uploader)) = (mark, members.first()) {
            self.uploaders.insert(id.next(self.plan.steps), uploader);
            while self.uploaders.len() > 16 {
                self.uploaders.pop_first();
            }
        }
        if self.collective && digest_due {
            if let Some(&source) = members.first() {
                self.sources.insert(id, source);
                while self.sources.len() > 16 {
                    self.sources.pop_first();
                }
            }
        }
        self.inflight.push(Step {
            id,
            membership: self.current,
            global,
            slots: slots.into_iter().map(|(_, s)| s).collect(),
            reports: BTreeMap::new(),
            timings: BTreeMap::new(),
            sent_at: std::time::Instant::now(),
            forced: false,
            non_finite: None,
        });
    }

    /// The samples at permutation positions `positions` as shard `index`.
    fn build_shard(
        &mut self,
        perm: &[u32],
        positions: std::ops::Range<usize>,
        index: u32,
    ) -> protocol::Shard {
        let indices = &perm[positions];
        let mut pixels = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        let mut ids = Vec::with_capacity(indices.len() * 4);
        for &i in indices {
            let i = i as usize;
            pixels.extend_from_slice(
                &self.data.train_images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS],
            );
            labels.push(self.data.train_labels[i]);
            ids.extend_from_slice(&(i as u32).to_le_bytes());
        }
        self.account.bytes += (pixels.len() + labels.len() + ids.len()) as u64;
        protocol::Shard {
            index,
            pixels: Bytes::from(pixels),
            labels: Bytes::from(labels),
            indices: Bytes::from(ids),
        }
    }

    /// Finishes the complete steps at the front, in order, and ends the epoch after its last.
    async fn complete_ready(&mut self) -> Result<(), JobError> {
        while let Some(step) = self.inflight.pop_complete() {
            let epoch = step.id.epoch;
            self.finish_step(step)?;
            self.settle_losses()?;
            if self.next.epoch != epoch {
                self.end_epoch(epoch).await?;
            }
        }
        Ok(())
    }

    fn finish_step(&mut self, step: Step) -> Result<(), JobError> {
        let id = step.id;
        let bytes_before = self.account.bytes;
        if !self.collective {
            self.reduce_and_apply(&step)?;
            self.replica_at = id.next(self.plan.steps);
        }
        let perm = self.permutation(id.epoch);
        for slot in &step.slots {
            self.account.cover(&perm, slot.range.clone());
        }
        let stats = step.stats();
        self.account.add(stats);
        self.account.steps += 1;
        self.samples_trained += step.global as u64;
        self.next = id.next(self.plan.steps);
        self.regroup.failures = 0;
        if let Some((since, _)) = self.recovering.take() {
            tracing::info!(
                "carrying on: {} finished {:.0} ms after the loss; {} worker(s)",
                self.plan.here(id),
                since.elapsed().as_secs_f64() * 1000.0,
                self.links.len()
            );
        }
        let progress = self.progress.get_or_insert_with(|| {
            EpochProgress::resume(id.epoch + 1, self.plan.epochs, self.plan.steps, id.step)
        });
        progress.update(
            id.step + 1,
            self.account.samples,
            self.account.loss_sum / self.account.samples.max(1) as f64,
            self.links.len(),
            self.account.membership_changes,
        );
        self.observe_step(&step, bytes_before);
        let last_of_epoch = id.step + 1 == self.plan.steps;
        if !self.collective
            && schedule::digest_due(
                id.step,
                self.shared.config.cluster.digest_every,
                last_of_epoch,
            )
        {
            let d = codec::state_digest(&self.params, self.optimizer.state());
            self.digests.reference(id, d);
        }
        self.check_digests();
        if self.plan.checkpoint_due(id) {
            let at = self.next;
            if !self.collective {
                let state = self.replica_state();
                let account = self.account.clone();
                self.write_checkpoint(&state, Some(&account))?;
            } else if let Some(state) = self.pushed.remove(&at) {
                let account = self.account.clone();
                self.write_checkpoint(&state, Some(&account))?;
            } else {
                self.pending_checkpoints.insert(at, self.account.clone());
            }
        }
        Ok(())
    }

    /// Tells the observers that `step` was applied.
    fn observe_step(&mut self, step: &Step, bytes_before: u64) {
        let now = std::time::Instant::now();
        let since = match self.last_step_at {
            Some(t) if step.id.step > 0 => t.max(step.sent_at),
            _ => step.sent_at,
        };
        self.last_step_at = Some(now);
        if self.observers.is_empty() {
            return;
        }
        let stats = step.stats();
        let record = StepRecord {
            epoch: step.id.epoch + 1,
            step: step.id.step + 1,
            steps_per_epoch: self.plan.steps,
            global_step: step.id.epoch * self.plan.steps + step.id.step + 1,
            samples: step.global as u64,
            loss: stats.loss_sum / stats.samples.max(1) as f64,
            epoch_loss: self.account.loss_sum / self.account.samples.max(1) as f64,
            seconds: now.saturating_duration_since(since).as_secs_f64(),
            bytes: self.account.bytes.saturating_sub(bytes_before),
            workers: self.links.len(),
            timings: step.worker_timings(|m| self.links.get(&m).map(|l| l.rank)),
        };
        self.observers.step(&record);
    }

    /// grpc mode: sums the step's shard gradients in shard order, averages over the global
    /// batch, sends the average to every member and applies it to the coordinator's replica.
    fn reduce_and_apply(&mut self, step: &Step) -> Result<(), JobError> {
        let parts = step
            .slots
            .iter()
            .map(|s| s.filled.as_ref().and_then(|f| f.gradient.as_deref()))
            .collect::<Option<Vec<&[u8]>>>()
            .ok_or_else(|| anyhow!("{} is complete but lacks a shard gradient", step.id))?;
        let mut average = std::mem::take(&mut self.average);
        average.resize(self.params.len(), 0.0);
        if let Err(bad) = average_in_shard_order(&parts, step.global, &mut average) {
            let by = step.slots[bad.part].filled.as_ref().map_or(0, |f| f.by);
            return Err(JobError::Diverged {
                reason: format!(
                    "{} sent shard {} with a {} ({})",
                    self.shared.describe(by),
                    bad.part,
                    match bad.error {
                        codec::CodecError::NonFinite(_) => "non-finite value",
                        _ => "malformed gradient",
                    },
                    bad.error
                ),
                at: self.plan.here(step.id),
            });
        }
        let data = Bytes::from(codec::le_bytes(&average).into_owned());
        self.account.bytes += parts.iter().map(|p| p.len() as u64).sum::<u64>()
            + (data.len() * self.links.len()) as u64;
        let stamp = Stamp::new(step.id, self.current);
        let members: Vec<MemberId> = self.links.keys().copied().collect();
        for member in members {
            self.send(
                member,
                FromCoordinator::Reduced {
                    id: stamp,
                    data: data.clone(),
                },
            );
        }
        self.optimizer.set_epoch(step.id.epoch);
        self.optimizer.step(&mut self.params, &average);
        self.average = average;
        Ok(())
    }

    /// Writes a checkpoint of `state` (with the epoch's account when mid-epoch) and removes
    /// the mid-epoch checkpoints it supersedes.
    fn write_checkpoint(
        &mut self,
        state: &TrainingState,
        account: Option<&EpochAccount>,
    ) -> Result<(), JobError> {
        let extras = account.map(EpochAccount::to_extras).unwrap_or_default();
        let path = self.run.save_checkpoint(
            state,
            &self.shared.layout,
            &self.shared.config_toml,
            &extras,
        )?;
        tracing::debug!("checkpoint {}", path.display());
        self.observers.checkpoint(&path);
        self.last_checkpoint = Some(path);
        Ok(())
    }

    /// After epoch `epoch`'s last step: the state (from the workers in collective modes),
    /// evaluation, checkpoint, metrics.
    async fn end_epoch(&mut self, epoch: u64) -> Result<(), JobError> {
        let epoch_seconds = self.account.seconds();
        if let Some(p) = self.progress.take() {
            p.finish();
        }
        let at = StepId::new(epoch + 1, 0);
        if let Some(state) = self.pushed.remove(&at) {
            self.adopt(state)?;
        }
        let deadline = Instant::now() + STATE_TIMEOUT;
        while self.replica_at != at {
            if let Some(reason) = self.regroup.needed.take() {
                self.regroup(reason).await?;
                continue;
            }
            if !self.pump(Some(deadline)).await? {
                return Err(JobError::Other(anyhow!(
                    "the state after epoch {} did not arrive from the workers within {}s",
                    epoch + 1,
                    STATE_TIMEOUT.as_secs()
                )));
            }
            if let Some(state) = self.pushed.remove(&at) {
                self.adopt(state)?;
            }
        }
        self.train_seconds += epoch_seconds;
        let eval_started = std::time::Instant::now();
        let test = self.evaluate().await?;
        let eval_seconds = eval_started.elapsed().as_secs_f64();
        let state = self.replica_state();
        self.write_checkpoint(&state, None)?;
        let a = &self.account;
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: a.loss_sum / a.samples.max(1) as f64,
            train_accuracy: a.correct as f64 / a.samples.max(1) as f64,
            test_loss: test.loss_sum / test.samples.max(1) as f64,
            test_accuracy: test.correct as f64 / test.samples.max(1) as f64,
            epoch_seconds,
            samples_per_second: a.applied() as f64 / epoch_seconds.max(1e-9),
            eval_seconds,
            workers: self.links.len() as u32,
            membership_changes: a.membership_changes,
            samples_covered: a.covered(),
            samples_applied: a.applied(),
            bytes_per_step: a.bytes as f64 / a.steps.max(1) as f64,
        };
        self.run.append_metrics(&m)?;
        self.observers.epoch(&m);
        tracing::info!(
            event = "epoch",
            epoch = m.epoch,
            epochs = self.plan.epochs,
            train_loss = m.train_loss,
            train_accuracy = m.train_accuracy,
            test_loss = m.test_loss,
            test_accuracy = m.test_accuracy,
            epoch_seconds = m.epoch_seconds,
            samples_per_second = m.samples_per_second,
            eval_seconds = m.eval_seconds,
            workers = m.workers,
            membership_changes = m.membership_changes,
            "{}",
            m.line(self.plan.epochs)
        );
        if m.samples_covered != self.plan.n_train as u64
            || m.samples_applied != self.plan.n_train as u64
        {
            tracing::error!(
                "epoch {} applied {} samples, {} distinct, of {}: some were lost or counted twice",
                m.epoch,
                m.samples_applied,
                m.samples_covered,
                self.plan.n_train
            );
        }
        self.last_metrics = Some(m);
        self.account = EpochAccount::new(self.plan.n_train);
        Ok(())
    }

    async fn evaluate(&self) -> Result<BatchStats, JobError> {
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
        Ok(tokio::task::spawn_blocking(move || {
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
        .context("evaluating on the test set")?)
    }

    /// Waits until every member's digest of the final step has matched the reference.
    async fn await_final_digests(&mut self) -> Result<(), JobError> {
        let last = StepId::new(self.plan.epochs - 1, self.plan.steps - 1);
        if self.replica_at < self.plan.end() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_digests();
            self.settle_losses()?;
            let unconfirmed: Vec<MemberId> = self
                .links
                .keys()
                .filter(|m| self.digests.verified(**m) != Some(last))
                .copied()
                .collect();
            if unconfirmed.is_empty() || self.samples_trained == 0 {
                return Ok(());
            }
            if !self.pump(Some(deadline)).await? {
                let who: Vec<String> = unconfirmed
                    .iter()
                    .map(|m| self.shared.describe(*m))
                    .collect();
                return Err(JobError::Other(anyhow!(
                    "{} did not confirm the final parameter digest within 30s",
                    who.join(", ")
                )));
            }
        }
    }

    fn summary(&mut self) -> Result<Summary, JobError> {
        let cfg = &self.shared.config;
        let last = self
            .last_metrics
            .clone()
            .ok_or_else(|| anyhow!("no epoch ran"))?;
        let summary = Summary {
            preset: cfg.preset.clone(),
            model: cfg.model.describe(),
            parameters: self.network.num_params(),
            epochs: cfg.epochs as u64,
            test_accuracy: last.test_accuracy,
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            samples_per_second: self.samples_trained as f64 / self.train_seconds.max(1e-9),
            train_seconds: self.train_seconds,
            total_seconds: self.started.elapsed().as_secs_f64(),
            workers: self.links.len() as u32,
            membership_changes: self.membership_changes,
            backend: cfg.backend.to_string(),
            seed: cfg.seed,
            params_sha256: digest(&[&self.params]),
        };
        let info = ModelInfo {
            model: cfg.model.clone(),
            normalize: cfg.normalize,
        };
        self.run
            .finish(&self.shared.layout, &self.params, &info, &summary)?;
        self.observers.finished(&summary);
        Ok(summary)
    }
}

#[cfg(test)]
mod tests;
