//! The Lockstep coordinator: one per job. It owns the data, the schedule and the evaluation;
//! admits workers over gRPC; streams each its shards of every global batch; in gRPC mode sums
//! their shard gradients in shard order and keeps its own replica in step; carries on when
//! workers are lost or join; evaluates after every epoch and writes the run directory, which a
//! later `lockstep train --resume` continues.
//!
//! - [`service`]: the gRPC surface (`Join`, `FetchState`, `Train`, …), turned into events.
//! - [`membership`]: who is in the job: admissions, ranks, generations.
//! - [`engine`]: the training loop that drives every step, and what faults do to it.
//! - [`error`]: why a worker was lost, why a job stopped.
//! - [`launcher`]: spawns, supervises and restarts local `lockstep-worker` processes.
//! - [`run_dir`]: the run directory (config, metrics, checkpoints, summary), and reopening it.
//! - [`monitor`]: Prometheus `/metrics` and the live dashboard, over HTTP.
//! - [`observe`]: what the engine tells observers (metrics, dashboard, TensorBoard) as a run goes.
//! - [`tensorboard`]: TensorBoard event files under `RUN_DIR/tensorboard/`.
//! - [`progress`]: the per-epoch progress bar or log lines.
//! - [`server`]: binds the listener and serves the service plus `grpc.health.v1`.
//! - [`certs`]: `lockstep certs`, a CA and certificates for a quick start with TLS.
//! - [`train`]: puts the pieces together for `lockstep train`, fresh or resumed.
//! - [`inspect`]: `lockstep plot`, `predict` and `eval`: curves, predictions and evaluations
//!   of what a run wrote.

pub mod certs;
pub mod engine;
pub mod error;
pub mod inspect;
pub mod launcher;
pub mod membership;
pub mod monitor;
pub mod observe;
pub mod progress;
pub mod run_dir;
pub mod server;
pub mod service;
pub mod tensorboard;
pub mod train;
