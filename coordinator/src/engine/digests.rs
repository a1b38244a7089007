//! Replicas compare digests of their parameters and optimizer state every `digest_every`
//! steps and at each epoch end, so a replica that silently diverged is caught rather than
//! trained on. The reference for a step is the coordinator's own replica (grpc), or the digest
//! reported by that step's reference worker (collective modes: the membership's rank 0, whose
//! state the coordinator evaluates and checkpoints).

use std::collections::BTreeMap;

use lockstep_common::protocol::StepId;

use crate::error::Cause;
use crate::membership::MemberId;

/// Steps' reference digests and the reports waiting for theirs.
#[derive(Default)]
pub struct Digests {
    reference: BTreeMap<StepId, String>,
    waiting: Vec<(MemberId, StepId, String)>,
    verified: BTreeMap<MemberId, StepId>,
}

/// References kept; reports for older steps than the oldest kept one are dropped.
const KEEP: usize = 16;

impl Digests {
    /// The reference digest of the state after step `at`.
    pub fn reference(&mut self, at: StepId, sha256: String) {
        self.reference.entry(at).or_insert(sha256);
        while self.reference.len() > KEEP {
            self.reference.pop_first();
        }
    }

    /// The reference of `at`, if known.
    pub fn reference_of(&self, at: StepId) -> Option<&str> {
        self.reference.get(&at).map(String::as_str)
    }

    /// A member's digest after step `at`.
    pub fn report(&mut self, member: MemberId, at: StepId, sha256: String) {
        self.waiting.push((member, at, sha256));
    }

    /// Compares the reports whose reference is known: returns the members that differ, and
    /// records the latest step each other member matched at.
    pub fn check(&mut self) -> Vec<(MemberId, Cause)> {
        let oldest = self.reference.keys().next().copied();
        let mut diverged = Vec::new();
        let mut keep = Vec::new();
        for (member, at, sha256) in std::mem::take(&mut self.waiting) {
            match self.reference.get(&at) {
                Some(r) if *r == sha256 => {
                    let v = self.verified.entry(member).or_insert(at);
                    *v = (*v).max(at);
                }
                Some(r) => diverged.push((
                    member,
                    Cause::Diverged {
                        at,
                        theirs: sha256,
                        reference: r.clone(),
                    },
                )),
                None if oldest.is_some_and(|o| at < o) => {}
                None => keep.push((member, at, sha256)),
            }
        }
        self.waiting = keep;
        diverged
    }

    /// The latest step at which `member`'s digest matched.
    pub fn verified(&self, member: MemberId) -> Option<StepId> {
        self.verified.get(&member).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_wait_for_their_reference_and_a_difference_is_named() {
        let mut d = Digests::default();
        let at = StepId::new(0, 199);
        d.report(1, at, "a".into());
        d.report(2, at, "b".into());
        assert!(d.check().is_empty(), "no reference yet");
        d.reference(at, "a".into());
        let diverged = d.check();
        assert_eq!(diverged.len(), 1);
        assert_eq!(diverged[0].0, 2);
        assert_eq!(d.verified(1), Some(at));
        assert_eq!(d.verified(2), None);
    }
}
