//! The Lockstep coordinator: one per job. It owns the data, the schedule and the evaluation;
//! admits workers over gRPC; streams each its share of every global batch; in gRPC mode
//! reduces their gradients in rank order and keeps its own replica in step; evaluates after
//! every epoch and writes the run directory.
//!
//! - [`service`]: the gRPC surface (`Join`, `FetchState`, `Train`, …) and membership.
//! - [`engine`]: the training loop that drives every step.
//! - [`reducer`]: the rank-order gradient average.
//! - [`launcher`]: spawns local `lockstep-worker` processes.
//! - [`run_dir`]: the run directory (config, metrics, checkpoints, summary).
//! - [`progress`]: the per-epoch progress bar or log lines.
//! - [`server`]: binds the listener and serves the service plus `grpc.health.v1`.
//! - [`train`]: puts the pieces together for `lockstep train`.

pub mod engine;
pub mod launcher;
pub mod progress;
pub mod reducer;
pub mod run_dir;
pub mod server;
pub mod service;
pub mod train;
