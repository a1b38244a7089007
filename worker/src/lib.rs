//! The Lockstep worker: joins a coordinator, receives the job configuration and the initial
//! state, then for every step computes the gradient of its share of the global batch,
//! all-reduces it and applies the same optimizer step as every other replica.
//!
//! - [`session`]: connecting, joining and fetching the initial state.
//! - [`stream`]: the step stream: the network side (batches in, gradients out, heartbeats).
//! - [`compute`]: the compute thread that owns the model replica.
//! - [`device`]: parsing `--device` into a candle device.
//! - [`tcp`]: the all-reduce of CPU workers among themselves (`--backend tcp`).
//! - `nccl` (feature `cuda`): the NCCL communicator and its bootstrap.

pub mod compute;
pub mod device;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod session;
pub mod stream;
pub mod tcp;
