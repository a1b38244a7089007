//! Interrupting the compute thread from the network side. In the collective modes a rank can
//! sit in an all-reduce (or in forming a collective) waiting for a peer that is gone; when the
//! coordinator pauses the membership, ends the job, or the connection to it breaks, the stream
//! task trips this signal: blocking loops see [`AbortSignal::pending`], and registered hooks
//! (shutting the collective's sockets, aborting an NCCL communicator) unblock what cannot poll.
//!
//! Requests are counted, and the compute thread acknowledges each `Pause` it handles, so a
//! second pause that arrives while the first is being handled is never lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Hook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Inner {
    requested: AtomicU64,
    acknowledged: AtomicU64,
    hooks: Mutex<Vec<Hook>>,
}

/// Shared between the stream task (which trips it) and the compute thread (which checks it).
#[derive(Clone, Default)]
pub struct AbortSignal(Arc<Inner>);

/// The error of an operation the coordinator interrupted (a pause or the job's end): not a
/// failure to report, the coordinator already knows.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by the coordinator")
    }
}

impl std::error::Error for Interrupted {}

impl AbortSignal {
    /// Network side: interrupt what the compute thread is blocked in.
    pub fn trip(&self) {
        self.0.requested.fetch_add(1, Ordering::SeqCst);
        for hook in self.0.hooks.lock().expect("abort hooks").iter() {
            hook();
        }
    }

    /// Compute side: an interruption was requested and not yet acknowledged.
    pub fn pending(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst) > self.0.acknowledged.load(Ordering::SeqCst)
    }

    /// Compute side: one requested interruption (a `Pause`) has been handled.
    pub fn acknowledge(&self) {
        let requested = self.0.requested.load(Ordering::SeqCst);
        let _ = self
            .0
            .acknowledged
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                (a < requested).then_some(a + 1)
            });
    }

    /// Runs `hook` on every trip until [`AbortSignal::clear_hooks`]; at once if one is pending.
    pub fn on_trip(&self, hook: impl Fn() + Send + Sync + 'static) {
        if self.pending() {
            hook();
        }
        self.0
            .hooks
            .lock()
            .expect("abort hooks")
            .push(Box::new(hook));
    }

    /// Forgets the hooks (their collective is gone).
    pub fn clear_hooks(&self) {
        self.0.hooks.lock().expect("abort hooks").clear();
    }

    /// `Err(Interrupted)` when an interruption is pending.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.pending() {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}

/// Whether `e` is (or wraps) an interruption by the coordinator.
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Interrupted>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn trips_are_counted_and_acknowledged_one_by_one() {
        let signal = AbortSignal::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        signal.on_trip(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!signal.pending());
        signal.trip();
        signal.trip();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        signal.acknowledge();
        assert!(signal.pending(), "the second pause is still pending");
        assert!(is_interrupted(&signal.check().unwrap_err()));
        signal.acknowledge();
        assert!(!signal.pending());
        signal.acknowledge();
        signal.trip();
        assert!(
            signal.pending(),
            "acknowledging ahead of a trip does not swallow it"
        );
        signal.clear_hooks();
        signal.trip();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
