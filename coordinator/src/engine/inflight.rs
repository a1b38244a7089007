//! The steps whose work is out and which are not complete yet. A step's global batch is cut
//! into a fixed number of shards; each shard is a slot with an owner (the member computing it)
//! and, once its report is in, its statistics and (grpc) its gradient. A step is complete when
//! every slot is filled. When a member is lost, its unfilled slots get new owners; the slots it
//! filled stay filled, because a shard's gradient does not depend on who computed it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use lockstep_common::model::BatchStats;
use lockstep_common::protocol::StepId;

use crate::membership::MemberId;

/// A filled slot.
#[derive(Clone, Debug)]
pub struct Filled {
    /// Who computed it.
    pub by: MemberId,
    /// Its statistics (grpc; collective modes report per member instead).
    pub stats: Option<BatchStats>,
    /// Its gradient (grpc).
    pub gradient: Option<Bytes>,
    /// Where the worker's time went, in ms: computing, waiting for the all-reduce, applying.
    pub timing: [f32; 3],
}

/// One shard of a step.
#[derive(Clone, Debug)]
pub struct Slot {
    /// Positions of its samples in the epoch's permutation.
    pub range: Range<usize>,
    /// The echo the owner must give of its indices.
    pub indices_digest: u64,
    /// Who computes it.
    pub owner: MemberId,
    /// Its report, once in.
    pub filled: Option<Filled>,
}

/// A step whose work is out.
#[derive(Clone, Debug)]
pub struct Step {
    /// Which step.
    pub id: StepId,
    /// The membership generation its work was sent under.
    pub membership: u64,
    /// Samples in its global batch.
    pub global: u32,
    /// Its shards, in shard order.
    pub slots: Vec<Slot>,
    /// Collective modes: statistics reported per member, once each.
    pub reports: BTreeMap<MemberId, BatchStats>,
    /// Collective modes: each member's timing of the step, in ms (compute, wait, apply).
    pub timings: BTreeMap<MemberId, [f32; 3]>,
    /// When its work went out.
    pub sent_at: Instant,
    /// The regroup found it applied by the survivors, though not every report came.
    pub forced: bool,
    /// grpc: the member that sent the first non-finite shard gradient of this step (dropped,
    /// its shards recomputed by the others; a second one means the model diverged).
    pub non_finite: Option<MemberId>,
}

impl Step {
    /// Every slot is filled (or the survivors applied it).
    pub fn complete(&self) -> bool {
        self.forced || self.slots.iter().all(|s| s.filled.is_some())
    }

    /// The owners of unfilled slots.
    pub fn waiting_for(&self) -> BTreeSet<MemberId> {
        self.slots
            .iter()
            .filter(|s| s.filled.is_none())
            .map(|s| s.owner)
            .collect()
    }

    /// The step's statistics: grpc slots summed in shard order, then the collective reports
    /// in member order — a fixed order, so they do not depend on arrival.
    pub fn stats(&self) -> BatchStats {
        let mut total = BatchStats::default();
        let slots = self.slots.iter().filter_map(|s| s.filled.as_ref()?.stats);
        for s in slots.chain(self.reports.values().copied()) {
            total.loss_sum += s.loss_sum;
            total.correct += s.correct;
            total.samples += s.samples;
        }
        total
    }

    /// Where each worker's time went in this step, by rank (`rank_of` names the members still
    /// taking part): the mean over its shards' reports (grpc), or its step report.
    pub fn worker_timings(
        &self,
        rank_of: impl Fn(MemberId) -> Option<u32>,
    ) -> Vec<crate::observe::WorkerTiming> {
        let mut by: BTreeMap<MemberId, ([f64; 3], u32)> = BTreeMap::new();
        let reported = self.slots.iter().filter_map(|s| {
            let f = s.filled.as_ref()?;
            f.gradient.as_ref()?;
            Some((f.by, f.timing))
        });
        let collective = self.timings.iter().map(|(m, t)| (*m, *t));
        for (member, t) in reported.chain(collective) {
            let e = by.entry(member).or_default();
            for (sum, v) in e.0.iter_mut().zip(t) {
                *sum += crate::observe::seconds_from_peer_ms(v);
            }
            e.1 += 1;
        }
        let mut out: Vec<_> = by
            .into_iter()
            .filter_map(|(member, (sums, n))| {
                let n = n.max(1) as f64;
                Some(crate::observe::WorkerTiming {
                    rank: rank_of(member)?,
                    compute_seconds: sums[0] / n,
                    wait_seconds: sums[1] / n,
                    apply_seconds: sums[2] / n,
                })
            })
            .collect();
        out.sort_by_key(|t| t.rank);
        out
    }
}

/// New owners of a step's shards: who computes which, per step.
pub type Reassigned = Vec<(StepId, Vec<(MemberId, Vec<u32>)>)>;

/// The steps out, oldest first.
#[derive(Default)]
pub struct InFlight {
    steps: VecDeque<Step>,
}

