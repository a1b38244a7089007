//! What the engine tells the world about a run as it goes: one [`Observer`] trait, called at
//! each finished step, epoch, membership change, checkpoint and at the end, by every sink that
//! wants to know (the Prometheus endpoint and the dashboard, TensorBoard's event files).
//!
//! Observers are called on the engine's task, between steps: they must be quick (update a
//! counter, append to a buffered file), never block on the network, and never fail the job. A
//! sink whose own output fails logs it once and carries on.

use std::path::Path;

use crate::run_dir::{EpochMetrics, Summary};

/// One worker's share of a finished step: where its time went, in seconds. grpc workers report
/// the wait and apply times of their previous step with the gradient of the next, so those
/// lag one step behind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerTiming {
    /// The worker's rank in the current membership.
    pub rank: u32,
    /// Computing its shards' gradients.
    pub compute_seconds: f64,
    /// Waiting for the all-reduce (grpc: for the coordinator's average).
    pub wait_seconds: f64,
    /// Applying the optimizer step.
    pub apply_seconds: f64,
}

/// A duration a worker reported in milliseconds, in seconds as metrics may use it: a value
/// that is not finite or is negative reads as 0, and a huge one is capped at a day.
pub fn seconds_from_peer_ms(ms: f32) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        (ms as f64 / 1000.0).min(86_400.0)
    } else {
        0.0
    }
}

/// A finished (applied) step.
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    /// Epoch, from 1.
    pub epoch: u64,
    /// Step within the epoch, from 1.
    pub step: u64,
    /// Steps in an epoch.
    pub steps_per_epoch: u64,
    /// Steps finished since the run began (0-based epochs × steps + step), for x axes.
    pub global_step: u64,
    /// Samples in this step's global batch.
    pub samples: u64,
    /// Mean training loss of this step's batch.
    pub loss: f64,
    /// Mean training loss of the epoch so far.
    pub epoch_loss: f64,
    /// Wall time since the previous step finished (or since the epoch's work started).
    pub seconds: f64,
    /// Bytes on the wire for this step (batches, gradients, reduced gradients), as far as
    /// the coordinator sees them.
    pub bytes: u64,
    /// Workers taking part.
    pub workers: usize,
    /// The workers' timings that came with this step (those that reported).
    pub timings: Vec<WorkerTiming>,
}

/// A worker entering or leaving the job.
#[derive(Clone, Debug)]
pub struct MemberEvent {
    /// Joined or lost.
    pub kind: MemberEventKind,
    /// How logs name the worker (`worker 1 (host/pid)`).
    pub who: String,
    /// Its rank.
    pub rank: u32,
    /// Its host/pid self-description.
    pub worker_id: String,
    /// Its device (`cpu`, `cuda:0`).
    pub device: String,
    /// Workers in the job after the event.
    pub workers: usize,
    /// Where in the run (`epoch 2 step 31/938`).
    pub at: String,
    /// Why it left (empty when it joined).
    pub reason: String,
}

/// Whether a worker joined or was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberEventKind {
    /// Admitted (at the start or as a replacement).
    Joined,
    /// Lost: exited, disconnected, timed out or misbehaved.
    Lost,
}

impl MemberEventKind {
    /// `joined` or `lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joined => "joined",
            Self::Lost => "lost",
        }
    }
}

/// Something that watches a run. Every method has an empty default, so a sink implements what
/// it needs.
pub trait Observer: Send + Sync {
    /// A step was applied.
    fn step(&mut self, _record: &StepRecord) {}
    /// An epoch ended and was evaluated; `m` is the line written to `metrics.jsonl`.
    fn epoch(&mut self, _m: &EpochMetrics) {}
    /// A worker joined or was lost.
    fn member(&mut self, _event: &MemberEvent) {}
    /// A checkpoint was written.
    fn checkpoint(&mut self, _path: &Path) {}
    /// The run ended with this summary.
    fn finished(&mut self, _summary: &Summary) {}
}

/// The run's observers, called in the order they were added.
#[derive(Default)]
pub struct Observers(Vec<Box<dyn Observer>>);

impl Observers {
    /// Adds `observer`.
    pub fn add(&mut self, observer: impl Observer + 'static) {
        self.0.push(Box::new(observer));
    }

    /// Whether anyone watches (the engine skips building records otherwise).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Observer for Observers {
    fn step(&mut self, record: &StepRecord) {
        self.0.iter_mut().for_each(|o| o.step(record));
    }
    fn epoch(&mut self, m: &EpochMetrics) {
        self.0.iter_mut().for_each(|o| o.epoch(m));
    }
    fn member(&mut self, event: &MemberEvent) {
        self.0.iter_mut().for_each(|o| o.member(event));
    }
    fn checkpoint(&mut self, path: &Path) {
        self.0.iter_mut().for_each(|o| o.checkpoint(path));
    }
    fn finished(&mut self, summary: &Summary) {
        self.0.iter_mut().for_each(|o| o.finished(summary));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Count(Arc<Mutex<Vec<String>>>, &'static str);

    impl Observer for Count {
        fn step(&mut self, r: &StepRecord) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} step {}", self.1, r.step));
        }
        fn checkpoint(&mut self, path: &Path) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} checkpoint {}", self.1, path.display()));
        }
    }

    #[test]
    fn a_peers_duration_is_finite_non_negative_and_bounded() {
        assert_eq!(seconds_from_peer_ms(1500.0), 1.5);
        assert_eq!(seconds_from_peer_ms(f32::NAN), 0.0);
        assert_eq!(seconds_from_peer_ms(f32::INFINITY), 0.0);
        assert_eq!(seconds_from_peer_ms(-3.0), 0.0);
        assert_eq!(seconds_from_peer_ms(f32::MAX), 86_400.0);
    }

    #[test]
    fn observers_are_called_in_the_order_they_were_added() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut all = Observers::default();
        assert!(all.is_empty());
        all.add(Count(seen.clone(), "a"));
        all.add(Count(seen.clone(), "b"));
        all.step(&StepRecord {
            step: 3,
            ..StepRecord::default()
        });
        all.checkpoint(Path::new("c.safetensors"));
        // A method a sink does not implement is a no-op.
        all.epoch(&EpochMetrics::default());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "a step 3",
                "b step 3",
                "a checkpoint c.safetensors",
                "b checkpoint c.safetensors"
            ]
        );
    }
}
