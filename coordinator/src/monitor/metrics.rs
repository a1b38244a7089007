//! The run's Prometheus metrics: counters, gauges and histograms in a `prometheus-client`
//! registry, named by Prometheus's conventions (`lockstep_` prefix, base units, `_total` for
//! counters, `_seconds` for durations), encoded as OpenMetrics text for `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::observe::{MemberEvent, StepRecord};
use crate::run_dir::EpochMetrics;

/// A gauge holding an `f64`.
type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels of a per-worker series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabels {
    /// The worker's rank.
    pub rank: String,
}

/// Labels of a membership change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// `joined` or `lost`.
    pub kind: String,
}

/// Labels of the info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    preset: String,
    model: String,
    backend: String,
}

/// A histogram of durations from 100 µs to about 13 minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 24))
}

/// Every metric of a run.
pub struct Metrics {
    registry: Registry,
    steps: Counter,
    samples: Counter,
    wire_bytes: Counter,
    allreduce_bytes: Counter,
    step_seconds: Histogram,
    compute_seconds: Family<RankLabels, Histogram, fn() -> Histogram>,
    wait_seconds: Family<RankLabels, Histogram, fn() -> Histogram>,
    apply_seconds: Family<RankLabels, Histogram, fn() -> Histogram>,
    workers: Gauge,
    membership_changes: Family<ChangeLabels, Counter>,
    epoch: Gauge,
    train_loss: FloatGauge,
    epoch_train_loss: FloatGauge,
    test_loss: FloatGauge,
    test_accuracy: FloatGauge,
    samples_per_second: FloatGauge,
    checkpoints: Counter,
    last_checkpoint_time: FloatGauge,
    last_checkpoint_age: FloatGauge,
    /// Bytes of one worker's gradient (the parameters as f32).
    gradient_bytes: u64,
    /// Each rank's compute, wait and apply histograms, looked up in their families once (a
    /// lookup formats and hashes the label, too much for every step).
    by_rank: Mutex<Vec<Option<[Histogram; 3]>>>,
}

