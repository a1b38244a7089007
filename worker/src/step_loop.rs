//! The compute thread: owns the model replica and its training state, and runs the one step
//! loop every backend shares. Top to bottom, a step is:
//!
//! 1. work for the next unapplied step arrives (its shards; in grpc mode possibly in several
//!    messages, when the coordinator hands out the shards of a worker it lost);
//! 2. forward + backward on each shard on its own, so a shard's gradient is the same whoever
//!    computes it;
//! 3. the backend's [`AllReduce`] turns the shard gradients into the step's average (a message
//!    from the coordinator later for grpc; an exchange with the peers for tcp and nccl);
//! 4. the optimizer step ([`ModelState`]), then the reports: a `StepDone` (collective modes),
//!    a digest when one is due, the state when the coordinator asked for it.
//!
//! Membership changes arrive as messages in the same order as the work: `Configure` (adopt a
//! state, form the membership's collective), `Pause` (collective modes: drop the collective and
//! the membership's queued work, report where this replica is). A collective that breaks
//! mid-step (a peer vanished) is reported as `StepFailed`, and the worker waits for the
//! coordinator's next membership instead of exiting.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use lockstep_common::checkpoint::TrainingState;
use lockstep_common::config::JobConfig;
use lockstep_common::model::{batch_tensors, BatchStats, Gradients, Network, Replica};
use lockstep_common::protocol::{
    indices_digest, Configure, FromCoordinator, FromWorker, ShardDone, Stamp, StepDone, StepId,
    Work,
};
use lockstep_common::schedule;

use crate::abort::{is_interrupted, AbortSignal};
use crate::allreduce::{
    is_diverged, AllReduce, Bootstrap, CoordinatorReduce, Diverged, Former, ShardResult, StepWork,
};
use crate::state::{Averaged, ModelState};
use crate::stream::{Outbox, StepChannels};

/// Collective modes: `StepDone` reports sent together (see `Loop::held`), unless the first of
/// them has waited this long (slow steps report one by one, as before).
const REPORT_BURST: usize = 8;
const REPORT_WITHIN: Duration = Duration::from_millis(20);

/// How long the ranks of a new membership wait for each other.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where training states come from and go to (the coordinator's `FetchState`/`PushState`).
pub trait StateService: Send {
    /// The state announced as `version`.
    fn fetch(&mut self, version: u64) -> Result<TrainingState>;
    /// Uploads `state`, tagged with `version`.
    fn push(&mut self, version: u64, state: &TrainingState) -> Result<()>;
}

/// What the loop runs with.
pub struct Setup {
    /// The job configuration.
    pub config: JobConfig,
    /// The network (its layout matches the coordinator's).
    pub network: Network,
    /// Steps per epoch, from the join reply.
    pub steps_per_epoch: u64,
    /// Where the replica computes.
    pub device: Device,
    /// The training state's home (host or device).
    pub state: Box<dyn ModelState>,
    /// The step stream.
    pub channels: StepChannels,
    /// Tripped by the stream task.
    pub abort: AbortSignal,
    /// The coordinator's state transfers.
    pub states: Box<dyn StateService>,
    /// How collectives are formed (tcp, nccl); `None` in grpc mode.
    pub former: Option<Box<dyn Former>>,
}

/// Where a worker's step time goes, logged when the loop ends. (On a GPU the kernels run
/// asynchronously: there the figures say where the host waits, not where the device works.)
#[derive(Default)]
struct StepTimes {
    steps: u64,
    compute_s: f64,
    wait_s: f64,
    apply_s: f64,
}

impl StepTimes {
    fn log(&self) {
        if self.steps == 0 {
            return;
        }
        let per = |s: f64| s * 1000.0 / self.steps as f64;
        tracing::info!(
            event = "step_times",
            steps = self.steps,
            compute_ms = per(self.compute_s),
            allreduce_wait_ms = per(self.wait_s),
            apply_ms = per(self.apply_s),
            "{} steps: {:.3} ms/step computing gradients, {:.3} ms/step waiting for the all-reduce, {:.3} ms/step applying it",
            self.steps,
            per(self.compute_s),
            per(self.wait_s),
            per(self.apply_s)
        );
    }
}

