//! Who is in the job. Every admission (`Join`) is a member with an identity of its own
//! ([`MemberId`], never reused, so a late message from a worker that was dropped is never taken
//! for its replacement's) and a rank: the smallest one free at the time, so a replacement takes
//! the place of the worker it replaces, as torchrun's restarted workers keep their local rank.
//! Every change of the member set bumps the membership generation (`membership_epoch`), which
//! step messages carry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The identity of one admission.
pub type MemberId = u64;

/// An admitted worker.
#[derive(Clone, Debug)]
pub struct Member {
    /// This admission.
    pub id: MemberId,
    /// Its rank: how logs and errors name it.
    pub rank: u32,
    /// The worker's self-description (host/pid).
    pub worker_id: String,
    /// Its compute device.
    pub device: String,
    /// Peer address.
    pub peer: String,
    /// Process id the worker reported.
    pub pid: u32,
    /// Set once its step stream is open.
    pub streaming: bool,
    /// Milliseconds since the coordinator started when it was last heard from.
    pub last_seen_ms: Arc<AtomicU64>,
}

/// What a worker says about itself when it joins (checked and made printable at the
/// boundary, [`lockstep_common::protocol::JoinRequest`]).
pub struct Joining {
    /// Host/pid.
    pub worker_id: String,
    /// Device.
    pub device: String,
    /// Peer address.
    pub peer: String,
    /// Process id.
    pub pid: u32,
}

/// The member set.
#[derive(Debug)]
pub struct Membership {
    generation: u64,
    members: BTreeMap<MemberId, Member>,
    next_id: MemberId,
    max: u32,
}

impl Membership {
    /// An empty membership that admits at most `max` workers at once.
    pub fn new(max: u32) -> Self {
        Self {
            generation: 1,
            members: BTreeMap::new(),
            next_id: 1,
            max,
        }
    }

    /// The membership generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts a new generation without a change of members (a collective regroups).
    pub fn bump(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Admits a worker at `now_ms` with the smallest free rank, or says why not.
    pub fn admit(&mut self, joining: Joining, now_ms: u64) -> Result<Member, String> {
        if self.members.len() >= self.max as usize {
            return Err(format!(
                "the job already has its {} workers (cluster.max_workers); this one ({}) is not needed",
                self.max, joining.worker_id
            ));
        }
        let rank = (0..)
            .find(|r| !self.members.values().any(|m| m.rank == *r))
            .expect("a free rank below max");
        let member = Member {
            id: self.next_id,
            rank,
            worker_id: joining.worker_id,
            device: joining.device,
            peer: joining.peer,
            pid: joining.pid,
            streaming: false,
            last_seen_ms: Arc::new(AtomicU64::new(now_ms)),
        };
        self.next_id += 1;
        self.generation += 1;
        self.members.insert(member.id, member.clone());
        Ok(member)
    }

    /// Marks `id`'s step stream open; refuses an unknown member or a second stream.
    pub fn open_stream(&mut self, id: MemberId) -> Result<Member, String> {
        let Some(m) = self.members.get_mut(&id) else {
            return Err(not_a_member(id));
        };
        if m.streaming {
            return Err(format!("rank {} already has a step stream", m.rank));
        }
        m.streaming = true;
        Ok(m.clone())
    }

    /// `Ok` when `id` is in the job, else why not (for requests only a member may make).
    pub fn check(&self, id: MemberId) -> Result<(), String> {
        match self.members.get(&id) {
            Some(_) => Ok(()),
            None => Err(not_a_member(id)),
        }
    }

    /// `Ok` when `id` is in the job with its step stream open, else why not.
    pub fn check_streaming(&self, id: MemberId) -> Result<(), String> {
        match self.members.get(&id) {
            Some(m) if m.streaming => Ok(()),
            Some(m) => Err(format!("rank {} has no step stream open", m.rank)),
            None => Err(not_a_member(id)),
        }
    }

    /// Removes a member; `None` when it was gone already.
    pub fn remove(&mut self, id: MemberId) -> Option<Member> {
        let m = self.members.remove(&id)?;
        self.generation += 1;
        Some(m)
    }

    /// A member.
    pub fn get(&self, id: MemberId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when nobody is in the job.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member whose process is `pid` (local workers).
    pub fn by_pid(&self, pid: u32) -> Option<MemberId> {
        self.members.values().find(|m| m.pid == pid).map(|m| m.id)
    }

    /// Members silent for longer than `limit_ms` at `now_ms`, with how long.
    pub fn silent(&self, now_ms: u64, limit_ms: u64) -> Vec<(MemberId, u64)> {
        self.members
            .values()
            .filter_map(|m| {
                let silent = now_ms.saturating_sub(m.last_seen_ms.load(Ordering::Relaxed));
                (silent > limit_ms).then_some((m.id, silent))
            })
            .collect()
    }

    /// How errors name a member: `worker rank 1 (host/pid 4242 at 127.0.0.1:50230)`.
    pub fn describe(&self, id: MemberId) -> String {
        match self.members.get(&id) {
            Some(m) => describe(m),
            None => format!("worker (member {id})"),
        }
    }
}

fn not_a_member(id: MemberId) -> String {
    format!("member {id} is not in the job (it was dropped, or never joined): join again")
}

/// How errors name a member: `worker rank 1 (host/pid 4242 at 127.0.0.1:50230)`.
pub fn describe(m: &Member) -> String {
    format!("worker rank {} ({} at {})", m.rank, m.worker_id, m.peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joining(pid: u32) -> Joining {
        Joining {
            worker_id: format!("h/pid {pid}"),
            device: "cpu".into(),
            peer: "127.0.0.1:1".into(),
            pid,
        }
    }

    #[test]
    fn a_replacement_takes_the_smallest_free_rank_but_a_new_identity() {
        let mut m = Membership::new(2);
        let a = m.admit(joining(10), 0).unwrap();
        let b = m.admit(joining(11), 0).unwrap();
        assert_eq!((a.rank, b.rank), (0, 1));
        let err = m.admit(joining(12), 0).unwrap_err();
        assert!(err.contains("already has its 2 workers"), "{err}");
        let generation = m.generation();
        m.remove(a.id).unwrap();
        assert!(m.generation() > generation);
        assert!(m.remove(a.id).is_none(), "removing twice is a no-op");
        let c = m.admit(joining(12), 0).unwrap();
        assert_eq!(c.rank, 0);
        assert_ne!(c.id, a.id);
        assert_eq!(m.by_pid(12), Some(c.id));
        assert!(
            m.open_stream(a.id).is_err(),
            "a dropped member cannot stream"
        );
        m.open_stream(c.id).unwrap();
        assert!(m.open_stream(c.id).is_err(), "one stream per member");
    }

    #[test]
    fn silent_members_are_found() {
        let mut m = Membership::new(3);
        let a = m.admit(joining(1), 0).unwrap();
        let b = m.admit(joining(2), 0).unwrap();
        b.last_seen_ms.store(4000, Ordering::Relaxed);
        assert_eq!(m.silent(6000, 5000), vec![(a.id, 6000)]);
        assert_eq!(m.describe(b.id), "worker rank 1 (h/pid 2 at 127.0.0.1:1)");
    }
}
