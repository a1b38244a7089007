//! What the dashboard shows, kept up to date by the observer calls and served as JSON: the
//! epochs' curves, the loss within the current epoch, throughput, one row per worker with its
//! step-time breakdown and a straggler flag, membership events, the configuration and the run
//! directory. Every list is bounded, however long the run.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::observe::{MemberEvent, MemberEventKind, StepRecord};
use crate::run_dir::{EpochMetrics, Summary};

/// Points kept per curve: when a curve reaches this, every other point is dropped.
pub const MAX_POINTS: usize = 400;
/// Membership events kept (the newest).
pub const MAX_EVENTS: usize = 200;
/// Weight of a new step in a worker's moving averages.
const SMOOTHING: f64 = 0.1;
/// A worker whose step time (computing plus applying) exceeds the median's by this factor,
/// and by [`STRAGGLER_MARGIN_MS`] at least, is flagged as a straggler.
pub const STRAGGLER_FACTOR: f64 = 1.5;
/// Below this difference in milliseconds, no worker is a straggler: sub-millisecond steps
/// differ by noise.
pub const STRAGGLER_MARGIN_MS: f64 = 1.0;

/// The job, as the dashboard's header names it.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub preset: String,
    pub model: String,
    pub backend: String,
    pub optimizer: String,
    pub batch_size: u32,
    pub epochs: u64,
    pub steps_per_epoch: u64,
}

/// One worker's row.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerRow {
    pub rank: u32,
    /// Its host/pid self-description.
    pub host: String,
    pub device: String,
    /// `active` or `lost`.
    pub status: String,
    /// Steps it reported timings for.
    pub steps: u64,
    /// Moving averages over its recent steps, in milliseconds.
    pub compute_ms: f64,
    pub wait_ms: f64,
    pub apply_ms: f64,
    /// Its computing plus applying time exceeds the active workers' median by
    /// [`STRAGGLER_FACTOR`] and [`STRAGGLER_MARGIN_MS`].
    pub straggler: bool,
}

/// A membership event.
#[derive(Clone, Debug, Serialize)]
pub struct EventRow {
    /// Seconds since the run started.
    pub t: f64,
    /// `joined` or `lost`.
    pub kind: &'static str,
    pub who: String,
    pub at: String,
    pub reason: String,
    pub workers: usize,
}

/// A curve whose points thin out as it grows, so that it stays at most [`MAX_POINTS`] long
/// and still spans the whole range.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Curve {
    points: Vec<[f64; 2]>,
    #[serde(skip)]
    stride: u64,
    #[serde(skip)]
    seen: u64,
}

impl Curve {
    /// Adds `(x, y)`, unless thinning skips it.
    pub fn push(&mut self, x: f64, y: f64) {
        let stride = self.stride.max(1);
        self.seen += 1;
        if !(self.seen - 1).is_multiple_of(stride) {
            return;
        }
        self.points.push([x, y]);
        if self.points.len() >= MAX_POINTS {
            let kept: Vec<[f64; 2]> = self.points.iter().copied().step_by(2).collect();
            self.points = kept;
            self.stride = stride * 2;
        }
    }

    /// The points.
    pub fn points(&self) -> &[[f64; 2]] {
        &self.points
    }
}

/// Everything the dashboard shows.
#[derive(Clone, Debug, Serialize)]
pub struct Board {
    pub job: Job,
    pub run_dir: String,
    pub config: String,
    /// `waiting for workers`, `training`, `finished`.
    pub status: String,
    /// Seconds since the run started (set when a snapshot is taken).
    pub elapsed: f64,
    pub epoch: u64,
    pub step: u64,
    pub workers_now: usize,
    /// Samples per second over the last steps.
    pub samples_per_second: f64,
    pub epochs: Vec<EpochMetrics>,
    /// The current epoch's running mean loss against its step.
    pub epoch_loss: Curve,
    /// Throughput against seconds since the start.
    pub throughput: Curve,
    pub workers: Vec<WorkerRow>,
    pub events: VecDeque<EventRow>,
    pub summary: Option<Summary>,
    #[serde(skip)]
    rows: BTreeMap<u32, WorkerRow>,
}