/// What is known of a step between computing it and applying it.
#[derive(Default)]
struct Pending {
    last_of_epoch: bool,
    push_state: bool,
    shards: Vec<ShardDone>,
    stats: BatchStats,
    started: Option<Instant>,
    /// When the last of its shard gradients went to the coordinator (grpc).
    submitted: Option<Instant>,
    /// Time waited for its all-reduce so far.
    wait_s: f64,
}

/// Runs the step loop until the stream ends. Returns the number of steps applied.
pub fn run(setup: Setup) -> Result<u64> {
    let mut l = Loop::new(setup);
    loop {
        let msg = match l.inbox.try_recv() {
            Ok(msg) => msg,
            Err(std_mpsc::TryRecvError::Disconnected) => break,
            Err(std_mpsc::TryRecvError::Empty) => {
                // Nothing to do until the coordinator sends more: the reports it waits for go
                // out first.
                l.flush_reports();
                match l.inbox.recv() {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            }
        };
        match msg {
            FromCoordinator::Configure(c) => l.configure(c)?,
            FromCoordinator::Work(w) => l.queue(w),
            FromCoordinator::Reduced { id, data } => l.reduced(id, data)?,
            FromCoordinator::Pause { membership } => l.pause(membership)?,
            FromCoordinator::PushState { version } => l.push(version)?,
            other => tracing::debug!("ignoring {other:?} on the compute thread"),
        }
        l.progress()?;
    }
    l.flush_reports();
    l.times.log();
    Ok(l.times.steps)
}

struct Loop {
    config: JobConfig,
    network: Network,
    steps_per_epoch: u64,
    device: Device,
    collective: bool,
    /// On a GPU, statistics stay on the device and are read every few steps.
    read_stats_every: u64,
    replica: Option<Replica>,
    state: Box<dyn ModelState>,
    reduce: Option<Box<dyn AllReduce>>,
    former: Option<Box<dyn Former>>,
    states: Box<dyn StateService>,
    inbox: std_mpsc::Receiver<FromCoordinator>,
    relayed: std_mpsc::Receiver<(Bytes, u64)>,
    out: Outbox,
    abort: AbortSignal,
    /// The first step this replica has not applied.
    next: StepId,
    membership: u64,
    /// Collective modes: the membership's collective broke; wait for the coordinator.
    broken: bool,
    queued: BTreeMap<StepId, Vec<Work>>,
    pending: BTreeMap<StepId, Pending>,
    /// Device statistics not yet read: `[loss_sum, correct]` and their sample count.
    lazy: Option<(Tensor, u32)>,
    steps_since_read: u64,
    /// Collective modes: `StepDone` reports not sent yet. They go out [`REPORT_BURST`] at a
    /// time (each message wakes the stream task here and the coordinator's there, which on a
    /// small model costs the cores more than the step's bookkeeping), or once the first has
    /// waited [`REPORT_WITHIN`]; at once after a step that ends an epoch, is due a digest or
    /// uploads the state, and before anything else is sent or the loop waits for the
    /// coordinator.
    held: Vec<FromWorker>,
    /// When the first held report was made.
    held_since: Option<Instant>,
    scratch: Vec<f32>,
    times: StepTimes,
    /// The last applied step's all-reduce wait and apply time, in ms, for the reports.
    previous: (f32, f32),
}

impl Loop {
    fn new(s: Setup) -> Self {
        let on_cpu = s.device.is_cpu();
        Self {
            collective: s.former.is_some(),
            read_stats_every: if on_cpu { 1 } else { 50 },
            config: s.config,
            network: s.network,
            steps_per_epoch: s.steps_per_epoch.max(1),
            device: s.device,
            replica: None,
            state: s.state,
            reduce: None,
            former: s.former,
            states: s.states,
            inbox: s.channels.inbox,
            relayed: s.channels.relayed,
            out: s.channels.out,
            abort: s.abort,
            next: StepId::default(),
            membership: 0,
            broken: false,
            queued: BTreeMap::new(),
            pending: BTreeMap::new(),
            lazy: None,
            steps_since_read: 0,
            held: Vec::new(),
            held_since: None,
            scratch: Vec::new(),
            times: StepTimes::default(),
            previous: (0.0, 0.0),
        }
    }

    fn configure(&mut self, c: Configure) -> Result<()> {
        if let Some(version) = c.state_version {
            let st = self.states.fetch(version)?;
            let replica = match self.replica.as_mut() {
                Some(r) => r,
                None => self.replica.insert(Replica::new(
                    self.network.clone(),
                    &st.params,
                    self.device.clone(),
                )?),
            };
            self.state.load(&st, replica)?;
            self.next = StepId::new(st.position.epoch, st.position.step);
            tracing::info!(
                event = "state",
                epoch = self.next.epoch + 1,
                step = self.next.step + 1,
                state_version = version,
                "adopted the job's state at {} (state version {version})",
                self.next
            );
        } else if self.replica.is_none() {
            bail!(
                "protocol error: the coordinator configured this worker without giving it a state"
            );
        }
        self.membership = c.membership;
        self.broken = false;
        if self.former.is_none() {
            if self.reduce.is_none() {
                self.reduce = Some(Box::new(CoordinatorReduce::new(self.out.clone())));
            }
            return Ok(());
        }
        self.drop_collective();
        let membership = c.membership;
        self.queued.retain(|_, works| {
            works.retain(|w| w.id.membership == membership);
            !works.is_empty()
        });
        let boot = Bootstrap {
            out: &self.out,
            relayed: &self.relayed,
            abort: &self.abort,
            timeout: COLLECTIVE_TIMEOUT,
        };
        let former = self.former.as_mut().context("no collective")?;
        match former.form(c.membership, c.rank, c.world, &boot) {
            Ok(reduce) => {
                self.reduce = Some(reduce);
                tracing::info!(
                    event = "collective",
                    rank = c.rank,
                    world = c.world,
                    membership = c.membership,
                    "{} collective ready: rank {} of {} (membership {})",
                    self.config.backend,
                    c.rank,
                    c.world,
                    c.membership
                );
            }
            // A newer pause is waiting in the inbox: handle it next.
            Err(e) if is_interrupted(&e) => self.drop_collective(),
            Err(e) => self.report_failure(
                self.next,
                e.context(format!(
                    "forming the collective of membership {}",
                    c.membership
                )),
            ),
        }
        Ok(())
    }

    fn queue(&mut self, w: Work) {
        if self.collective && w.id.membership != self.membership {
            tracing::debug!(
                "dropping work of membership {} for {}",
                w.id.membership,
                w.id.id
            );
            return;
        }
        if self.replica.is_some() && w.id.id < self.next {
            tracing::debug!("dropping work for {}, which is applied", w.id.id);
            return;
        }
        self.queued.entry(w.id.id).or_default().push(w);
    }

    /// Computes and submits queued work for the next step, as long as there is some.
    fn progress(&mut self) -> Result<()> {
        loop {
            if self.replica.is_none() || self.reduce.is_none() || self.broken {
                return Ok(());
            }
            let step = self.next;
            let Some(works) = self.queued.remove(&step) else {
                return Ok(());
            };
            match self.compute_and_submit(step, works) {
                Ok(Some(average)) => self.apply(step, average)?,
                Ok(None) => return Ok(()),
                Err(e) if is_interrupted(&e) => {
                    self.drop_collective();
                    return Ok(());
                }
                Err(e) if self.collective => {
                    self.report_failure(step, e);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn compute_and_submit(&mut self, step: StepId, works: Vec<Work>) -> Result<Option<Averaged>> {
        let first = &works[0];
        let meta = StepWork {
            id: first.id,
            global_count: first.global_count,
            shard_count: first.shard_count,
        };
        let started = Instant::now();
        let replica = self.replica.as_ref().context("no replica")?;
        let mut results = Vec::new();
        let pending = self.pending.entry(step).or_default();
        pending.started.get_or_insert(started);
        for w in works {
            if (w.global_count, w.shard_count) != (meta.global_count, meta.shard_count) {
                bail!(
                    "protocol error: two pieces of work for {step} disagree on the global batch ({} and {})",
                    meta.global_count,
                    w.global_count
                );
            }
            pending.last_of_epoch |= w.last_of_epoch;
            pending.push_state |= w.push_state;
            for shard in w.shards {
                let shard_started = Instant::now();
                let count = shard.count();
                let (gradient, stats) = if count == 0 {
                    (Gradients::zeros(&self.network, &self.device)?, None)
                } else {
                    let (x, y) = batch_tensors(
                        &shard.pixels,
                        &shard.labels,
                        self.config.normalize,
                        &self.device,
                        &mut self.scratch,
                    )?;
                    let (g, st) = replica.gradient_lazy(&x, &y)?;
                    (g, Some(st))
                };
                let stats = match stats {
                    None => Some(BatchStats::default()),
                    Some(st) if self.read_stats_every == 1 => {
                        Some(BatchStats::from_tensor(&st, count)?)
                    }
                    Some(st) => {
                        self.lazy = Some(match self.lazy.take() {
                            None => (st, count),
                            Some((acc, n)) => ((acc + st)?, n + count),
                        });
                        None
                    }
                };
                let done = ShardDone {
                    shard: shard.index,
                    samples: count,
                    indices_digest: indices_digest(&shard.indices),
                };
                pending.shards.push(done);
                if let Some(st) = stats {
                    pending.stats.loss_sum += st.loss_sum;
                    pending.stats.correct += st.correct;
                    pending.stats.samples += st.samples;
                }
                results.push(ShardResult {
                    index: shard.index,
                    gradient,
                    stats,
                    samples: count,
                    indices_digest: done.indices_digest,
                    compute_ms: shard_started.elapsed().as_secs_f32() * 1000.0,
                    previous: self.previous,
                });
            }
        }
        results.sort_by_key(|r| r.index);
        let computed = Instant::now();
        self.times.compute_s += (computed - started).as_secs_f64();
        let reduce = self.reduce.as_mut().context("no all-reduce")?;
        // The step is named here: a rank may run a step ahead of the one the coordinator is
        // collecting, so the coordinator's own "during step" can be one behind.
        let average = reduce
            .submit(&meta, results)
            .with_context(|| format!("all-reducing the gradient of {step}"))?;
        let waited = computed.elapsed().as_secs_f64();
        let pending = self.pending.entry(step).or_default();
        if average.is_none() {
            // grpc: the average comes later as a message; the wait ends when it is applied.
            pending.submitted = Some(Instant::now());
        }
        pending.wait_s += waited;
        self.times.wait_s += waited;
        Ok(average)
    }

    fn reduced(&mut self, id: Stamp, data: Bytes) -> Result<()> {
        if self.collective {
            bail!(
                "protocol error: the coordinator sent an average gradient to a collective worker"
            );
        }
        if id.id < self.next {
            tracing::debug!("dropping the average of {}, which is applied", id.id);
            return Ok(());
        }
        if id.id != self.next {
            bail!(
                "protocol error: the average of {} arrived before that of {}",
                id.id,
                self.next
            );
        }
        self.apply(id.id, Averaged::Bytes(data))
    }

    fn apply(&mut self, step: StepId, average: Averaged) -> Result<()> {
        let applied = Instant::now();
        let mut pending = self.pending.remove(&step).unwrap_or_default();
        if let Some(submitted) = pending.submitted {
            let waited = (applied - submitted).as_secs_f64();
            pending.wait_s += waited;
            self.times.wait_s += waited;
        }
        let replica = self.replica.as_mut().context("no replica")?;
        self.state.apply(step.epoch, average, replica)?;
        self.next = step.next(self.steps_per_epoch);
        let last_of_epoch = pending.last_of_epoch || self.next.epoch != step.epoch;
        let apply_s = applied.elapsed().as_secs_f64();
        self.times.apply_s += apply_s;
        self.times.steps += 1;
        self.previous = ((pending.wait_s * 1000.0) as f32, (apply_s * 1000.0) as f32);
        self.steps_since_read += 1;
        let stamp = Stamp::new(step, self.membership);
        if self.collective {
            let mut stats = pending.stats;
            // Loss and accuracy read from the device only now and then (a host synchronisation);
            // the steps in between report zeros, and the coordinator's epoch sums come out the
            // same. The same read checks that the parameters are still finite: no reducer looks at
            // the summed gradients of an NCCL job, and a NaN reaches every rank alike, where the
            // digests cannot see it.
            const READ_EVERY: u64 = 50;
            if last_of_epoch || self.steps_since_read >= READ_EVERY {
                if let Some((acc, samples)) = self.lazy.take() {
                    let read = BatchStats::from_tensor(&acc, samples)?;
                    stats.loss_sum += read.loss_sum;
                    stats.correct += read.correct;
                    stats.samples += read.samples;
                }
                self.steps_since_read = 0;
                if !self.state.params_finite()? {
                    let e = anyhow::Error::new(Diverged(format!(
                        "the parameters hold a NaN or infinity after {step}: training diverged (a learning rate \
                         too high?); the last checkpoint is from before"
                    )));
                    self.report_failure(step, e);
                    return Ok(());
                }
            }
            let done = FromWorker::StepDone(StepDone {
                id: stamp,
                shards: pending.shards,
                stats,
                compute_ms: pending
                    .started
                    .map_or(0.0, |s| s.elapsed().as_secs_f32() * 1000.0),
                wait_ms: self.previous.0,
                apply_ms: self.previous.1,
            });
            self.held.push(done);
            self.held_since.get_or_insert_with(Instant::now);
        }
        let digest_due =
            schedule::digest_due(step.step, self.config.cluster.digest_every, last_of_epoch);
        let held_long = self
            .held_since
            .is_some_and(|t| t.elapsed() >= REPORT_WITHIN);
        if (self.held.len() >= REPORT_BURST
            || held_long
            || last_of_epoch
            || digest_due
            || pending.push_state)
            && !self.flush_reports()
        {
            bail!("the step stream closed after {step}");
        }
        if digest_due {
            let sha256 = self.state.digest()?;
            self.out.send(FromWorker::Digest { id: stamp, sha256 });
        }
        if pending.push_state {
            self.push(0)
                .with_context(|| format!("uploading the state after {step}"))?;
        }
        Ok(())
    }

    /// Sends the held reports; false when the stream has closed.
    fn flush_reports(&mut self) -> bool {
        self.held_since = None;
        self.held.drain(..).all(|m| self.out.send(m))
    }

    fn push(&mut self, version: u64) -> Result<()> {
        self.flush_reports();
        let state = self.state.snapshot(self.next)?;
        self.states.push(version, &state)
    }

    fn pause(&mut self, membership: u64) -> Result<()> {
        self.flush_reports();
        self.abort.acknowledge();
        self.drop_collective();
        self.queued.clear();
        self.pending.clear();
        self.broken = false;
        let sha256 = match self.replica {
            Some(_) => self.state.digest()?,
            None => "0".repeat(64),
        };
        self.out.send(FromWorker::Paused {
            next: Stamp::new(self.next, membership),
            sha256,
        });
        Ok(())
    }

    /// Collective modes: tells the coordinator that `step` could not be finished here, drops
    /// the collective, and waits for the coordinator's next membership (or the job's end).
    fn report_failure(&mut self, step: StepId, e: anyhow::Error) {
        self.flush_reports();
        let diverged = is_diverged(&e);
        let reason = format!("{e:#}");
        tracing::warn!("{reason}");
        self.out.send(FromWorker::StepFailed {
            id: Stamp::new(step, self.membership),
            reason,
            diverged,
        });
        self.broken = true;
        self.drop_collective();
        self.queued.clear();
        self.pending.clear();
    }

    fn drop_collective(&mut self) {
        if self.collective {
            self.reduce = None;
            self.abort.clear_hooks();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HostState;
    use lockstep_common::checkpoint::Position;
    use lockstep_common::mnist::IMAGE_PIXELS;
    use lockstep_common::optim::Optimizer;
    use lockstep_common::protocol::Shard;
    use lockstep_common::wire::pb;
    use std::sync::{Arc, Mutex};

    /// A coordinator's state service that hands out one state and records uploads.
    struct FakeStates {
        state: TrainingState,
        pushed: Arc<Mutex<Vec<(u64, TrainingState)>>>,
    }

    impl StateService for FakeStates {
        fn fetch(&mut self, _version: u64) -> Result<TrainingState> {
            Ok(self.state.clone())
        }
        fn push(&mut self, version: u64, state: &TrainingState) -> Result<()> {
            self.pushed.lock().unwrap().push((version, state.clone()));
            Ok(())
        }
    }

    /// The stand-in for NCCL: every membership forms a new one-rank "communicator" (recorded),
    /// whose all-reduce is the rank's own shards summed in shard order, divided by the global
    /// count, unless told to fail.
    struct StandIn {
        formed: Arc<Mutex<Vec<(u64, u32, u32)>>>,
        fail: Arc<Mutex<bool>>,
    }

    struct OneRank {
        fail: Arc<Mutex<bool>>,
    }

    impl AllReduce for OneRank {
        fn submit(
            &mut self,
            step: &StepWork,
            shards: Vec<ShardResult>,
        ) -> Result<Option<Averaged>> {
            if *self.fail.lock().unwrap() {
                bail!("the other rank closed the connection");
            }
            let parts: Vec<Vec<u8>> = shards
                .iter()
                .map(|s| s.gradient.to_bytes().unwrap())
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; parts[0].len() / 4];
            lockstep_common::reduce::average_in_shard_order(&refs, step.global_count, &mut out)
                .map_err(|e| Diverged(format!("shard {}: {}", e.part, e.error)))?;
            Ok(Some(Averaged::Host(std::sync::Arc::new(out))))
        }
    }

    impl Former for StandIn {
        fn form(
            &mut self,
            membership: u64,
            rank: u32,
            world: u32,
            boot: &Bootstrap<'_>,
        ) -> Result<Box<dyn AllReduce>> {
            self.formed.lock().unwrap().push((membership, rank, world));
            if rank == 0 {
                boot.publish(membership, format!("id-{membership}").into_bytes())?;
            }
            Ok(Box::new(OneRank {
                fail: self.fail.clone(),
            }))
        }
    }

    struct Harness {
        inbox: std_mpsc::Sender<FromCoordinator>,
        out: tokio::sync::mpsc::UnboundedReceiver<pb::WorkerMessage>,
        formed: Arc<Mutex<Vec<(u64, u32, u32)>>>,
        fail: Arc<Mutex<bool>>,
        pushed: Arc<Mutex<Vec<(u64, TrainingState)>>>,
        thread: std::thread::JoinHandle<Result<u64>>,
    }

    fn harness(collective: bool) -> Harness {
        harness_with(collective, 0.1)
    }

    fn harness_with(collective: bool, lr: f64) -> Harness {
        harness_full(collective, lr, 3)
    }

    fn harness_full(collective: bool, lr: f64, steps_per_epoch: u64) -> Harness {
        let mut config = JobConfig::preset("softmax").unwrap();
        config.optimizer.lr = lr;
        let network = Network::new(&config.model);
        let params = network.init_params(1);
        let n = params.len();
        let state = TrainingState {
            params,
            optimizer: Optimizer::new(config.optimizer.clone(), n).state().clone(),
            position: Position { epoch: 0, step: 0 },
        };
        let (inbox_tx, inbox) = std_mpsc::channel();
        let (_relay_tx, relayed) = std_mpsc::channel();
        let (out, out_rx) = Outbox::capture();
        let formed = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(Mutex::new(false));
        let pushed = Arc::new(Mutex::new(Vec::new()));
        let former: Option<Box<dyn Former>> = collective.then(|| {
            Box::new(StandIn {
                formed: formed.clone(),
                fail: fail.clone(),
            }) as Box<dyn Former>
        });
        let setup = Setup {
            state: Box::new(HostState::new(config.optimizer.clone(), n).unwrap()),
            config,
            network,
            steps_per_epoch,
            device: Device::Cpu,
            channels: StepChannels {
                inbox,
                relayed,
                out,
            },
            abort: AbortSignal::default(),
            states: Box::new(FakeStates {
                state,
                pushed: pushed.clone(),
            }),
            former,
        };
        let thread = std::thread::spawn(move || {
            let _keep = _relay_tx;
            run(setup)
        });
        Harness {
            inbox: inbox_tx,
            out: out_rx,
            formed,
            fail,
            pushed,
            thread,
        }
    }

    fn shard(index: u32) -> Shard {
        Shard {
            index,
            pixels: Bytes::from(vec![(index * 40) as u8; 2 * IMAGE_PIXELS]),
            labels: Bytes::from(vec![1u8, 7]),
            indices: Bytes::from(vec![index as u8; 8]),
        }
    }

    fn work(step: u64, membership: u64, shards: Vec<Shard>) -> FromCoordinator {
        FromCoordinator::Work(Work {
            id: Stamp::new(StepId::new(0, step), membership),
            global_count: 4,
            shard_count: 2,
            shards,
            last_of_epoch: step == 2,
            push_state: false,
        })
    }

    fn configure(membership: u64, state: bool) -> FromCoordinator {
        FromCoordinator::Configure(Configure {
            membership,
            rank: 0,
            world: 1,
            state_version: state.then_some(1),
        })
    }

    /// The next message of a kind other than heartbeats, within 10 s.
    fn next(h: &mut Harness) -> FromWorker {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match h.out.try_recv() {
                Ok(m) => {
                    let m = FromWorker::try_from(m).unwrap();
                    if !matches!(m, FromWorker::Digest { .. }) {
                        return m;
                    }
                }
                Err(_) => {
                    assert!(Instant::now() < deadline, "no message from the step loop");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    #[test]
    fn grpc_computes_every_shard_it_is_given_then_applies_the_average() {
        let mut h = harness(false);
        h.inbox.send(configure(1, true)).unwrap();
        h.inbox.send(work(0, 1, vec![shard(0)])).unwrap();
        let FromWorker::Gradient(g0) = next(&mut h) else {
            panic!("a shard gradient")
        };
        assert_eq!((g0.shard, g0.stats.samples), (0, 2));
        assert_eq!(g0.indices_digest, indices_digest(&[0u8; 8]));
        // The coordinator lost a worker and hands this one its shard of the same step.
        h.inbox.send(work(0, 2, vec![shard(1)])).unwrap();
        let FromWorker::Gradient(g1) = next(&mut h) else {
            panic!("a shard gradient")
        };
        assert_eq!(g1.shard, 1);
        assert_ne!(g0.data, g1.data, "each shard is computed on its own");
        // Work for the next step waits until this one is applied.
        h.inbox.send(work(1, 2, vec![shard(0), shard(1)])).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            h.out.try_recv().is_err(),
            "step 2 must wait for the average of step 1"
        );
        let zeros = Bytes::from(vec![0u8; g0.data.len()]);
        h.inbox
            .send(FromCoordinator::Reduced {
                id: Stamp::new(StepId::new(0, 0), 1),
                data: zeros,
            })
            .unwrap();
        for shard in [0, 1] {
            let FromWorker::Gradient(g) = next(&mut h) else {
                panic!("a shard gradient")
            };
            assert_eq!((g.id.id, g.shard), (StepId::new(0, 1), shard));
        }
        drop(h.inbox);
        assert_eq!(h.thread.join().unwrap().unwrap(), 1);
    }

    #[test]
    fn held_step_reports_all_go_out_in_order_when_the_work_runs_out_mid_epoch() {
        // 11 steps of a 100-step epoch: more than a burst, not a multiple of it, no epoch end.
        let mut h = harness_full(true, 0.1, 100);
        h.inbox.send(configure(1, true)).unwrap();
        assert!(matches!(next(&mut h), FromWorker::Rendezvous { .. }));
        for step in 0..11 {
            let FromCoordinator::Work(mut w) = work(step, 1, vec![shard(0), shard(1)]) else {
                unreachable!()
            };
            w.last_of_epoch = false;
            h.inbox.send(FromCoordinator::Work(w)).unwrap();
        }
        for step in 0..11 {
            let FromWorker::StepDone(done) = next(&mut h) else {
                panic!("a StepDone for step {step}")
            };
            assert_eq!(done.id.id, StepId::new(0, step));
        }
        drop(h.inbox);
        assert_eq!(h.thread.join().unwrap().unwrap(), 11);
    }

    #[test]
    fn a_collective_regroups_with_a_new_communicator_per_membership() {
        let mut h = harness(true);
        h.inbox.send(configure(1, true)).unwrap();
        let FromWorker::Rendezvous { blob, membership } = next(&mut h) else {
            panic!("rank 0 publishes its rendezvous")
        };
        assert_eq!((&blob[..], membership), (&b"id-1"[..], 1));
        h.inbox.send(work(0, 1, vec![shard(0), shard(1)])).unwrap();
        let FromWorker::StepDone(done) = next(&mut h) else {
            panic!("a StepDone")
        };
        assert_eq!(done.id, Stamp::new(StepId::new(0, 0), 1));
        assert_eq!(
            done.shards.iter().map(|s| s.shard).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(done.stats.samples, 4);

        // A peer vanishes mid all-reduce: the worker reports it and waits.
        *h.fail.lock().unwrap() = true;
        h.inbox.send(work(1, 1, vec![shard(0), shard(1)])).unwrap();
        let FromWorker::StepFailed {
            id,
            reason,
            diverged,
        } = next(&mut h)
        else {
            panic!("a StepFailed")
        };
        assert_eq!(id.id, StepId::new(0, 1));
        assert!(
            reason.contains("closed the connection") && !diverged,
            "{reason}"
        );
        // Work of the broken membership is not computed.
        h.inbox.send(work(2, 1, vec![shard(0), shard(1)])).unwrap();

        // The coordinator pauses; the replica says where it is; a new membership forms a new
        // communicator, and stale work of membership 1 is dropped.
        *h.fail.lock().unwrap() = false;
        h.inbox
            .send(FromCoordinator::Pause { membership: 1 })
            .unwrap();
        let FromWorker::Paused { next: at, sha256 } = next(&mut h) else {
            panic!("Paused")
        };
        assert_eq!(at, Stamp::new(StepId::new(0, 1), 1));
        assert_eq!(sha256.len(), 64);
        h.inbox.send(work(1, 1, vec![shard(0), shard(1)])).unwrap();
        h.inbox.send(configure(2, false)).unwrap();
        let FromWorker::Rendezvous { membership, .. } = next(&mut h) else {
            panic!("rendezvous")
        };
        assert_eq!(membership, 2);
        h.inbox.send(work(1, 2, vec![shard(0), shard(1)])).unwrap();
        let FromWorker::StepDone(done) = next(&mut h) else {
            panic!("a StepDone")
        };
        assert_eq!(done.id, Stamp::new(StepId::new(0, 1), 2));
        assert_eq!(*h.formed.lock().unwrap(), vec![(1, 0, 1), (2, 0, 1)]);

        // The state is uploaded on request, tagged with the version asked for.
        h.inbox
            .send(FromCoordinator::PushState { version: 9 })
            .unwrap();
        drop(h.inbox);
        assert_eq!(h.thread.join().unwrap().unwrap(), 2);
        let pushed = h.pushed.lock().unwrap();
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].0, 9);
        assert_eq!(pushed[0].1.position, Position { epoch: 0, step: 2 });
    }

    #[test]
    fn a_diverging_collective_step_is_reported_as_divergence() {
        // SGD with a learning rate that is infinite in f32: after one step the parameters are
        // infinite, and the next step's gradients are not finite.
        let mut h = harness_with(true, 1e300);
        h.inbox.send(configure(1, true)).unwrap();
        let _rendezvous = next(&mut h);
        for step in 0..3 {
            h.inbox
                .send(work(step, 1, vec![shard(0), shard(1)]))
                .unwrap();
        }
        let FromWorker::StepDone(done) = next(&mut h) else {
            panic!("step 1 is applied")
        };
        assert_eq!(done.id.id, StepId::new(0, 0));
        let FromWorker::StepFailed {
            id,
            reason,
            diverged,
        } = next(&mut h)
        else {
            panic!("a StepFailed")
        };
        assert!(diverged, "{reason}");
        assert_eq!(id.id, StepId::new(0, 1));
        assert!(
            reason.contains("all-reducing the gradient of epoch 1 step 2"),
            "{reason}"
        );
        drop(h.inbox);
        assert_eq!(h.thread.join().unwrap().unwrap(), 1);
    }
}
