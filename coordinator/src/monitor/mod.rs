//! Watching a run over HTTP: Prometheus `/metrics`, the live dashboard `/` and its JSON
//! `/api/state`, all read-only, served by the coordinator on `metrics_addr` (loopback and a
//! free port by default). The [`Monitor`] is an [`Observer`]: the engine's calls update its
//! metrics and its [`board::Board`]; the HTTP handlers only read them.

pub mod board;
pub mod http;
pub mod metrics;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::observe::{MemberEvent, Observer, StepRecord};
use crate::run_dir::{EpochMetrics, Summary};
use board::Board;
use metrics::Metrics;

/// Steps the throughput is measured over.
const THROUGHPUT_WINDOW: usize = 50;

/// A run's metrics and dashboard state, shared by the engine (writing) and the HTTP server
/// (reading).
pub struct Monitor {
    metrics: Metrics,
    board: Mutex<Board>,
    recent: Mutex<VecDeque<(u64, f64)>>,
    started: Instant,
}

impl Monitor {
    /// A monitor for a run; `board` describes the job.
    pub fn new(metrics: Metrics, board: Board) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            board: Mutex::new(board),
            recent: Mutex::new(VecDeque::new()),
            started: Instant::now(),
        })
    }

    /// `/metrics`: OpenMetrics text.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The dashboard's state as it is now.
    pub fn snapshot(&self) -> Board {
        self.board().snapshot(self.elapsed())
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        // A panic elsewhere while holding the lock leaves a usable board: keep serving it.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Samples per second over the last [`THROUGHPUT_WINDOW`] steps, with `r` added.
    fn throughput(&self, r: &StepRecord) -> f64 {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((r.samples, r.seconds));
        while recent.len() > THROUGHPUT_WINDOW {
            recent.pop_front();
        }
        let (samples, seconds) = recent
            .iter()
            .fold((0u64, 0.0f64), |(n, t), (s, d)| (n + s, t + d));
        if seconds > 0.0 {
            samples as f64 / seconds
        } else {
            0.0
        }
    }
}

/// The engine's handle on a [`Monitor`].
pub struct Watch(pub Arc<Monitor>);

impl Observer for Watch {
    fn step(&mut self, r: &StepRecord) {
        let throughput = self.0.throughput(r);
        self.0.metrics.step(r, throughput);
        let elapsed = self.0.elapsed();
        self.0.board().step(r, elapsed, throughput);
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        self.0.metrics.epoch(m);
        self.0.board().epoch(m);
    }

    fn member(&mut self, e: &MemberEvent) {
        self.0.metrics.member(e);
        let elapsed = self.0.elapsed();
        self.0.board().member(e, elapsed);
    }

    fn checkpoint(&mut self, _path: &Path) {
        self.0.metrics.checkpoint();
    }

    fn finished(&mut self, s: &Summary) {
        self.0.board().finished(s);
    }
}