impl Board {
    /// A board for a job that has not started yet.
    pub fn new(job: Job, run_dir: String, config: String, epochs: Vec<EpochMetrics>) -> Self {
        Self {
            job,
            run_dir,
            config,
            status: "waiting for workers".into(),
            elapsed: 0.0,
            epoch: epochs.len() as u64,
            step: 0,
            workers_now: 0,
            samples_per_second: 0.0,
            epochs,
            epoch_loss: Curve::default(),
            throughput: Curve::default(),
            workers: Vec::new(),
            events: VecDeque::new(),
            summary: None,
            rows: BTreeMap::new(),
        }
    }

    /// A step was applied, `elapsed` seconds into the run, at `throughput` samples/s.
    pub fn step(&mut self, r: &StepRecord, elapsed: f64, throughput: f64) {
        if r.epoch != self.epoch || r.step < self.step {
            self.epoch_loss = Curve::default();
        }
        self.status = "training".into();
        self.epoch = r.epoch;
        self.step = r.step;
        self.workers_now = r.workers;
        self.samples_per_second = throughput;
        self.epoch_loss.push(r.step as f64, r.epoch_loss);
        self.throughput.push(elapsed, throughput);
        for t in &r.timings {
            let row = self.rows.entry(t.rank).or_insert_with(|| WorkerRow {
                rank: t.rank,
                status: "active".into(),
                ..WorkerRow::default()
            });
            let blend = |avg: f64, new: f64, first: bool| {
                if first {
                    new
                } else {
                    avg + SMOOTHING * (new - avg)
                }
            };
            let first = row.steps == 0;
            row.compute_ms = blend(row.compute_ms, t.compute_seconds * 1e3, first);
            row.wait_ms = blend(row.wait_ms, t.wait_seconds * 1e3, first);
            row.apply_ms = blend(row.apply_ms, t.apply_seconds * 1e3, first);
            row.steps += 1;
        }
    }

    /// An epoch ended.
    pub fn epoch(&mut self, m: &EpochMetrics) {
        self.epochs.retain(|e| e.epoch < m.epoch);
        self.epochs.push(m.clone());
        self.workers_now = m.workers as usize;
    }

