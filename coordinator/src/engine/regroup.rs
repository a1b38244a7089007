//! Collective modes (tcp, nccl): a new membership. The workers all-reduce among themselves, so
//! when one is lost the others may be blocked on it, and they may even disagree by one step (a
//! rank 0 that died while sending the average to some ranks but not others). A regroup:
//!
//! 1. pauses every configured member: each abandons its collective and any queued work, and
//!    answers where its replica is (the first step it has not applied) and its state's digest;
//! 2. settles on the newest state: the most advanced member uploads its state (the coordinator
//!    keeps it for evaluation, checkpoints and resumption), members behind it and members that
//!    just joined will fetch it; a member at the same step with another digest has diverged;
//! 3. finishes the steps the survivors applied (their reports may never come) and voids the
//!    work of later ones, which is sent again under the new membership;
//! 4. configures every member with its rank in the new membership, and relays the new rank 0's
//!    rendezvous (tcp: a new listener and secret; nccl: a new unique id and communicator).
//!
//! The job starts with a regroup too (every member then fetches the starting state). Members
//! that do not answer in time are dropped; a loss during a regroup starts another one.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use lockstep_common::checkpoint::TrainingState;
use lockstep_common::codec;
use lockstep_common::protocol::{FromCoordinator, Stamp, StepId};
use tokio::time::Instant;

use super::Engine;
use crate::error::{Cause, JobError};
use crate::membership::MemberId;

/// Regroups in a row without a finished step before the job gives up.
const MAX_FAILED_REGROUPS: u32 = 5;

/// The regroup in progress, and whether another is needed.
#[derive(Default)]
pub struct Regroup {
    /// Why a regroup is needed, if one is.
    pub needed: Option<String>,
    /// Regroups since the last finished step.
    pub failures: u32,
    /// The pause being answered, and the answers so far.
    pausing: Option<u64>,
    paused: BTreeMap<MemberId, (StepId, String)>,
    /// The upload asked for (its version, and who was asked), and the state once it came.
    pub awaited_push: Option<(u64, MemberId)>,
    /// The state uploaded for [`Regroup::awaited_push`].
    pub pushed: Option<TrainingState>,
    /// The rendezvous awaited: its membership and who creates it.
    awaited_rendezvous: Option<(u64, MemberId)>,
    rendezvous_relayed: bool,
    push_requests: u64,
}

