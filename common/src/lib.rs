//! Shared pieces of Lockstep, used by both the coordinator and the workers: the wire protocol
//! and its authentication, the layered job configuration, MNIST loading, the models, the
//! optimizers with explicit state, the flat tensor codecs and the checkpoint format.
//!
//! Everything that must be *identical* on every replica lives here, so that the coordinator
//! and each worker compute bit-for-bit the same optimizer step from the same gradient.

pub mod auth;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod mnist;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod wire;

/// Version of the wire protocol in `proto/lockstep.proto`; a worker of another version is
/// refused at `Join` with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side accepts or sends. Gradients of the largest preset (`cnn`,
/// 1.2M parameters) are about 5 MB; state transfers are chunked well below this.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of one chunk of a streamed training state.
pub const STATE_CHUNK_BYTES: usize = 1024 * 1024;

/// Largest training state (parameters + optimizer state) accepted over `FetchState`/`PushState`.
pub const MAX_STATE_BYTES: u64 = 1 << 30;