    /// A worker joined or was lost, `elapsed` seconds into the run.
    pub fn member(&mut self, e: &MemberEvent, elapsed: f64) {
        match e.kind {
            MemberEventKind::Joined => {
                // A rank taken over by a newcomer starts a new row.
                self.rows.insert(
                    e.rank,
                    WorkerRow {
                        rank: e.rank,
                        host: e.worker_id.clone(),
                        device: e.device.clone(),
                        status: "active".into(),
                        ..WorkerRow::default()
                    },
                );
            }
            MemberEventKind::Lost => {
                if let Some(row) = self.rows.get_mut(&e.rank) {
                    row.status = "lost".into();
                }
            }
        }
        self.workers_now = e.workers;
        self.events.push_back(EventRow {
            t: elapsed,
            kind: e.kind.as_str(),
            who: e.who.clone(),
            at: e.at.clone(),
            reason: e.reason.clone(),
            workers: e.workers,
        });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// The run ended.
    pub fn finished(&mut self, s: &Summary) {
        self.status = "finished".into();
        self.summary = Some(s.clone());
    }

    /// The board as it is now, with the workers' rows and straggler flags filled in.
    pub fn snapshot(&self, elapsed: f64) -> Board {
        let mut b = self.clone();
        b.elapsed = elapsed;
        b.workers = self.rows.values().cloned().collect();
        flag_stragglers(&mut b.workers);
        b
    }
}

/// Flags the active workers whose computing plus applying time exceeds the median's (the
/// lower one, with an even count) by [`STRAGGLER_FACTOR`] and [`STRAGGLER_MARGIN_MS`]. Waiting
/// is left out: a fast worker waits for a slow one.
pub fn flag_stragglers(rows: &mut [WorkerRow]) {
    let busy = |r: &WorkerRow| r.compute_ms + r.apply_ms;
    let mut times: Vec<f64> = rows
        .iter()
        .filter(|r| r.status == "active" && r.steps > 0)
        .map(busy)
        .collect();
    times.sort_by(f64::total_cmp);
    let median = match times.len() {
        0 | 1 => None,
        n => Some(times[(n - 1) / 2]),
    };
    for r in rows.iter_mut() {
        r.straggler = median.is_some_and(|m| {
            r.status == "active"
                && r.steps > 0
                && busy(r) > m * STRAGGLER_FACTOR
                && busy(r) - m >= STRAGGLER_MARGIN_MS
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::WorkerTiming;

    fn job() -> Job {
        Job {
            preset: "mlp".into(),
            model: "mlp".into(),
            backend: "grpc".into(),
            optimizer: "adam".into(),
            batch_size: 64,
            epochs: 3,
            steps_per_epoch: 938,
        }
    }

    fn row(rank: u32, compute_ms: f64) -> WorkerRow {
        WorkerRow {
            rank,
            status: "active".into(),
            steps: 10,
            compute_ms,
            ..WorkerRow::default()
        }
    }

    #[test]
    fn a_curve_thins_out_but_spans_the_whole_run() {
        let mut c = Curve::default();
        for i in 0..10_000 {
            c.push(i as f64, 1.0);
        }
        assert!(c.points().len() < MAX_POINTS, "{}", c.points().len());
        assert!(c.points().len() > MAX_POINTS / 4);
        assert_eq!(c.points()[0][0], 0.0);
        assert!(c.points().last().unwrap()[0] > 9_000.0);
    }

    #[test]
    fn the_slow_worker_is_the_straggler_and_a_lone_or_lost_one_is_not() {
        let mut rows = vec![row(0, 2.0), row(1, 6.0), row(2, 2.2)];
        flag_stragglers(&mut rows);
        assert_eq!(
            rows.iter().map(|r| r.straggler).collect::<Vec<_>>(),
            [false, true, false]
        );
        // Two workers: the slower one against the faster.
        let mut rows = vec![row(0, 2.0), row(1, 4.0)];
        flag_stragglers(&mut rows);
        assert!(rows[1].straggler && !rows[0].straggler);
        // Sub-millisecond steps differ by noise, whatever the ratio.
        let mut rows = vec![row(0, 0.6), row(1, 0.9)];
        flag_stragglers(&mut rows);
        assert!(rows.iter().all(|r| !r.straggler));
        let mut rows = vec![
            row(0, 1.0),
            WorkerRow {
                status: "lost".into(),
                ..row(1, 9.0)
            },
        ];
        flag_stragglers(&mut rows);
        assert!(rows.iter().all(|r| !r.straggler));
    }

    #[test]
    fn steps_fill_the_rows_and_a_new_epoch_restarts_its_loss_curve() {
        let mut b = Board::new(job(), "runs/x".into(), "seed = 1".into(), Vec::new());
        let timing = |rank, ms: f64| WorkerTiming {
            rank,
            compute_seconds: ms / 1e3,
            ..WorkerTiming::default()
        };
        for step in 1..=5 {
            b.step(
                &StepRecord {
                    epoch: 1,
                    step,
                    epoch_loss: 1.0 / step as f64,
                    workers: 2,
                    timings: vec![timing(0, 2.0), timing(1, 2.0)],
                    ..StepRecord::default()
                },
                step as f64,
                100.0,
            );
        }
        assert_eq!(b.epoch_loss.points().len(), 5);
        b.step(
            &StepRecord {
                epoch: 2,
                step: 1,
                workers: 2,
                ..StepRecord::default()
            },
            6.0,
            100.0,
        );
        assert_eq!(b.epoch_loss.points().len(), 1);
        let s = b.snapshot(7.0);
        assert_eq!(s.workers.len(), 2);
        assert!((s.workers[0].compute_ms - 2.0).abs() < 1e-9);
        assert_eq!(s.status, "training");
    }
}
