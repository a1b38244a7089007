//! The Lockstep worker: joins a coordinator, receives the job configuration and its state,
//! then for every step computes the gradients of the shards of the global batch it is given,
//! all-reduces them and applies the same optimizer step as every other replica; it follows the
//! job through membership changes, and rejoins a coordinator that comes back.
//!
//! - [`run`]: a worker's life: join, train, rejoin.
//! - [`session`]: connecting, joining, and moving training states to and from the coordinator.
//! - [`stream`]: the step stream: the network side (work in, results out, heartbeats).
//! - [`step_loop`]: the compute thread and its one step loop.
//! - [`state`]: parameters and optimizer state, on the host or on the device.
//! - [`allreduce`]: the backends' all-reduce (coordinator, tcp, nccl) behind one trait.
//! - [`abort`]: how the network side interrupts a compute thread waiting on a vanished peer.
//! - [`device`]: parsing `--device` into a candle device.

pub mod abort;
pub mod allreduce;
pub mod device;
pub mod run;
pub mod session;
pub mod state;
pub mod step_loop;
pub mod stream;
