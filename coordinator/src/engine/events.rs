//! What each event from the service means for the job. Reports fill their steps' shard slots;
//! digests are compared; a worker that joins enters at a step boundary; and a worker that is
//! lost — its stream closed, it went silent, its process exited, it left, it sent something that
//! does not fit, its digest differs, or its part of a step stalled — is dropped, and the job
//! carries on without it as long as `cluster.min_workers` are left:
//!
//! - grpc: the shards it had not delivered go to the survivors, in the same steps; the shards it
//!   delivered are kept (a shard's gradient does not depend on who computed it);
//! - tcp, nccl: the membership regroups ([`super::regroup`]).
//!
//! A local worker declared lost is killed (it may be frozen) and, while `--max-restarts`
//! allows, started again; it then joins as a replacement.

use lockstep_common::checkpoint::TrainingState;
use lockstep_common::protocol::{FromWorker, ShardGradient, Stamp, StepDone, StepId};

use super::inflight::Filled;
use super::Engine;
use crate::error::{Cause, JobError, Lost};
use crate::membership::MemberId;
use crate::observe::MemberEventKind;
use crate::service::{Event, WorkerTx};

impl Engine {
    /// Handles one event during training.
    pub(super) fn handle(&mut self, event: Event) -> Result<(), JobError> {
        match event {
            Event::StreamOpened { member, tx } => self.admit(member, tx),
            Event::Message { member, msg } => {
                if self.links.contains_key(&member) || self.waiting.contains_key(&member) {
                    self.on_message(member, msg)?;
                } else {
                    tracing::debug!("dropping a {} from member {member}, no longer in the job", msg.kind());
                }
            }
            Event::Malformed { member, error } => self.casualties.push((
                member,
                Cause::Malformed(format!("it sent a message that breaks the protocol ({error})")),
            )),
            Event::StreamClosed { member, reason } => {
                self.casualties.push((member, Cause::StreamClosed(reason)))
            }
            Event::Left { member, reason } => self.casualties.push((member, Cause::Left(reason))),
            Event::ProcessExited { index, pid, detail } => {
                match self.shared.members().by_pid(pid) {
                    Some(member) => self.casualties.push((member, Cause::Exited(detail))),
                    None => tracing::info!(
                        "local worker process {index} (pid {pid}) exited; it was not (or no longer) in the job"
                    ),
                }
            }
            Event::Interrupted(signal) => return Err(JobError::Interrupted(signal)),
            Event::StatePushed {
                member,
                version,
                bytes,
            } => self.on_pushed(member, version, bytes)?,
        }
        Ok(())
    }

    fn on_message(&mut self, member: MemberId, msg: FromWorker) -> Result<(), JobError> {
        match msg {
            FromWorker::Gradient(g) if !self.collective => self.on_gradient(member, g)?,
            FromWorker::StepDone(d) if self.collective => self.on_step_done(member, d),
            FromWorker::Digest { id, sha256 } => {
                if self.collective && self.sources.get(&id.id) == Some(&member) {
                    self.digests.reference(id.id, sha256.clone());
                }
                self.digests.report(member, id.id, sha256);
                self.check_digests();
            }
            FromWorker::Rendezvous { blob, membership } => {
                self.on_rendezvous(member, blob, membership)
            }
            FromWorker::Paused { next, sha256 } => self.on_paused(member, next, sha256),
            FromWorker::StepFailed {
                id,
                reason,
                diverged,
            } => {
                let who = self.shared.describe(member);
                if diverged {
                    return Err(JobError::Diverged {
                        reason: format!("{who}: {reason}"),
                        at: self.plan.here(id.id),
                    });
                }
                if self.collective && id.membership == self.current && self.regroup.needed.is_none()
                {
                    self.regroup.needed =
                        Some(format!("{who} could not finish {}: {reason}", id.id));
                }
            }
            other => self.casualties.push((
                member,
                Cause::Malformed(format!(
                    "it sent a {}, which the {} backend does not use",
                    other.kind(),
                    self.shared.config.backend
                )),
            )),
        }
        Ok(())
    }

    /// Checks a report's step: `Ok(None)` for a stale one (dropped), an error text for one that
    /// cannot be (its work was never sent).
    fn report_target(&self, id: Stamp) -> Result<Option<StepId>, String> {
        if id.id < self.next {
            return Ok(None);
        }
        match self.inflight.newest() {
            Some(newest) if id.id <= newest.id => Ok(Some(id.id)),
            _ => Err(format!("it reported {}, whose work was never sent", id.id)),
        }
    }