impl Engine {
    pub(super) async fn regroup(&mut self, reason: String) -> Result<(), JobError> {
        self.regroup.failures += 1;
        if self.regroup.failures > MAX_FAILED_REGROUPS {
            return Err(JobError::Startup(format!(
                "the workers could not form a working collective in {MAX_FAILED_REGROUPS} attempts; the last \
                 problem: {reason}"
            )));
        }
        // The joiners take part from now on.
        let joiners: Vec<MemberId> = self.waiting.keys().copied().collect();
        for member in joiners {
            if let Some(link) = self.waiting.remove(&member) {
                self.links.insert(member, link);
            }
        }
        let round = self.shared.members().bump();
        tracing::info!("regrouping {} worker(s) ({reason})", self.links.len());

        // 1. Pause.
        let configured: Vec<MemberId> = self
            .links
            .keys()
            .filter(|m| self.configured.contains(m))
            .copied()
            .collect();
        self.regroup.pausing = Some(round);
        self.regroup.paused.clear();
        for &member in &configured {
            self.send(member, FromCoordinator::Pause { membership: round });
        }
        self.settle_losses()?;
        let limit = Duration::from_millis(self.shared.config.cluster.heartbeat_timeout_ms as u64)
            + Duration::from_secs(2);
        let deadline = Instant::now() + limit;
        loop {
            let missing: Vec<MemberId> = configured
                .iter()
                .filter(|m| self.links.contains_key(m) && !self.regroup.paused.contains_key(m))
                .copied()
                .collect();
            if missing.is_empty() {
                break;
            }
            if !self.pump(Some(deadline)).await? {
                for member in missing {
                    let what = "a pause of its membership".to_string();
                    self.casualties.push((member, Cause::Unresponsive(what)));
                }
                self.settle_losses()?;
                break;
            }
        }
        self.regroup.pausing = None;
        if self.links.is_empty() {
            return Err(JobError::Startup("no worker is left to regroup".into()));
        }

        // 2. The newest state.
        let answers: Vec<(MemberId, StepId, String)> = std::mem::take(&mut self.regroup.paused)
            .into_iter()
            .filter(|(m, _)| self.links.contains_key(m))
            .map(|(m, (at, sha))| (m, at, sha))
            .collect();
        let newest = answers
            .iter()
            .map(|(_, at, _)| *at)
            .max()
            .unwrap_or(self.replica_at)
            .max(self.replica_at);
        if newest < self.next {
            let at = newest;
            return Err(JobError::Startup(format!(
                "no surviving worker holds the state of {} (the newest is from {at}); resume from the last \
                 checkpoint",
                self.plan.here(self.next)
            )));
        }
        if let Some((source, at, sha)) = answers
            .iter()
            .filter(|(_, at, _)| *at == newest && *at > self.replica_at)
            .min_by_key(|(m, _, _)| self.links.get(m).map(|l| l.rank))
            .cloned()
        {
            self.regroup.push_requests += 1;
            let version = self.regroup.push_requests;
            self.regroup.awaited_push = Some((version, source));
            self.regroup.pushed = None;
            self.send(source, FromCoordinator::PushState { version });
            self.settle_losses()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.regroup.pushed.is_none() {
                if !self.links.contains_key(&source) {
                    self.regroup.needed =
                        Some("the worker holding the newest state was lost".into());
                    return Ok(());
                }
                if !self.pump(Some(deadline)).await? {
                    let what = "the request for its state".to_string();
                    self.casualties.push((source, Cause::Unresponsive(what)));
                    self.settle_losses()?;
                    self.regroup.needed = Some("the newest state did not arrive".into());
                    return Ok(());
                }
            }
            self.regroup.awaited_push = None;
            let state = self.regroup.pushed.take().expect("checked above");
            let uploaded = codec::state_digest(&state.params, &state.optimizer);
            let position = StepId::new(state.position.epoch, state.position.step);
            if position != at || uploaded != sha {
                let why = format!(
                    "it uploaded a state of {position} with digest {uploaded} after reporting {at} with {sha}"
                );
                self.casualties.push((source, Cause::Malformed(why)));
                self.settle_losses()?;
                self.regroup.needed = Some("the newest state was inconsistent".into());
                return Ok(());
            }
            self.adopt(state)?;
        }
        let target = self.replica_at;
        let version = self.store_state()?;
        let reference = codec::state_digest(&self.params, self.optimizer.state());
        let mut load: Vec<MemberId> = self
            .links
            .keys()
            .filter(|m| !self.configured.contains(m))
            .copied()
            .collect();
        for (member, at, sha) in &answers {
            if *at != target {
                load.push(*member);
            } else if *sha != reference {
                self.casualties.push((
                    *member,
                    Cause::Diverged {
                        at: target,
                        theirs: sha.clone(),
                        reference: reference.clone(),
                    },
                ));
            }
        }
        self.settle_losses()?;

        // 3. What the survivors applied is finished; later work is void.
        self.inflight.settle(target);
        self.sent_until = target;

        // 4. The new membership.
        let membership = self.shared.members().bump();
        self.current = membership;
        let members = self.ranked();
        let world = members.len() as u32;
        self.configured = members.iter().copied().collect();
        for (rank, &member) in members.iter().enumerate() {
            let fetch = load.contains(&member).then_some(version);
            self.configure(member, rank as u32, world, fetch);
        }
        self.settle_losses()?;
        let Some(&root) = members.first() else {
            return Err(JobError::Startup("no worker is left to regroup".into()));
        };
        self.regroup.awaited_rendezvous = Some((membership, root));
        self.regroup.rendezvous_relayed = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.regroup.rendezvous_relayed {
            if self.regroup.needed.is_some() || !self.links.contains_key(&root) {
                self.regroup
                    .needed
                    .get_or_insert("rank 0 of the new membership was lost".into());
                return Ok(());
            }
            if !self.pump(Some(deadline)).await? {
                let what = format!("the rendezvous of membership {membership}");
                self.casualties.push((root, Cause::Unresponsive(what)));
                self.settle_losses()?;
                self.regroup
                    .needed
                    .get_or_insert("rank 0 sent no rendezvous".into());
                return Ok(());
            }
        }
        self.regroup.awaited_rendezvous = None;
        tracing::info!(
            "membership {membership}: {world} worker(s), training from {}",
            self.plan.here(target)
        );
        Ok(())
    }

    pub(super) fn on_paused(&mut self, member: MemberId, next: Stamp, sha256: String) {
        if self.regroup.pausing == Some(next.membership) {
            self.regroup.paused.insert(member, (next.id, sha256));
        }
    }

    pub(super) fn on_rendezvous(&mut self, member: MemberId, blob: Bytes, membership: u64) {
        if self.regroup.awaited_rendezvous != Some((membership, member)) {
            tracing::debug!(
                "dropping a rendezvous of membership {membership} from member {member}"
            );
            return;
        }
        let others: Vec<MemberId> = self.ranked().into_iter().filter(|m| *m != member).collect();
        for other in others {
            self.send(
                other,
                FromCoordinator::Rendezvous {
                    blob: blob.clone(),
                    membership,
                },
            );
        }
        self.regroup.rendezvous_relayed = true;
    }
}