impl Metrics {
    /// The metrics of a run of `model` (`parameters` f32 parameters).
    pub fn new(preset: &str, model: &str, backend: &str, parameters: u64) -> Self {
        let mut registry = Registry::with_prefix("lockstep");
        let m = Self {
            registry: Registry::default(),
            steps: Counter::default(),
            samples: Counter::default(),
            wire_bytes: Counter::default(),
            allreduce_bytes: Counter::default(),
            step_seconds: seconds_histogram(),
            compute_seconds: Family::new_with_constructor(seconds_histogram),
            wait_seconds: Family::new_with_constructor(seconds_histogram),
            apply_seconds: Family::new_with_constructor(seconds_histogram),
            workers: Gauge::default(),
            membership_changes: Family::default(),
            epoch: Gauge::default(),
            train_loss: FloatGauge::default(),
            epoch_train_loss: FloatGauge::default(),
            test_loss: FloatGauge::default(),
            test_accuracy: FloatGauge::default(),
            samples_per_second: FloatGauge::default(),
            checkpoints: Counter::default(),
            last_checkpoint_time: FloatGauge::default(),
            last_checkpoint_age: FloatGauge::default(),
            gradient_bytes: parameters * 4,
            by_rank: Mutex::new(Vec::new()),
        };
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            preset: preset.to_string(),
            model: model.to_string(),
            backend: backend.to_string(),
        })
        .set(1);
        registry.register("run", "The run: version, preset, model and backend", info);
        registry.register("steps", "Optimizer steps applied", m.steps.clone());
        registry.register("samples", "Training samples applied", m.samples.clone());
        registry.register_with_unit(
            "wire",
            "Bytes the coordinator sent and received for steps (batches, gradients, averages)",
            Unit::Bytes,
            m.wire_bytes.clone(),
        );
        registry.register_with_unit(
            "allreduce",
            "Gradient bytes all-reduced: each worker's gradient, every step",
            Unit::Bytes,
            m.allreduce_bytes.clone(),
        );
        registry.register_with_unit(
            "step",
            "Wall time of a step, as the coordinator sees it (from the previous step's end)",
            Unit::Seconds,
            m.step_seconds.clone(),
        );
        registry.register_with_unit(
            "worker_compute",
            "Time a worker spent computing its shards' gradients in a step",
            Unit::Seconds,
            m.compute_seconds.clone(),
        );
        registry.register_with_unit(
            "worker_allreduce_wait",
            "Time a worker waited for a step's all-reduce (grpc: for the coordinator's average)",
            Unit::Seconds,
            m.wait_seconds.clone(),
        );
        registry.register_with_unit(
            "worker_apply",
            "Time a worker spent applying a step's optimizer update",
            Unit::Seconds,
            m.apply_seconds.clone(),
        );
        registry.register("workers", "Workers taking part", m.workers.clone());
        registry.register(
            "membership_changes",
            "Workers that joined or were lost",
            m.membership_changes.clone(),
        );
        registry.register("epoch", "The epoch being trained, from 1", m.epoch.clone());
        registry.register(
            "train_loss",
            "Mean training loss of the current epoch so far",
            m.train_loss.clone(),
        );
        registry.register(
            "epoch_train_loss",
            "Mean training loss of the last finished epoch",
            m.epoch_train_loss.clone(),
        );
        registry.register(
            "test_loss",
            "Mean test loss after the last finished epoch",
            m.test_loss.clone(),
        );
        registry.register(
            "test_accuracy",
            "Fraction of the test images classified correctly after the last finished epoch (0 to 1)",
            m.test_accuracy.clone(),
        );
        registry.register(
            "samples_per_second",
            "Training throughput over the last steps",
            m.samples_per_second.clone(),
        );
        registry.register("checkpoints", "Checkpoints written", m.checkpoints.clone());
        registry.register_with_unit(
            "last_checkpoint_timestamp",
            "When the last checkpoint was written, in seconds since the Unix epoch",
            Unit::Seconds,
            m.last_checkpoint_time.clone(),
        );
        registry.register_with_unit(
            "last_checkpoint_age",
            "Time since the last checkpoint was written (0 before the first)",
            Unit::Seconds,
            m.last_checkpoint_age.clone(),
        );
        Self { registry, ..m }
    }

    /// A step was applied; `throughput` is the recent samples per second.
    pub fn step(&self, r: &StepRecord, throughput: f64) {
        self.steps.inc();
        self.samples.inc_by(r.samples);
        self.wire_bytes.inc_by(r.bytes);
        self.allreduce_bytes
            .inc_by(self.gradient_bytes * r.workers as u64);
        self.step_seconds.observe(r.seconds);
        if !r.timings.is_empty() {
            let mut by_rank = self.by_rank.lock().unwrap_or_else(|e| e.into_inner());
            for t in &r.timings {
                let [compute, wait, apply] = self.rank_histograms(&mut by_rank, t.rank);
                compute.observe(t.compute_seconds);
                wait.observe(t.wait_seconds);
                apply.observe(t.apply_seconds);
            }
        }
        self.workers.set(r.workers as i64);
        self.epoch.set(r.epoch as i64);
        self.train_loss.set(r.epoch_loss);
        self.samples_per_second.set(throughput);
    }

    /// `rank`'s compute, wait and apply histograms.
    fn rank_histograms<'a>(
        &self,
        by_rank: &'a mut Vec<Option<[Histogram; 3]>>,
        rank: u32,
    ) -> &'a [Histogram; 3] {
        let i = rank as usize;
        if by_rank.len() <= i {
            by_rank.resize(i + 1, None);
        }
        by_rank[i].get_or_insert_with(|| {
            let labels = RankLabels {
                rank: rank.to_string(),
            };
            [
                self.compute_seconds.get_or_create(&labels).clone(),
                self.wait_seconds.get_or_create(&labels).clone(),
                self.apply_seconds.get_or_create(&labels).clone(),
            ]
        })
    }

    /// An epoch ended.
    pub fn epoch(&self, m: &EpochMetrics) {
        self.epoch_train_loss.set(m.train_loss);
        self.test_loss.set(m.test_loss);
        self.test_accuracy.set(m.test_accuracy);
        self.workers.set(m.workers as i64);
    }

    /// A worker joined or was lost.
    pub fn member(&self, e: &MemberEvent) {
        self.membership_changes
            .get_or_create(&ChangeLabels {
                kind: e.kind.as_str().to_string(),
            })
            .inc();
        self.workers.set(e.workers as i64);
    }

    /// A checkpoint was written now.
    pub fn checkpoint(&self) {
        self.checkpoints.inc();
        self.last_checkpoint_time.set(unix_seconds());
    }

    /// The registry as OpenMetrics text, with the checkpoint's age as of now.
    pub fn encode(&self) -> String {
        let last = self.last_checkpoint_time.get();
        self.last_checkpoint_age.set(if last > 0.0 {
            (unix_seconds() - last).max(0.0)
        } else {
            0.0
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// Seconds since the Unix epoch.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{MemberEventKind, WorkerTiming};

    #[test]
    fn a_step_moves_the_counters_and_histograms_by_rank() {
        let m = Metrics::new("mlp", "mlp 784-100-10", "grpc", 1000);
        m.step(
            &StepRecord {
                epoch: 2,
                samples: 64,
                bytes: 500,
                workers: 2,
                seconds: 0.003,
                epoch_loss: 0.25,
                timings: vec![
                    WorkerTiming {
                        rank: 0,
                        compute_seconds: 0.001,
                        ..WorkerTiming::default()
                    },
                    WorkerTiming {
                        rank: 1,
                        compute_seconds: 0.002,
                        ..WorkerTiming::default()
                    },
                ],
                ..StepRecord::default()
            },
            1234.5,
        );
        m.member(&MemberEvent {
            kind: MemberEventKind::Lost,
            who: "worker 1".into(),
            rank: 1,
            worker_id: "h/1".into(),
            device: "cpu".into(),
            workers: 1,
            at: String::new(),
            reason: "exited".into(),
        });
        m.checkpoint();
        let text = m.encode();
        for line in [
            "lockstep_steps_total 1",
            "lockstep_samples_total 64",
            "lockstep_wire_bytes_total 500",
            "lockstep_allreduce_bytes_total 8000",
            "lockstep_step_seconds_count 1",
            "lockstep_worker_compute_seconds_count{rank=\"1\"} 1",
            "lockstep_membership_changes_total{kind=\"lost\"} 1",
            "lockstep_workers 1",
            "lockstep_epoch 2",
            "lockstep_train_loss 0.25",
            "lockstep_samples_per_second 1234.5",
            "lockstep_checkpoints_total 1",
            "# TYPE lockstep_step_seconds histogram",
            "# UNIT lockstep_step_seconds seconds",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