    /// grpc: a shard gradient. One of a step already finished, or of a shard that is not the
    /// sender's or is in already, is dropped; one that cannot be (work never sent, another
    /// length, other samples) drops its sender. A non-finite one drops its sender too and its
    /// shards are recomputed by the others, unless another member's gradient of the step was
    /// non-finite as well or nobody is left to recompute it: then the model diverged.
    fn on_gradient(&mut self, member: MemberId, g: ShardGradient) -> Result<(), JobError> {
        let malformed = |engine: &mut Self, why: String| {
            engine.casualties.push((member, Cause::Malformed(why)));
            Ok(())
        };
        let id = match self.report_target(g.id) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::debug!(
                    "dropping shard {} of {} from {}: the step is finished",
                    g.shard,
                    g.id.id,
                    self.shared.describe(member)
                );
                return Ok(());
            }
            Err(why) => return malformed(self, why),
        };
        let expected = self.params.len() * 4;
        let others = self.links.len() > 1;
        let Some(step) = self.inflight.get_mut(id) else {
            return Ok(());
        };
        let Some(slot) = step.slots.get_mut(g.shard as usize) else {
            let why = format!(
                "it sent shard {} of {id}, which has {} shards",
                g.shard,
                step.slots.len()
            );
            return malformed(self, why);
        };
        if slot.owner != member || slot.filled.is_some() {
            let who = self.shared.describe(member);
            tracing::debug!(
                "dropping shard {} of {id} from {who}: not its, or in already",
                g.shard
            );
            return Ok(());
        }
        let why = if g.data.len() != expected {
            Some(format!(
                "it sent a malformed gradient: shard {} of {id} has {} bytes, the model {expected}",
                g.shard,
                g.data.len()
            ))
        } else if g.stats.samples as usize != slot.range.len()
            || g.indices_digest != slot.indices_digest
        {
            Some(format!(
                "it computed shard {} of {id} over other samples than it was given",
                g.shard
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return malformed(self, why);
        }
        if let Err(e) = lockstep_common::codec::check_finite_le(&g.data) {
            let seen_from_another = step.non_finite.is_some_and(|first| first != member);
            if seen_from_another || !others {
                return Err(JobError::Diverged {
                    reason: format!(
                        "{} sent shard {} with a non-finite value ({e}){}",
                        self.shared.describe(member),
                        g.shard,
                        if seen_from_another {
                            ", as another worker did for this step"
                        } else {
                            ""
                        }
                    ),
                    at: self.plan.here(id),
                });
            }
            step.non_finite = Some(member);
            let why = format!(
                "it sent shard {} of {id} with a non-finite value ({e}); the other workers recompute its shards",
                g.shard
            );
            return malformed(self, why);
        }
        slot.filled = Some(Filled {
            by: member,
            stats: Some(g.stats),
            gradient: Some(g.data),
            timing: [g.compute_ms, g.wait_ms, g.apply_ms],
        });
        Ok(())
    }

    fn on_step_done(&mut self, member: MemberId, d: StepDone) {
        let id = match self.report_target(d.id) {
            Ok(Some(id)) => id,
            Ok(None) => return,
            Err(why) => return self.casualties.push((member, Cause::Malformed(why))),
        };
        let Some(step) = self.inflight.get_mut(id) else {
            return;
        };
        if step.membership != d.id.membership {
            let who = self.shared.describe(member);
            tracing::debug!(
                "dropping a report for {id} of membership {} from {who}: the step's work was sent under membership {}",
                d.id.membership,
                step.membership
            );
            return;
        }
        for s in &d.shards {
            let fits = step.slots.get(s.shard as usize).is_some_and(|slot| {
                slot.owner == member
                    && slot.range.len() == s.samples as usize
                    && slot.indices_digest == s.indices_digest
            });
            if !fits {
                let why = format!(
                    "it reported shard {} of {id}, which it was not given",
                    s.shard
                );
                return self.casualties.push((member, Cause::Malformed(why)));
            }
        }
        for s in &d.shards {
            step.slots[s.shard as usize].filled = Some(Filled {
                by: member,
                stats: None,
                gradient: None,
                timing: [0.0; 3],
            });
        }
        step.reports.entry(member).or_insert(d.stats);
        // Its compute_ms runs from receiving the work to applying it: the computing is the rest.
        let computing = (d.compute_ms - d.wait_ms - d.apply_ms).max(0.0);
        step.timings
            .entry(member)
            .or_insert([computing, d.wait_ms, d.apply_ms]);
    }

    /// A state a member uploaded: one the coordinator asked it for (a regroup), or the state
    /// after a step marked for its upload (an epoch end, a checkpoint). An upload nobody asked
    /// this member for is ignored, so no other member can replace the coordinator's replica.
    fn on_pushed(
        &mut self,
        member: MemberId,
        version: u64,
        bytes: Vec<u8>,
    ) -> Result<(), JobError> {
        let who = self.shared.describe(member);
        let state = match TrainingState::from_bytes(&self.shared.layout, &bytes) {
            Ok((state, _)) => state,
            Err(e) => {
                tracing::warn!("ignoring a state uploaded by {who} that does not parse: {e:#}");
                return Ok(());
            }
        };
        if version != 0 {
            if self.regroup.awaited_push == Some((version, member)) {
                self.regroup.pushed = Some(state);
            } else {
                tracing::warn!("ignoring a state of version {version} uploaded by {who}, which was not asked for it");
            }
            return Ok(());
        }
        let at = StepId::new(state.position.epoch, state.position.step);
        if self.uploaders.get(&at) != Some(&member) {
            tracing::warn!(
                "ignoring the state before {} uploaded by {who}, which was not asked for it",
                self.plan.here(at)
            );
            return Ok(());
        }
        if at <= self.replica_at {
            return Ok(());
        }
        // The upload after an epoch must be the state whose digest its worker reported.
        let last = StepId::new(at.epoch.wrapping_sub(1), self.plan.steps - 1);
        if at.step == 0 {
            if let Some(reported) = self.digests.reference_of(last) {
                let uploaded =
                    lockstep_common::codec::state_digest(&state.params, &state.optimizer);
                if reported != uploaded {
                    return Err(JobError::Other(anyhow::anyhow!(
                        "the state uploaded after epoch {} has digest {uploaded}, but its worker reported {reported} \
                         for that step",
                        at.epoch
                    )));
                }
            }
        }
        if let Some(account) = self.pending_checkpoints.remove(&at) {
            self.write_checkpoint(&state, Some(&account))?;
            self.adopt(state)?;
        } else {
            self.pushed.insert(at, state);
            while self.pushed.len() > 4 {
                self.pushed.pop_first();
            }
        }
        Ok(())
    }

    /// A worker opened its step stream after training started: it enters at a step boundary.
    fn admit(&mut self, member: MemberId, tx: WorkerTx) {
        let (rank, who, admitted) = {
            let members = self.shared.members();
            (
                members.get(member).map_or(0, |m| m.rank),
                members.describe(member),
                members.get(member).cloned(),
            )
        };
        self.account.membership_changes += 1;
        self.membership_changes += 1;
        let link = super::Link { tx, rank };
        if self.collective {
            tracing::info!(
                "{who} joined during {}; it enters when the work out is finished",
                self.plan.here(self.next)
            );
            self.waiting.insert(member, link);
            if let Some(m) = &admitted {
                self.observe_member(m, MemberEventKind::Joined, String::new());
            }
            return;
        }
        // grpc: from the replica's current state; the averages of the steps out reach it too.
        self.links.insert(member, link);
        self.current = self.shared.members().generation();
        match self.store_state() {
            Ok(version) => {
                let world = self.links.len() as u32;
                let position = self.ranked().iter().position(|m| *m == member).unwrap_or(0);
                self.configure(member, position as u32, world, Some(version));
                tracing::info!(
                    event = "worker_joined",
                    worker = %who,
                    workers = self.links.len(),
                    "{who} joined during {}; {} workers",
                    self.plan.here(self.next),
                    self.links.len()
                );
                if let Some(m) = &admitted {
                    self.observe_member(m, MemberEventKind::Joined, String::new());
                }
            }
            Err(e) => self
                .casualties
                .push((member, Cause::Malformed(format!("its state: {e}")))),
        }
    }

    /// Drops members silent for longer than the heartbeat timeout.
    pub(super) fn check_liveness(&mut self) {
        let limit = self.shared.config.cluster.heartbeat_timeout_ms as u64;
        let now = self.shared.now_ms();
        let silent = self.shared.members().silent(now, limit);
        for (member, silent_ms) in silent {
            self.casualties.push((
                member,
                Cause::Silent {
                    silent_ms,
                    limit_ms: limit,
                },
            ));
        }
    }

    /// The oldest step out waited `cluster.step_timeout_s`: its missing members are stalled.
    pub(super) fn step_timed_out(&mut self) {
        let limit_s = self.shared.config.cluster.step_timeout_s as u64;
        if let Some(step) = self.inflight.oldest() {
            let mut stalled = step.waiting_for();
            if self.collective {
                stalled.extend(self.links.keys().filter(|m| !step.reports.contains_key(m)));
            }
            for member in stalled {
                self.casualties.push((member, Cause::Stalled { limit_s }));
            }
        }
    }

    pub(super) fn check_digests(&mut self) {
        for (member, cause) in self.digests.check() {
            self.casualties.push((member, cause));
        }
    }

    /// Drops every member found lost since the last call, and carries on without them.
    pub(super) fn settle_losses(&mut self) -> Result<(), JobError> {
        // In the order they were found: a worker's own account (a Leave with its reason) comes
        // before the closed stream it leaves behind.
        while !self.casualties.is_empty() {
            for (member, mut cause) in std::mem::take(&mut self.casualties) {
                if matches!(cause, Cause::StreamClosed(_) | Cause::Unresponsive(_)) {
                    if let Some(reason) = self.inbox.take_left(member) {
                        cause = Cause::Left(reason);
                    }
                }
                self.lose(member, cause)?;
            }
        }
        Ok(())
    }

    fn lose(&mut self, member: MemberId, cause: Cause) -> Result<(), JobError> {
        let Some(m) = self.shared.members().remove(member) else {
            return Ok(());
        };
        let who = crate::membership::describe(&m);
        let link = self
            .links
            .remove(&member)
            .or_else(|| self.waiting.remove(&member));
        if let Some(link) = link {
            let _ = link
                .tx
                .try_send(Ok(lockstep_common::protocol::FromCoordinator::Abort(
                    format!("removed from the job: {cause}"),
                )
                .into()));
        }
        self.configured.remove(&member);
        if let Some(launcher) = &self.launcher {
            launcher.declare_lost(m.pid);
        }
        let at = Some(self.plan.here(self.next));
        self.lost.push(Lost {
            who: who.clone(),
            cause: cause.clone(),
            at,
        });
        self.account.membership_changes += 1;
        self.membership_changes += 1;
        if !self.collective {
            self.current = self.shared.members().generation();
        }
        let left = self.links.len() + self.waiting.len();
        let min = self.shared.config.cluster.min_workers;
        if left < min as usize {
            return Err(JobError::TooFewWorkers {
                lost: self.lost.clone(),
                left,
                min,
            });
        }
        self.observe_member(&m, MemberEventKind::Lost, cause.to_string());
        tracing::warn!(
            event = "worker_lost",
            worker = %who,
            workers = left,
            "{who} {cause} during {}; carrying on with {left} worker(s)",
            self.plan.here(self.next)
        );
        self.recovering
            .get_or_insert((tokio::time::Instant::now(), self.next));
        if self.collective {
            if self.regroup.needed.is_none() {
                self.regroup.needed = Some(format!("{who} was lost"));
            }
            return Ok(());
        }
        let members = self.ranked();
        for (id, given) in self.inflight.reassign(member, &members) {
            self.resend(id, given);
        }
        Ok(())
    }

    /// grpc: sends `given` members the shards of step `id` they now compute.
    fn resend(&mut self, id: StepId, given: Vec<(MemberId, Vec<u32>)>) {
        let perm = self.permutation(id.epoch);
        let Some((global, ranges)) = self.inflight.get_mut(id).map(|s| {
            (
                s.global,
                s.slots
                    .iter()
                    .map(|slot| slot.range.clone())
                    .collect::<Vec<_>>(),
            )
        }) else {
            return;
        };
        for (member, shards) in given {
            let built = shards
                .iter()
                .map(|&k| self.build_shard(&perm, ranges[k as usize].clone(), k))
                .collect();
            let work = lockstep_common::protocol::Work {
                id: Stamp::new(id, self.current),
                global_count: global,
                shard_count: self.plan.shards,
                shards: built,
                last_of_epoch: id.step + 1 == self.plan.steps,
                push_state: false,
            };
            tracing::debug!("{id}: shards {shards:?} to member {member}");
            self.send(
                member,
                lockstep_common::protocol::FromCoordinator::Work(work),
            );
        }
    }
}