impl InFlight {
    /// Adds a step whose work was just sent (after every step already out).
    pub fn push(&mut self, step: Step) {
        debug_assert!(self.steps.back().is_none_or(|b| b.id < step.id));
        self.steps.push_back(step);
    }

    /// No step is out.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The oldest step out.
    pub fn oldest(&self) -> Option<&Step> {
        self.steps.front()
    }

    /// The newest step out.
    pub fn newest(&self) -> Option<&Step> {
        self.steps.back()
    }

    /// A step out, by id.
    pub fn get_mut(&mut self, id: StepId) -> Option<&mut Step> {
        self.steps.iter_mut().find(|s| s.id == id)
    }

    /// Takes the oldest step if it is complete.
    pub fn pop_complete(&mut self) -> Option<Step> {
        if self.steps.front()?.complete() {
            self.steps.pop_front()
        } else {
            None
        }
    }

    /// Collective modes after a regroup: the steps before `target` were applied by the
    /// survivors (complete them); the work of the others is void (drop it).
    pub fn settle(&mut self, target: StepId) {
        self.steps.retain(|s| s.id < target);
        for s in &mut self.steps {
            s.forced = true;
        }
    }

    /// Gives `lost`'s unfilled slots to `members` (in rank order), spread as evenly as the
    /// schedule spreads shards. Returns, per step with new owners, who now computes which shard.
    pub fn reassign(&mut self, lost: MemberId, members: &[MemberId]) -> Reassigned {
        let mut out = Vec::new();
        if members.is_empty() {
            return out;
        }
        for step in &mut self.steps {
            let orphans: Vec<u32> = step
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.owner == lost && s.filled.is_none())
                .map(|(k, _)| k as u32)
                .collect();
            if orphans.is_empty() {
                continue;
            }
            let groups = lockstep_common::schedule::assign_shards(&orphans, members.len());
            let mut given = Vec::new();
            for (&member, shards) in members.iter().zip(groups) {
                if shards.is_empty() {
                    continue;
                }
                for &k in &shards {
                    step.slots[k as usize].owner = member;
                }
                given.push((member, shards));
            }
            out.push((step.id, given));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: u64, owners: &[MemberId]) -> Step {
        Step {
            id: StepId::new(0, id),
            membership: 1,
            global: owners.len() as u32 * 2,
            slots: owners
                .iter()
                .enumerate()
                .map(|(k, &owner)| Slot {
                    range: 2 * k..2 * k + 2,
                    indices_digest: 0,
                    owner,
                    filled: None,
                })
                .collect(),
            reports: BTreeMap::new(),
            timings: BTreeMap::new(),
            sent_at: Instant::now(),
            forced: false,
            non_finite: None,
        }
    }

    fn fill(s: &mut Step, k: usize, by: MemberId) {
        s.slots[k].filled = Some(Filled {
            by,
            stats: Some(BatchStats {
                loss_sum: 1.0,
                correct: 1,
                samples: 2,
            }),
            gradient: None,
            timing: [0.0; 3],
        });
    }

    #[test]
    fn a_lost_members_unfilled_shards_go_to_the_survivors_and_its_filled_ones_stay() {
        let mut f = InFlight::default();
        f.push(step(0, &[1, 1, 2, 2]));
        f.push(step(1, &[1, 1, 2, 2]));
        fill(f.get_mut(StepId::new(0, 0)).unwrap(), 2, 2);
        fill(f.get_mut(StepId::new(0, 0)).unwrap(), 3, 2);
        fill(f.get_mut(StepId::new(0, 0)).unwrap(), 0, 2);
        // Member 2 is lost: its shards of step 0 are in and stay; those of step 1 go to the
        // survivors, and then member 1's too.
        let given = f.reassign(2, &[1, 3]);
        assert_eq!(
            given,
            vec![(StepId::new(0, 1), vec![(1, vec![2]), (3, vec![3])])]
        );
        let given = f.reassign(1, &[3]);
        assert_eq!(
            given,
            vec![
                (StepId::new(0, 0), vec![(3, vec![1])]),
                (StepId::new(0, 1), vec![(3, vec![0, 1, 2])])
            ]
        );
        let s0 = f.get_mut(StepId::new(0, 0)).unwrap();
        assert_eq!(s0.waiting_for(), [3].into_iter().collect());
        fill(s0, 1, 3);
        assert_eq!(s0.stats().samples, 8);
        assert!(f.pop_complete().is_some());
        assert!(f.pop_complete().is_none(), "step 1 is not complete");
    }

    #[test]
    fn settling_completes_what_the_survivors_applied_and_voids_the_rest() {
        let mut f = InFlight::default();
        for i in 0..3 {
            f.push(step(i, &[1, 2]));
        }
        f.settle(StepId::new(0, 1));
        let done = f.pop_complete().unwrap();
        assert_eq!(done.id, StepId::new(0, 0));
        assert!(f.is_empty());
    }
}
